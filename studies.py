"""The paper's further studies, one command each: other PEFT types, users at different activity
levels, behaviour shift, and history formats. Each runs (or reuses) the grid rows it needs, in the
same work folder as run_grid.py, and writes W/studies/<study>/<task>/table.md and table.json (and
activity.png for activity levels). Flags after `--` go to both stages, as with run_grid.py.

Usage:
    python studies.py peft_types --task_name news_categorize --data_dir data --work_dir W
    python studies.py activity --task_name news_categorize --data_dir data --work_dir W -- --max_users 3 --max_step 2
    python studies.py shift --task_name news_headline --data_dir data --work_dir W
    python studies.py formats --task_name product_rating --data_dir data --work_dir W -- --max_users 20

Rows: peft_types = non_personalized, OPPU, OPPU[ia3], OPPU[prompt_tuning]; activity =
non_personalized, RAG, OPPU, OPPU+RAG by history length; shift = RAG and OPPU+RAG with the most
and with the least relevant item retrieved; formats = non_personalized, OPPU, OPPU[plain].
Under `accelerate launch --num_processes N` the stages split their work as with run_grid.py; the
main process writes the study's files.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from oppu import studies
from oppu.grid import Grid
from oppu.tasks import get_task
from utils import UserError, run_cli


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The study's own flags, and the stage flags after ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=list(studies.STUDIES), help="which study to run")
    parser.add_argument("--task_name", required=True, help="task name or LaMP id, e.g. news_categorize")
    parser.add_argument("--data_dir", default="./data", help="folder holding <task_name>/user_*.json")
    parser.add_argument("--work_dir", required=True, help="the grid's work folder: runs are shared with run_grid.py")
    # The same stage flags as run_grid.py's: give the same ones to reuse the grid's finished rows.
    parser.add_argument("--task_lora_flags", default="", help='extra flags for task_LoRA.py only, e.g. "--max_epoch 2"')
    parser.add_argument("--oppu_flags", default="", help='extra flags for OPPU.py only, e.g. "--max_epoch 1"')
    parser.add_argument("--rows", default="", help="comma-separated subset of the study's rows (default: all)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples over users")
    parser.add_argument("--bootstrap_seed", type=int, default=0)
    parser.add_argument("--n_bins", type=int, default=studies.N_BINS, help="activity: groups by history length")
    parser.add_argument(
        "--min_bin_users", type=int, default=studies.MIN_BIN_USERS, help="activity: a smaller group joins its neighbour"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(own), stage_flags


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args, stage_flags = parse_args(argv)
    if args.resamples < 1 or args.n_bins < 1 or args.min_bin_users < 1:
        raise UserError("--resamples, --n_bins and --min_bin_users must be >= 1")
    grid = Grid(
        get_task(args.task_name),
        Path(args.data_dir),
        Path(args.work_dir),
        tuple(stage_flags),
        tuple(shlex.split(args.task_lora_flags)),
        tuple(shlex.split(args.oppu_flags)),
        resamples=args.resamples,
        bootstrap_seed=args.bootstrap_seed,
    )
    rows = [n.strip() for n in args.rows.split(",") if n.strip()]
    written = studies.run_study(args.study, grid, args.n_bins, args.min_bin_users, rows)
    for what, path in written.items():
        print(f"{what}: {path}")
    return written


if __name__ == "__main__":
    run_cli(main)
