"""Command-line flags shared by the stage scripts (the paper's names kept) and what they build."""

from __future__ import annotations

import argparse
from pathlib import Path

from oppu.data import (
    OTHER_PROFILES_FILE,
    OTHER_USERS_FILE,
    TEST_PROFILES_FILE,
    TEST_USERS_FILE,
    User,
    load_profiles,
    load_users,
)
from oppu.generation import DecodeConfig
from oppu.modeling import EMBEDDED_MODEL, ModelSpec, check_spec
from oppu.runs import predictions_path
from oppu.tasks import Task, get_task
from oppu.training import TrainConfig
from utils import UserError


def add_common_args(parser: argparse.ArgumentParser, max_epoch: int, target_modules: tuple[str, ...]) -> None:
    g = parser.add_argument_group("data and outputs")
    g.add_argument("--task_name", required=True, help="task name or LaMP id, e.g. news_categorize or LaMP_2N")
    g.add_argument("--data_dir", default="./data", help="folder holding <task_name>/user_*.json")
    g.add_argument("--ckpt_dir", default="./ckpt", help="adapters go to <ckpt_dir>/<task_name>/...")
    g.add_argument("--output_dir", default="./output", help="predictions go to <output_dir>/<task_name>/...")
    g.add_argument("--max_users", type=int, default=-1, help="only the first N test users (quick runs); -1 = all")
    g.add_argument("--overwrite", action="store_true", help="recompute everything instead of resuming")
    g.add_argument("--debug", action="store_true", help="show tracebacks for user errors")

    g = parser.add_argument_group("prompt")
    g.add_argument("--k", type=int, default=0, help="retrieved history items in each prompt (BM25)")
    g.add_argument("--add_profile", action="store_true", help="prepend the user's textual profile")

    g = parser.add_argument_group("model")
    g.add_argument("--model_name", default=EMBEDDED_MODEL,
                   help=f"{EMBEDDED_MODEL} (embedded, default), a hub id such as meta-llama/Llama-2-7b-hf, or a local folder")  # fmt: skip
    g.add_argument("--access_token", default=None, help="hub token for gated models (never logged or saved)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    g.add_argument("--load_in_4bit", action="store_true", help="4-bit NF4 base weights (bitsandbytes, CUDA only)")
    g.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub (off by default)")

    g = parser.add_argument_group("training")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--batch_size", type=int, default=16, help="examples per optimiser step")
    g.add_argument("--micro_batch_size", type=int, default=4, help="examples per forward pass (memory only)")
    g.add_argument("--max_epoch", type=int, default=max_epoch)
    g.add_argument("--max_step", type=int, default=-1, help="stop after N optimiser steps; -1 = no cap")
    g.add_argument("--cut_off", type=int, default=2048, help="max tokens per training example")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=8)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--target_modules", default=",".join(target_modules), help="comma-separated module names to adapt")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for memory")
    g.add_argument("--no_group_by_length", dest="group_by_length", action="store_false",
                   help="the paper's plain shuffle instead of batches of similar length (more padding)")  # fmt: skip
    g.add_argument("--no_shared_prefix", dest="shared_prefix", action="store_false",
                   help="recompute the prompt prefix every example shares (chat template, instruction, labels) for "
                   "each example, in training and decoding, as the paper's code does")  # fmt: skip
    g.add_argument("--seed", type=int, default=42)

    g = parser.add_argument_group("decoding (greedy unless --do_sample)")
    g.add_argument("--max_new_tokens", type=int, default=None, help="default: per task (short for labels)")
    g.add_argument("--decode_batch_size", type=int, default=8)
    g.add_argument("--do_sample", action="store_true", help="sample as the paper did")
    g.add_argument("--temperature", type=float, default=0.1)
    g.add_argument("--top_k", type=int, default=10)
    g.add_argument("--top_p", type=float, default=0.9)


def check_args(args: argparse.Namespace) -> None:
    """Every numeric flag checked at once, before anything is read or loaded."""
    problems = [f"--{name} must be {rule}" for name, bad, rule in (
        ("k", args.k < 0, ">= 0"), ("batch_size", args.batch_size < 1, ">= 1"),
        ("micro_batch_size", args.micro_batch_size < 1, ">= 1"), ("max_epoch", args.max_epoch < 1, ">= 1"),
        ("cut_off", args.cut_off < 8, ">= 8"), ("learning_rate", args.learning_rate <= 0, "> 0"),
        ("decode_batch_size", args.decode_batch_size < 1, ">= 1"), ("lora_r", args.lora_r < 1, ">= 1"),
        ("max_step", args.max_step < 1 and args.max_step != -1, "-1 (no cap) or >= 1"),
        ("max_users", args.max_users < -1, "-1 (all) or >= 0"),
        ("max_new_tokens", args.max_new_tokens is not None and args.max_new_tokens < 1, ">= 1"),
        ("temperature", args.do_sample and args.temperature <= 0, "> 0 with --do_sample"),
        ("top_p", args.do_sample and not 0 < args.top_p <= 1, "in (0, 1] with --do_sample"),
    ) if bad]  # fmt: skip
    if problems:
        raise UserError("; ".join(problems))


def validate(args: argparse.Namespace) -> tuple[Task, ModelSpec]:
    """The checks every stage runs first, before reading data or loading a model."""
    check_args(args)
    task = get_task(args.task_name)
    spec = model_spec(args)
    check_spec(spec)
    return task, spec


def prediction_file(args: argparse.Namespace, task: Task, method: str) -> Path:
    """Where this run's predictions (or golds) of ``method`` go."""
    return predictions_path(args.output_dir, task, args.k, args.model_name, args.add_profile, method)


def target_modules(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(name.strip() for name in args.target_modules.split(",") if name.strip())


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(args.model_name, args.dtype, args.load_in_4bit, args.access_token, args.trust_remote_code)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        learning_rate=args.learning_rate, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        max_epoch=args.max_epoch, max_step=args.max_step, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, group_by_length=args.group_by_length,
        shared_prefix=args.shared_prefix,
    )  # fmt: skip


def decode_config(args: argparse.Namespace, task: Task) -> DecodeConfig:
    return DecodeConfig(
        max_new_tokens=task.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens, batch_size=args.decode_batch_size,
        do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        shared_prefix=args.shared_prefix,
    )  # fmt: skip


def load_test_users(args: argparse.Namespace, task: Task) -> tuple[list[User], list[str | None]]:
    """The test users (first --max_users) and their profiles (None without --add_profile)."""
    folder = Path(args.data_dir) / task.name
    users = load_users(task, folder / TEST_USERS_FILE)
    profiles = load_profiles(folder / TEST_PROFILES_FILE, users) if args.add_profile else [None] * len(users)
    if args.max_users >= 0:
        users, profiles = users[: args.max_users], profiles[: args.max_users]
    return users, profiles


def load_other_users(args: argparse.Namespace, task: Task) -> tuple[list[User], list[str | None]]:
    """The task adapter's users (their histories may be empty: only their queries train)."""
    folder = Path(args.data_dir) / task.name
    users = load_users(task, folder / OTHER_USERS_FILE, need_history=False)
    profiles = load_profiles(folder / OTHER_PROFILES_FILE, users) if args.add_profile else [None] * len(users)
    return users, profiles
