"""Write each user's textual profile (the paper's PAG input) by prompting an LLM with a seeded
sample of the user's history: profile_user_100.json and profile_user_others.json, one
{"user_id", "output"} per user in the order of the user files.

Usage:
    python gen_profile.py --task_name news_categorize --data_dir data
    python gen_profile.py --task_name LaMP_2M --model_name meta-llama/Llama-2-7b-hf --access_token $HF_TOKEN
    python gen_profile.py --task_name news_categorize --max_users 3   # the first 3 users of each file

A killed run resumes: rerun the same command and users already profiled are kept. The stages
need complete files (--add_profile), so --max_users is for trying a model or the instructions.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from oppu import cli
from oppu.data import (
    OTHER_PROFILES_FILE,
    OTHER_USERS_FILE,
    PROFILE_CONFIG_FILE,
    PROFILE_USERS_KEY,
    TEST_PROFILES_FILE,
    TEST_USERS_FILE,
    load_users,
)
from oppu.generation import DecodeConfig
from oppu.modeling import EMBEDDED_MODEL, check_spec, load_model
from oppu.profiles import ProfileCounts, generate_profiles, label_mentions, profile_file, read_aligned
from oppu.runs import config_differences, file_fingerprint, public_config
from oppu.tasks import Task, get_task
from utils import UserError, ensure_writable_dir, read_json, run_cli, set_seed, write_json

FILES = ((TEST_USERS_FILE, TEST_PROFILES_FILE), (OTHER_USERS_FILE, OTHER_PROFILES_FILE))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_name", required=True, help="task name or LaMP id, e.g. news_categorize or LaMP_2N")
    parser.add_argument("--data_dir", default="./data", help="folder holding <task_name>/user_*.json")
    parser.add_argument("--model_name", default=EMBEDDED_MODEL, help="the LLM that writes profiles (hub id or folder)")
    parser.add_argument("--access_token", default=None, help="hub token for gated models (never logged or saved)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--load_in_4bit", action="store_true", help="4-bit NF4 base weights (CUDA only)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub")
    parser.add_argument(
        "--num_history",
        type=int,
        default=10,
        help="history items shown per user (the paper: ~10); the oldest go where they would not fit in the model's context",
    )
    parser.add_argument("--seed", type=int, default=42, help="picks each user's sample (and seeds retries)")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="profile length budget")
    parser.add_argument("--decode_batch_size", type=int, default=8, help="users per generate call")
    parser.add_argument("--max_users", type=int, default=-1, help="only the first N users of each file; -1 = all")
    parser.add_argument("--overwrite", action="store_true", help="regenerate every profile instead of resuming")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    problems = [
        f"--{name} must be {rule}"
        for name, bad, rule in (
            ("num_history", args.num_history < 1, ">= 1"),
            ("max_new_tokens", args.max_new_tokens < 1, ">= 1"),
            ("decode_batch_size", args.decode_batch_size < 1, ">= 1"),
            ("max_users", args.max_users < -1, "-1 or >= 0"),
        )
        if bad
    ]
    if problems:
        raise UserError("; ".join(problems))


def check_config(path: Path, config: dict, resuming: bool) -> None:
    """Profiles kept from an earlier run must come from the same model, sample and budget."""
    if not resuming or not path.is_file():
        return
    old = read_json(path)
    # a config written before the user files' hashes were recorded cannot tell; it is kept
    diff = [k for k in config_differences(old, config) if k in old or k != PROFILE_USERS_KEY]
    if PROFILE_USERS_KEY in diff:
        raise UserError(f"{path}: the profiles here were made from other user files in this folder; use --overwrite")
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff[:4])
        raise UserError(f"{path}: the profiles here were made with another config ({shown}); use --overwrite")


def profile_config(args: argparse.Namespace, task: Task, folder: Path) -> dict:
    """What the profiles in ``folder`` depend on: the settings (data_dir left out, the config
    sits in the folder it describes) and the user files' hashes, so that profiles of histories
    that prepare_data has since rewritten are not kept."""
    config = {k: v for k, v in public_config(vars(args)).items() if k != "data_dir"} | {"task_name": task.name}
    return config | {PROFILE_USERS_KEY: {name: file_fingerprint(folder / name) for name, _ in FILES}}


def wanted(num_users: int, max_users: int) -> int:
    return num_users if max_users < 0 else min(num_users, max_users)


def report_labels(task: Task, folder: Path, users: dict[str, list]) -> None:
    """For classification tasks: how many profiles name a label, and the user's usual one."""
    for name, out in FILES:
        entries = read_aligned(folder / out, users[name])
        m = label_mentions(task, users[name][: len(entries)], [e["output"] for e in entries])
        if m is not None:
            print(
                f"{folder / out}: of {m.profiles} profiles, {m.any_label} name a label of the task "
                f"and {m.usual_label} the user's most frequent history label"
            )


def main(argv: Sequence[str] | None = None) -> dict[str, ProfileCounts]:
    args = parse_args(argv)
    check_args(args)
    task = get_task(args.task_name)
    spec = cli.model_spec(args)
    check_spec(spec)
    folder = Path(args.data_dir) / task.name
    users = {name: load_users(task, folder / name, need_history=False) for name, _ in FILES}
    ensure_writable_dir(folder)
    existing = {} if args.overwrite else {out: read_aligned(folder / out, users[name]) for name, out in FILES}
    config = profile_config(args, task, folder)
    check_config(folder / PROFILE_CONFIG_FILE, config, any(existing.values()))
    if all(len(existing.get(out, [])) >= wanted(len(users[name]), args.max_users) for name, out in FILES):
        print(f"every profile is already in {folder} (--overwrite regenerates them)")
        report_labels(task, folder, users)
        return {out: ProfileCounts(kept=len(existing.get(out, []))) for _, out in FILES}

    model, tokenizer = load_model(spec)
    set_seed(args.seed)
    decode = DecodeConfig(max_new_tokens=args.max_new_tokens, batch_size=args.decode_batch_size)
    if args.overwrite:  # the old profiles go before the config names the new run as their maker:
        for _, out in FILES:  # a run killed half-way must not leave them under the new config
            (folder / out).unlink(missing_ok=True)
    write_json(folder / PROFILE_CONFIG_FILE, config)

    def make(batch):
        return generate_profiles(model, tokenizer, task, batch, args.num_history, args.seed, decode)

    counts = {}
    for name, out in FILES:
        counts[out] = c = profile_file(
            folder / out, users[name], make, args.decode_batch_size, args.max_users, args.overwrite
        )
        print(f"{folder / out}: {c.written} written, {c.kept} kept, {c.retried} retried, {c.empty} empty")
    report_labels(task, folder, users)
    return counts


if __name__ == "__main__":
    run_cli(main)
