"""Cost of each personal PEFT type (LoRA, IA3, prompt tuning) on one real HuffPost author, each
through peft's own path (``--no_shared_prefix``: every row runs its whole prompt; prompt tuning
also decodes one query at a time without the cache) and through ours (the shared prefix, with a
prompt-tuning adapter's virtual tokens in it), measured in one run; prints a table and writes
benchmarks/peft_types.json. Both paths must give the same losses and greedy answers (LoRA
dropout is off here so that they can).

Usage:
    python benchmarks/peft_types.py                      # news categorization, first author, 3 steps of 8
    python benchmarks/peft_types.py --types prompt_tuning --steps 2 --user 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import torch  # noqa: E402

import OPPU  # noqa: E402
from benchmarks.bench import make_data  # noqa: E402
from oppu import cli  # noqa: E402
from oppu.adapters import PEFT_TYPES, add_user_adapter, remove_adapter  # noqa: E402
from oppu.data import TEST_USERS_FILE, load_users  # noqa: E402
from oppu.defaults import resolve_training_defaults  # noqa: E402
from oppu.examples import history_pairs, query_prompts  # noqa: E402
from oppu.generation import generate  # noqa: E402
from oppu.modeling import ModelSpec, load_model  # noqa: E402
from oppu.tasks import get_task  # noqa: E402
from oppu.training import encode_pairs, train  # noqa: E402
from utils import write_json  # noqa: E402

PATHS = {"peft": ["--no_shared_prefix"], "ours": []}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_name", default="news_categorize", choices=("news_categorize", "news_headline"))
    parser.add_argument("--types", default=",".join(PEFT_TYPES), help="comma-separated PEFT types")
    parser.add_argument("--user", type=int, default=0, help="which test author (index in the user file)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimiser steps of --batch_size examples")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("peft_types.json"))
    return parser.parse_args(argv)


def personal_args(task_name: str, peft_type: str, flags: list[str], batch_size: int) -> argparse.Namespace:
    """OPPU.py's arguments for this PEFT type, with its defaults resolved as a run resolves them."""
    # LoRA dropout off: the two paths draw different dropout masks, so only then must they agree.
    argv = ["--task_lora", "unused", "--task_name", task_name, "--peft_type", peft_type, "--lora_dropout", "0", *flags]
    args = OPPU.parse_args([*argv, "--batch_size", str(batch_size), "--micro_batch_size", str(batch_size)])
    resolve_training_defaults(args, "OPPU", parameters=None)
    cli.resolve_personal_args(args)
    return args


def measure(model, tokenizer, task, encoded, prompts, args) -> tuple[dict, list[str]]:
    """Train a fresh adapter of ``args.peft_type`` for ``len(encoded) / batch`` steps, then answer
    ``prompts``; the figures and the answers."""
    train_cfg, decode_cfg = cli.personal_configs(args, task)
    torch.manual_seed(0)
    peft = add_user_adapter(model, tokenizer, args, cli.target_modules(args))
    warm_up = replace(train_cfg, batch_size=2, micro_batch_size=2, max_epoch=1, max_step=1)
    train(peft, tokenizer, encoded[:2], warm_up, desc="warm-up")  # first-call costs out of the timing
    start = time.perf_counter()
    fit = train(peft, tokenizer, encoded, replace(train_cfg, max_epoch=1), desc=f"{args.peft_type} train")
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    answers = generate(peft, tokenizer, prompts, decode_cfg, desc=f"{args.peft_type} answer")
    decode_s = time.perf_counter() - start
    remove_adapter(peft)
    figures = {
        "s_per_step": train_s / fit.steps,
        "examples_per_s": fit.examples / train_s,
        "queries_per_s": len(prompts) / decode_s,
        "losses": fit.losses,
        "steps": fit.steps,
        "queries": len(prompts),
    }
    return figures, answers


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    task = get_task(args.task_name)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp))
        user = load_users(task, data / task.name / TEST_USERS_FILE)[args.user]
    model, tokenizer = load_model(ModelSpec(dtype="float32"))
    encoded = encode_pairs(tokenizer, history_pairs(task, user), 2048)[: args.steps * args.batch_size]
    prompts = query_prompts(task, user, 0)
    results: dict = {
        "task": task.name,
        "examples": len(encoded),
        "queries": len(prompts),
        "threads": torch.get_num_threads(),
    }
    print(f"| PEFT | path | s per step of {args.batch_size} | queries/s | same as peft's |\n|---|---|---|---|---|")
    for peft_type in args.types.split(","):
        runs = {}
        for path, flags in PATHS.items():
            run_args = personal_args(task.name, peft_type, flags, args.batch_size)
            runs[path] = measure(model, tokenizer, task, encoded, prompts, run_args)
        (peft, peft_answers), (ours, our_answers) = runs["peft"], runs["ours"]
        same = our_answers == peft_answers and all(
            abs(a - b) <= 1e-4 * max(abs(b), 1.0) for a, b in zip(ours["losses"], peft["losses"])
        )
        results[peft_type] = {
            "peft": peft,
            "ours": ours,
            "train_speedup": peft["s_per_step"] / ours["s_per_step"],
            "decode_speedup": ours["queries_per_s"] / peft["queries_per_s"],
            "same_losses_and_answers": same,
        }
        for path, figures in (("peft", peft), ("ours", ours)):
            mark = "" if path == "peft" else ("yes" if same else "**no**")
            step, qps = figures["s_per_step"], figures["queries_per_s"]
            print(f"| {peft_type} | {path} | {step:.2f} | {qps:.2f} | {mark} |", flush=True)
    write_json(args.output, results)
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
