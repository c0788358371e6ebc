"""The whole OPPU pipeline on the generated demo data with the embedded model, then a table.

Usage (README quick start, command 1):
    make demo          # = set up .venv, then: python demo.py --quick (one task, 3 users; under 5 minutes)
    make demo-all      # = set up .venv, then: python demo.py (three tasks, 4 users each; about 17 minutes)
    python demo.py --tasks news_categorize --work_dir /tmp/oppu-demo
    python demo.py --seed 1 --work_dir /tmp/val -- --paper_defaults   # other users; flags go to both stages

For each demo task: prepare the data, train the task adapter (and answer with the base model
and with the task adapter), run OPPU, score all three with eval/eval_task.py. The stages run on
their defaults (for the embedded model: docs/defaults.md), as a newcomer's first run would.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import OPPU
import prepare_data
import task_LoRA
from eval import eval_task
from oppu.modeling import EMBEDDED_MODEL
from oppu.runs import predictions_path, task_lora_dir
from oppu.tasks import get_task
from utils import run_cli, write_json

DEMO_TASKS = "news_categorize,product_rating,news_headline"
# --quick: the first run a newcomer makes. One task and 3 test users take 4.5 minutes on a 2-core
# CPU (README quick start); the three tasks with 4 users each take 16.8.
FULL = {"tasks": DEMO_TASKS, "num_test_users": 4, "work_dir": "demo_run"}
QUICK = {"tasks": "news_categorize", "num_test_users": 3, "work_dir": "demo_run/quick"}
METHODS = ("base", "task_LoRA", "OPPU")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="news categorization with 3 test users (under 5 minutes)")
    parser.add_argument("--tasks", default=None, help=f"comma-separated demo tasks (default {DEMO_TASKS})")
    parser.add_argument(
        "--work_dir",
        default=None,
        help="data, ckpt, output and results go here (default demo_run, demo_run/quick with --quick)",
    )
    parser.add_argument("--num_test_users", type=int, default=None, help="default 4 (3 with --quick)")
    parser.add_argument("--num_other_users", type=int, default=16)
    parser.add_argument("--history_len", type=int, default=12)
    parser.add_argument("--queries_per_user", type=int, default=4)
    parser.add_argument("--max_users", type=int, default=-1, help="only the first N test users")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("stage_flags", nargs="*", help="after --: flags for both stages (e.g. -- --paper_defaults)")
    args = parser.parse_args(argv)
    chosen = QUICK if args.quick else FULL
    for name, value in chosen.items():
        if getattr(args, name) is None:  # a flag given wins
            setattr(args, name, value)
    return args


def run_task(name: str, work: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    task = get_task(name)
    dirs = ["--data_dir", str(work / "data"), "--ckpt_dir", str(work / "ckpt"), "--output_dir", str(work / "output")]
    common = ["--task_name", task.name, "--k", "0", "--seed", str(args.seed), "--max_users", str(args.max_users)] + dirs
    task_LoRA.main(common + args.stage_flags + ["--predict_base"])
    adapter = task_lora_dir(work / "ckpt", task, 0, EMBEDDED_MODEL, False)
    OPPU.main(common + args.stage_flags + ["--task_lora", str(adapter)])
    scores = {}
    for method in METHODS:
        preds = predictions_path(work / "output", task, 0, EMBEDDED_MODEL, False, method)
        golds = preds.with_suffix(".golds.json")
        result = work / "results" / f"{task.name}-{method}.json"
        scores[method] = eval_task.main(
            [
                "--golds_json",
                str(golds),
                "--preds_json",
                str(preds),
                "--task_name",
                task.lamp_id,
                "--output_file",
                str(result),
            ]
        )
    return scores


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A Markdown table: one row per task and metric, one column per method."""
    lines = ["| task | metric | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for name, scores in results.items():
        metrics = [m for m in scores["base"] if m not in ("task", "n", "per_user")]
        for metric in metrics:
            cells = " | ".join(f"{scores[m][metric]:.3f}" for m in METHODS)
            lines.append(f"| {get_task(name).lamp_id} {name} | {metric} | {cells} |")
    return "\n".join(lines)


def prepare_demo_data(args: argparse.Namespace, data_dir: Path) -> None:
    """The demo's data for ``args.tasks`` at its sizes and seed, written to ``data_dir``."""
    sizes = {
        "--num_test_users": args.num_test_users,
        "--num_other_users": args.num_other_users,
        "--history_len": args.history_len,
        "--queries_per_user": args.queries_per_user,
    }
    flags = [str(x) for pair in sizes.items() for x in pair]
    prepare_data.main(["demo", "--output_dir", str(data_dir), "--tasks", args.tasks, "--seed", str(args.seed), *flags])


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.time()
    work = Path(args.work_dir)
    tasks = args.tasks.split(",")
    print(
        f"demo: {', '.join(tasks)}; {args.num_test_users} test users each, into {work} "
        "(on the 2-core development machine: 4.5 minutes for --quick's one task, 16.8 for the three)"
    )
    prepare_demo_data(args, work / "data")
    results = {name: run_task(name, work, args) for name in tasks}
    text = table(results)
    minutes = (time.time() - start) / 60
    print(f"\n{text}\n\n(base = {EMBEDDED_MODEL} without adapters; {minutes:.1f} minutes)")
    print(f"written to {work / 'results'}; each user's adapter and manifest line under {work / 'ckpt'}")
    if args.quick:
        print(
            "next: `make demo-all` (three tasks); the paper's table of methods: README, 'The paper's table and studies'"
        )
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / "table.md").write_text(text + "\n", encoding="utf-8")
    write_json(work / "results" / "scores.json", results)
    return results


if __name__ == "__main__":
    run_cli(main)
