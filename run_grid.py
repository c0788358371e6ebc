"""The paper's main table for one task in one command: every method row on the same users,
scored the same way, with 95% bootstrap intervals over users and paired differences.

Usage:
    python run_grid.py --task_name news_categorize --data_dir data --work_dir W
    python run_grid.py --task_name news_categorize --data_dir data --work_dir W --rows non_personalized,OPPU -- --max_users 2 --max_step 2
    python run_grid.py --task_name news_headline --data_dir data --work_dir W \
        --task_lora_flags "--max_epoch 2" --oppu_flags "--max_epoch 1" -- --learning_rate 1e-3

Flags after `--` go to both stages (task_LoRA.py and OPPU.py). Rows: base, global_majority,
user_majority, non_personalized, RAG, PAG, OPPU, OPPU+RAG, OPPU+PAG (see docs/grid.md).
Writes W/results/<task>/table.md and table.json, with every row finished in W under the same
config (so calls with different --rows add up to one table); a rerun skips the rows already finished with
the same config, and the stages resume (finished users, the task adapter of each setting).
Under `accelerate launch --num_processes N` the stages split their work as they do alone (the
task adapter data-parallel, OPPU's users by expected cost); the main process writes profiles and tables.
"""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from oppu import grid as g
from oppu.tasks import get_task
from utils import UserError, run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(argv or [])
    own, stage = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_name", required=True, help="task name or LaMP id, e.g. news_categorize or LaMP_2N")
    parser.add_argument("--data_dir", default="./data", help="folder holding <task_name>/user_*.json")
    parser.add_argument("--work_dir", required=True, help="ckpt/, output/ and results/<task>/ go here")
    parser.add_argument(
        "--rows",
        default=",".join(g.PAPER_ROWS),
        help=f"comma-separated rows (default: the paper's); known: {', '.join(g.ROWS)}",
    )
    parser.add_argument("--task_lora_flags", default="", help='extra flags for task_LoRA.py only, e.g. "--max_epoch 2"')
    parser.add_argument("--oppu_flags", default="", help='extra flags for OPPU.py only, e.g. "--max_epoch 1"')
    parser.add_argument(
        "--profile_flags", default="", help='extra flags for gen_profile.py (PAG rows), e.g. "--num_history 5"'
    )
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the users")
    parser.add_argument("--bootstrap_seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = parser.parse_args(own)
    args.stage_flags = stage
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.resamples < 1:
        raise UserError("--resamples must be >= 1")
    task = get_task(args.task_name)
    grid = g.Grid(
        task,
        Path(args.data_dir),
        Path(args.work_dir),
        tuple(args.stage_flags),
        tuple(shlex.split(args.task_lora_flags)),
        tuple(shlex.split(args.oppu_flags)),
        tuple(shlex.split(args.profile_flags)),
        args.resamples,
        args.bootstrap_seed,
    )
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    skipped = {n: why for n in names if (why := g.applicable(task, n))}
    for name, why in skipped.items():
        print(f"row {name}: left out ({why})")
    start = time.time()
    records = g.run_rows(grid, [n for n in names if n not in skipped])
    if not g.processes().is_main_process:  # under `accelerate launch`, the main process scores
        return {}
    rows = g.table_records(grid, records)
    if extra := [n for n in rows if n not in records]:
        print(f"the table also holds rows finished earlier under the same config: {', '.join(extra)}")
    table = g.score_grid(grid, rows, skipped)
    json_path, md_path = g.write_tables(grid, table)
    print("\n" + g.markdown_table(table))
    print(f"wrote {md_path} and {json_path} ({time.time() - start:.0f} s)")
    return table


if __name__ == "__main__":
    run_cli(main)
