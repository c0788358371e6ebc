"""Command-line flags shared by the stage scripts (the paper's names kept) and what they build."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from oppu.adapters import IA3_TARGETS, PEFT_LEARNING_RATES, PEFT_TYPES, USER_TARGETS
from oppu.answers import ANSWER_MODES
from oppu.data import (
    OTHER_PROFILES_FILE,
    OTHER_USERS_FILE,
    PROFILE_CONFIG_FILE,
    PROFILE_USERS_KEY,
    TEST_PROFILES_FILE,
    TEST_USERS_FILE,
    User,
    load_profiles,
    load_users,
)
from oppu.defaults import model_parameters, resolve_training_defaults
from oppu.generation import DecodeConfig
from oppu.modeling import EMBEDDED_MODEL, ModelSpec, check_spec
from oppu.retrieval import RETRIEVAL_MODES
from oppu.runs import file_fingerprint, predictions_path
from oppu.tasks import Task, get_task
from oppu.training import TrainConfig, attention_window
from prompts import HISTORY_FORMATS
from utils import UserError, read_json


def add_loading_args(group: argparse._ArgumentGroup) -> None:
    """How the base model is loaded: the same flags wherever a model is (token, dtype, 4-bit, remote code)."""
    group.add_argument("--access_token", default=None, help="hub token for gated models (never logged or saved)")
    group.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    group.add_argument(
        "--load_in_4bit",
        action="store_true",
        help="4-bit NF4 base weights (bitsandbytes, CUDA only); task_LoRA.py only: OPPU.py refuses it (see README)",
    )
    group.add_argument(
        "--trust_remote_code", action="store_true", help="allow model code from the hub (off by default)"
    )


def add_common_args(parser: argparse.ArgumentParser, stage: str, target_modules: tuple[str, ...]) -> None:
    """The flags of both stages; ``stage`` ("task_LoRA" or "OPPU") picks its training defaults."""
    parser.set_defaults(stage=stage)
    g = parser.add_argument_group("data and outputs")
    g.add_argument("--task_name", required=True, help="task name or LaMP id, e.g. news_categorize or LaMP_2N")
    g.add_argument("--data_dir", default="./data", help="folder holding <task_name>/user_*.json")
    g.add_argument("--ckpt_dir", default="./ckpt", help="adapters go to <ckpt_dir>/<task_name>/...")
    g.add_argument("--output_dir", default="./output", help="predictions go to <output_dir>/<task_name>/...")
    g.add_argument("--max_users", type=int, default=-1, help="only the first N test users (quick runs); -1 = all")
    g.add_argument(
        "--user_stride",
        type=int,
        default=1,
        help="only every Nth test user, in the user file's order, before --max_users: a cap spread over "
        "the file (prepare_data.py lists users by history length, so the first N are the heaviest)",
    )
    g.add_argument("--overwrite", action="store_true", help="recompute everything instead of resuming")
    g.add_argument("--debug", action="store_true", help="show tracebacks for user errors")

    g = parser.add_argument_group("prompt")
    g.add_argument("--k", type=int, default=0, help="retrieved history items in each prompt (BM25)")
    g.add_argument("--add_profile", action="store_true", help="prepend the user's textual profile")
    g.add_argument(
        "--retrieval",
        choices=RETRIEVAL_MODES,
        default="most",
        help="most: the k most relevant items (the paper); least: the k least relevant (behaviour shift)",
    )

    g = parser.add_argument_group("model")
    g.add_argument(
        "--model_name",
        default=EMBEDDED_MODEL,
        help=f"{EMBEDDED_MODEL} (embedded, default), a hub id such as meta-llama/Llama-2-7b-hf, or a local folder",
    )
    add_loading_args(g)

    g = parser.add_argument_group("training (unset values follow the model's size: see --paper_defaults)")
    g.add_argument(
        "--paper_defaults",
        action="store_true",
        help="the paper's lr 1e-4, batch 16, 3/2 epochs, no step floor, whatever the model's size "
        "(the default for models of 1B parameters and more; smaller ones get lr 1e-3, batch 8, and "
        "at least 24 steps per user, 48 for tweets)",
    )
    g.add_argument("--learning_rate", type=float, default=None, help="default: by model size (1e-4 paper, 1e-3 small)")
    g.add_argument(
        "--batch_size", type=int, default=None, help="examples per optimiser step (default 16 paper, 8 small)"
    )
    g.add_argument(
        "--micro_batch_size",
        type=int,
        default=None,
        help="examples per forward pass (memory only; default 4 paper, 8 small)",
    )
    g.add_argument("--max_epoch", type=int, default=None, help="default: 3 (task adapter) / 2 (personal)")
    g.add_argument(
        "--min_steps",
        type=int,
        default=None,
        help="personal adapters: more epochs until a user gets this many optimiser steps (default 0 paper, 24 small, 48 small on tweets)",
    )
    g.add_argument("--max_step", type=int, default=-1, help="stop after N optimiser steps; -1 = no cap")
    g.add_argument(
        "--cut_off", type=int, default=2048, help="max tokens per training example, and per test prompt with its answer"
    )
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=8)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--target_modules", default=",".join(target_modules), help="comma-separated module names to adapt")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for memory")
    g.add_argument(
        "--reentrant_checkpointing",
        action="store_true",
        help="with --gradient_checkpointing: torch's reentrant checkpoint, which recomputes each layer's "
        "whole forward, as the paper's release did; for speed comparisons",
    )
    g.add_argument(
        "--no_group_by_length",
        dest="group_by_length",
        action="store_false",
        help="a plain shuffle instead of batches of similar length (more padding; the paper's release "
        "grouped by length too, with transformers' group_by_length)",
    )
    g.add_argument(
        "--no_shared_prefix",
        dest="shared_prefix",
        action="store_false",
        help="recompute the prompt prefix every example shares (chat template, instruction, labels) for "
        "each example, in training and decoding, as the paper's code does",
    )
    g.add_argument(
        "--all_logits",
        action="store_true",
        help="project every position onto the vocabulary in training, as the paper's release did "
        "(transformers' loss over -100 labels): the same loss, more work; for speed comparisons",
    )
    g.add_argument("--seed", type=int, default=42)

    g = parser.add_argument_group("decoding (greedy unless --do_sample)")
    g.add_argument(
        "--answer_mode",
        choices=ANSWER_MODES,
        default="generate",
        help="generate (the paper's way); score: answer the label (or rating 1-5) the model finds most likely; "
        "constrained: greedy decoding kept to the labels (or ratings), which runs the model only where they "
        "branch (for most tasks one position per query); the last two for classification and rating tasks only, "
        "and the sampling flags and --max_new_tokens apply to generate only",
    )
    g.add_argument("--max_new_tokens", type=int, default=None, help="default: per task (short for labels)")
    g.add_argument("--decode_batch_size", type=int, default=8)
    g.add_argument("--do_sample", action="store_true", help="sample as the paper did")
    g.add_argument("--temperature", type=float, default=0.1)
    g.add_argument("--top_k", type=int, default=10)
    g.add_argument("--top_p", type=float, default=0.9)


def check_answer_mode(mode: str | None, task: Task) -> None:
    """Scoring and constrained decoding choose among fixed answers: not for free-generation tasks."""
    if mode not in (None, "generate") and task.kind == "generation":
        raise UserError(f"--answer_mode {mode} needs a task with fixed answers; {task.name} is free generation")


HISTORY_INPUTS = ("auto", "item", "rewriter")


def add_personal_args(parser: argparse.ArgumentParser) -> None:
    """OPPU.py's personal-adapter flags; --target_modules and --learning_rate then default by type."""
    g = parser.add_argument_group("personal PEFT (the task adapter is always LoRA)")
    g.add_argument(
        "--peft_type",
        choices=PEFT_TYPES,
        default="lora",
        help="lora (q,v; the paper), ia3 (k,v,down_proj; lr 3e-3) or prompt_tuning (lr 3e-2)",
    )
    g.add_argument("--num_virtual_tokens", type=int, default=20, help="prompt_tuning: virtual tokens prepended")
    g.add_argument(
        "--prompt_init",
        choices=("text", "random"),
        default="text",
        help="prompt_tuning: start from the embeddings of a fixed instruction text, or random",
    )
    g.add_argument(
        "--history_format",
        choices=HISTORY_FORMATS,
        default="query",
        help="history items for personal training in the query prompt, or plain 'input -> output'",
    )
    g.add_argument(
        "--history_inputs",
        choices=HISTORY_INPUTS,
        default="auto",
        help="the inputs of the personal training pairs: the items' own (item), or, for a task whose items hold "
        "only the user's output (tweets), a neutral input written from it by the rewriter stage 1 trains beside "
        "the task adapter (rewriter; oppu/rewriter.py); auto: rewriter where the items have no input, else item",
    )
    g.add_argument(
        "--reuse_adapters",
        metavar="RUN_DIR",
        help="an OPPU run folder trained under these settings except how queries are answered (--answer_mode, "
        "--max_new_tokens, sampling): its users' PEFTs are loaded and only answer; users it lacks are trained, and "
        "so is every user, with a note, if it was trained under other settings",
    )
    parser.set_defaults(target_modules=None)


def resolve_personal_args(args: argparse.Namespace) -> None:
    """Fill --target_modules and (except for LoRA, whose rate follows the model size)
    --learning_rate from --peft_type when they were not given, and --history_inputs from the
    task, in place."""
    task = get_task(args.task_name)
    if args.history_inputs == "auto":
        args.history_inputs = "item" if task.history_has_input else "rewriter"
    elif args.history_inputs == "rewriter" and task.history_has_input:
        raise UserError(
            f"--history_inputs rewriter: {task.name}'s history items have inputs of their own "
            f"({task.text_field}); it is for tasks whose items hold only the output (tweet_paraphrase)"
        )
    if args.peft_type == "prompt_tuning":
        if args.target_modules:
            raise UserError("--target_modules does not apply to --peft_type prompt_tuning (it adapts no module)")
        if args.num_virtual_tokens < 1:
            raise UserError("--num_virtual_tokens must be >= 1")
        args.target_modules = ""
    elif args.target_modules is None:
        args.target_modules = ",".join(IA3_TARGETS if args.peft_type == "ia3" else USER_TARGETS)
    if args.learning_rate is None and args.peft_type in PEFT_LEARNING_RATES:
        args.learning_rate = PEFT_LEARNING_RATES[args.peft_type]


def personal_configs(args: argparse.Namespace, task: Task) -> tuple[TrainConfig, DecodeConfig]:
    """Training and decoding settings of a personal adapter. A prompt-tuning adapter's virtual
    tokens run once per batch as part of the shared prefix (training and decoding). With
    --no_shared_prefix it goes through peft's own path, which prepends them to every forward
    call: nothing may be cached (peft 0.21 misses transformers 5's cache and would prepend them
    again at every new token), and prompts are decoded one at a time (left padding would sit
    between the virtual tokens and the prompt and change the answer)."""
    train, decode = train_config(args), decode_config(args, task)
    if args.peft_type != "prompt_tuning" or args.shared_prefix:
        return train, decode
    return train, replace(decode, batch_size=1, use_cache=False)


def check_args(args: argparse.Namespace) -> None:
    """Every numeric flag checked at once, before anything is read or loaded."""
    problems = [
        f"--{name} must be {rule}"
        for name, bad, rule in (
            ("k", args.k < 0, ">= 0"),
            ("batch_size", args.batch_size < 1, ">= 1"),
            ("micro_batch_size", args.micro_batch_size < 1, ">= 1"),
            ("max_epoch", args.max_epoch < 1, ">= 1"),
            ("min_steps", args.min_steps < 0, ">= 0"),
            ("cut_off", args.cut_off < 8, ">= 8"),
            ("learning_rate", args.learning_rate <= 0, "> 0"),
            ("decode_batch_size", args.decode_batch_size < 1, ">= 1"),
            ("lora_r", args.lora_r < 1, ">= 1"),
            ("lora_dropout", not 0 <= args.lora_dropout < 1, "in [0, 1)"),
            ("max_step", args.max_step < 1 and args.max_step != -1, "-1 (no cap) or >= 1"),
            ("max_users", args.max_users < -1, "-1 (all) or >= 0"),
            ("user_stride", args.user_stride < 1, ">= 1"),
        )
        if bad
    ] + decoding_problems(args)
    if args.reentrant_checkpointing and not args.gradient_checkpointing:
        problems.append("--reentrant_checkpointing needs --gradient_checkpointing")
    if problems:
        raise UserError("; ".join(problems))


def check_answer_window(model, args: argparse.Namespace) -> None:
    """Scoring and constrained decoding pack answers behind their prompts under a mask of their
    own, which a sliding attention window shorter than a prompt would not hold: refused as soon
    as the model is loaded, before any training."""
    window = attention_window(model)
    if args.answer_mode != "generate" and window is not None and window <= args.cut_off:
        raise UserError(
            f"--answer_mode {args.answer_mode}: this model attends through a sliding window of {window} tokens, "
            f"shorter than prompts of up to --cut_off {args.cut_off}; use --answer_mode generate or a --cut_off under {window}"
        )


def decoding_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the decoding flags (the stages' and generate.py's)."""
    return [
        f"--{name} must be {rule}"
        for name, bad, rule in (
            ("max_new_tokens", args.max_new_tokens is not None and args.max_new_tokens < 1, ">= 1"),
            ("temperature", args.do_sample and args.temperature <= 0, "> 0 with --do_sample"),
            ("top_p", args.do_sample and not 0 < args.top_p <= 1, "in (0, 1] with --do_sample"),
        )
        if bad
    ]


# peft merges a LoRA into 4-bit weights by dequantizing, adding and quantizing again: the weights
# already lie on the NF4 grid, so a change of a few percent rounds back to them (a simulation kept
# 3-11 % of a 1-3 % change), and OPPU would train every user on the base plus noise.
NO_4BIT_MERGE = (
    "--load_in_4bit: OPPU merges the task adapter into the base, and a 4-bit base rounds most of a "
    "LoRA's change away; load the base in bfloat16 (--dtype bfloat16) for OPPU and serving "
    "(task_LoRA.py trains on a 4-bit base as QLoRA does)"
)


def validate(args: argparse.Namespace) -> tuple[Task, ModelSpec]:
    """The checks every stage runs first, before reading data or loading a model."""
    task = get_task(args.task_name)
    spec = model_spec(args)
    check_spec(spec)
    if spec.load_in_4bit and args.stage == "OPPU":
        raise UserError(NO_4BIT_MERGE)
    chosen = resolve_training_defaults(args, args.stage, model_parameters(spec))
    check_args(args)
    check_answer_mode(args.answer_mode, task)
    decode_config(args, task)  # its own checks (an answer must fit in --cut_off)
    args.defaults = chosen["defaults"]
    print(
        f"{args.stage}: learning_rate {args.learning_rate:g}, batch_size {args.batch_size}, max_epoch "
        f"{args.max_epoch}, min_steps {args.min_steps} (flags not given: {chosen['defaults']} defaults for "
        f"{model_size(chosen['model_parameters'])}"
        + (")" if args.paper_defaults else "; --paper_defaults for the paper's)")
    )
    return task, spec


def model_size(parameters: int | None) -> str:
    return "a model of unknown size" if parameters is None else f"{parameters / 1e6:,.0f}M parameters"


def prediction_file(args: argparse.Namespace, task: Task, method: str) -> Path:
    """Where this run's predictions (or golds) of ``method`` go."""
    return predictions_path(args.output_dir, task, args.k, args.model_name, args.add_profile, method)


def target_modules(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(name.strip() for name in args.target_modules.split(",") if name.strip())


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(args.model_name, args.dtype, args.load_in_4bit, args.access_token, args.trust_remote_code)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        max_epoch=args.max_epoch,
        max_step=args.max_step,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        group_by_length=args.group_by_length,
        shared_prefix=args.shared_prefix,
        all_logits=args.all_logits,
        reentrant_checkpointing=args.reentrant_checkpointing,
    )


def decode_config(args: argparse.Namespace, task: Task) -> DecodeConfig:
    max_new = task.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    if args.cut_off is not None and max_new >= args.cut_off:
        raise UserError(
            f"--cut_off {args.cut_off} leaves no room for a prompt before an answer of {max_new} tokens "
            "(--max_new_tokens): raise --cut_off or lower --max_new_tokens"
        )
    return DecodeConfig(
        max_new_tokens=max_new,
        batch_size=args.decode_batch_size,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        shared_prefix=args.shared_prefix,
        cut_off=args.cut_off,
    )


def select_users(items: Sequence, args: argparse.Namespace) -> list:
    """The test users (or anything in their order) a run keeps: every --user_stride-th, then the
    first --max_users of those."""
    kept = list(items)[:: args.user_stride]
    return kept if args.max_users < 0 else kept[: args.max_users]


def load_user_profiles(folder: Path, users_file: str, profiles_file: str, users: Sequence[User]) -> list[str]:
    """The profiles of ``users`` (``load_profiles``), refused where gen_profile.py recorded that it
    made them from another version of the users' file (prepare_data has rewritten it since)."""
    record = folder / PROFILE_CONFIG_FILE
    if record.is_file():
        made_from = read_json(record).get(PROFILE_USERS_KEY, {}).get(users_file)
        if made_from is not None and made_from != file_fingerprint(folder / users_file):
            raise UserError(
                f"{folder / profiles_file}: made from an earlier {users_file} (rewritten since); "
                "run gen_profile.py again with --overwrite"
            )
    return load_profiles(folder / profiles_file, users)


def load_test_users(args: argparse.Namespace, task: Task) -> tuple[list[User], list[str | None]]:
    """The test users (see ``select_users``) and their profiles (None without --add_profile)."""
    folder = Path(args.data_dir) / task.name
    users = load_users(task, folder / TEST_USERS_FILE)
    profiles = (
        load_user_profiles(folder, TEST_USERS_FILE, TEST_PROFILES_FILE, users)
        if args.add_profile
        else [None] * len(users)
    )
    return select_users(users, args), select_users(profiles, args)


def load_other_users(args: argparse.Namespace, task: Task) -> tuple[list[User], list[str | None]]:
    """The task adapter's users (their histories may be empty: only their queries train)."""
    folder = Path(args.data_dir) / task.name
    users = load_users(task, folder / OTHER_USERS_FILE, need_history=False)
    profiles = (
        load_user_profiles(folder, OTHER_USERS_FILE, OTHER_PROFILES_FILE, users)
        if args.add_profile
        else [None] * len(users)
    )
    return users, profiles
