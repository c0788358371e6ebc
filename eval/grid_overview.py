"""Every task's grid in one table: a line per row, a column per task (its first metric with the
95% interval), from ``<work_dir>/results/<task>/table.json`` as run_grid.py writes them.

Usage:
    python eval/grid_overview.py --work_dir W [--tasks news_categorize,news_headline]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# Run as `python eval/grid_overview.py`, sys.path[0] is eval/; the repo root holds utils and oppu.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oppu.grid import overview_markdown
from oppu.tasks import TASKS, get_task
from utils import UserError, read_json, run_cli


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="the grids' work folder")
    parser.add_argument("--tasks", default="", help="comma-separated tasks (default: every task with a table)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = parser.parse_args(argv)
    results = Path(args.work_dir) / "results"
    names = [get_task(n.strip()).name for n in args.tasks.split(",") if n.strip()]
    names = names or [n for n in TASKS if (results / n / "table.json").is_file()]
    missing = [str(results / n / "table.json") for n in names if not (results / n / "table.json").is_file()]
    if missing or not names:
        raise UserError(
            f"no grid table: {', '.join(missing) or results / '<task>' / 'table.json'}; run run_grid.py first"
        )
    text = overview_markdown({n: read_json(results / n / "table.json") for n in names})
    out = results / "overview.md"
    out.write_text(text, encoding="utf-8")
    print(text + f"\nwrote {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
