"""The bench's paper configuration against the paper release's own training settings, end to end.

The bench's paper configuration follows the issue that asked for it: batch 16 padded per batch
in a plain shuffle, gradient checkpointing, the paper's sampling. The release itself
(``OPPU.py`` of the paper's code) also set transformers' ``group_by_length=True`` (batches of
similar length), computed its loss through transformers with -100 labels, which projects every
position onto the vocabulary (``--all_logits`` here), and checkpointed with torch's reentrant
checkpoint (``--reentrant_checkpointing``; transformers and torch 2.0.1 of early 2024). This runs
``OPPU.py`` in a child process (``benchmarks.bench.run_oppu``) in each configuration, in turn,
``--rounds`` times: the bench's paper configuration, it with ``--all_logits``, the release's
(all three), and ours; prints seconds per user and writes benchmarks/release_config.json.

Usage:
    python benchmarks/release_config.py                 # 1 user, 64 history items, 2 rounds
    python benchmarks/release_config.py --users 3 --items 16 --rounds 1 --configurations paper,release,ours
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import torch  # noqa: E402

from benchmarks.bench import OURS_OPPU, PAPER_OPPU, lora_args, make_data, run_oppu, short_histories  # noqa: E402
from oppu.adapters import TASK_TARGETS, add_adapter, lora_config, save_adapter  # noqa: E402
from oppu.modeling import ModelSpec, load_model  # noqa: E402
from utils import UserError, run_cli, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATIONS = {
    "paper": PAPER_OPPU,
    "paper_all_logits": [*PAPER_OPPU, "--all_logits"],
    "release": [f for f in PAPER_OPPU if f != "--no_group_by_length"] + ["--all_logits", "--reentrant_checkpointing"],
    "ours": OURS_OPPU,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1, help="the first news categorization test users")
    parser.add_argument("--items", type=int, default=64, help="each cut to its first N history items")
    parser.add_argument("--rounds", type=int, default=2, help="every configuration this many times, in turn")
    parser.add_argument(
        "--configurations", default=",".join(CONFIGURATIONS), help=f"comma-separated, of {', '.join(CONFIGURATIONS)}"
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "release_config.json"))
    parser.add_argument("--work_dir", default=None, help="data and checkpoints (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    chosen = {name: CONFIGURATIONS[name] for name in args.configurations.split(",") if name in CONFIGURATIONS}
    unknown = set(args.configurations.split(",")) - set(CONFIGURATIONS)
    if unknown or "ours" not in chosen:
        raise UserError(f"--configurations: unknown {sorted(unknown)} or no 'ours' (the ratios' base)")
    with tempfile.TemporaryDirectory(prefix="oppu-release-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_data(work)
        model, _ = load_model(ModelSpec())
        torch.manual_seed(0)  # a fresh task adapter (B = 0): speed does not depend on what it learnt
        peft = add_adapter(model, lora_config(lora_args(), TASK_TARGETS))
        save_adapter(peft, work / "task_adapter")
        del model, peft
        short = short_histories(data, work / "data-e2e", args.users, args.items)
        runs: dict[str, list[dict]] = {name: [] for name in chosen}
        print("| configuration | round | s per user (training + answering) | peak RSS, GB |\n|---|---|---|---|")
        for round_ in range(args.rounds):
            for name, flags in chosen.items():
                r = run_oppu(work, short, work / "task_adapter", f"{name}-{round_}", flags)
                runs[name].append(r)
                figures = f"{r['seconds_per_user']:.1f} ({r['train_seconds_per_user']:.1f} + {r['answer_seconds_per_user']:.2f})"
                print(f"| {name} | {round_ + 1} | {figures} | {r['peak_rss_gb']:.2f} |", flush=True)
    results = {
        "config": vars(args) | {"threads": torch.get_num_threads(), "flags": chosen},
        "runs": runs,
        # each round's ratio: the configurations of one round ran minutes apart
        "over_ours": {
            name: [r["seconds_per_user"] / o["seconds_per_user"] for r, o in zip(runs[name], runs["ours"])]
            for name in chosen
            if name != "ours"
        },
    }
    write_json(args.output, results)
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    run_cli(main)
