"""Read a grid's result user by user: why a personalized row wins or loses against its baseline.

Writes ``<work_dir>/results/<task>/analysis/<row>-vs-<baseline>/``: analysis.md, analysis.json,
gain_by_history.png (each user's difference against their history length) and, when the row is
an OPPU row, learning_curves.png (every user's training loss per step).

Usage:
    python eval/analyze_grid.py --task_name news_categorize --data_dir D --work_dir W \
        [--row OPPU --baseline non_personalized]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

# Run as `python eval/analyze_grid.py`, sys.path[0] is eval/; the repo root holds utils and oppu.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.eval_task import load_outputs
from oppu import analysis
from oppu.data import TEST_USERS_FILE, load_users
from oppu.grid import read_table
from oppu.tasks import get_task
from utils import UserError, run_cli, write_json


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_name", required=True, help="task name or LaMP id")
    parser.add_argument("--data_dir", required=True, help="the grid's data folder")
    parser.add_argument("--work_dir", required=True, help="the grid's work folder (results/<task>/table.json)")
    parser.add_argument("--row", default="OPPU", help="the personalized row")
    parser.add_argument("--baseline", default="non_personalized", help="the row it is compared with")
    parser.add_argument("--metric", help="default: the task's first metric (accuracy, MAE, rouge-1)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    task = get_task(args.task_name)
    if Path(args.work_dir).is_file():
        raise UserError(f"--work_dir {args.work_dir}: a grid's work folder, not a file")
    _, table = read_table(Path(args.work_dir), task, [args.row, args.baseline])
    rows = {name: table["rows"][name] for name in (args.row, args.baseline)}
    metric = args.metric or next(iter(rows[args.row]["metrics"]))
    if metric not in rows[args.row]["metrics"]:
        raise UserError(f"--metric {metric}: the table's metrics are {', '.join(rows[args.row]['metrics'])}")
    scored = set(rows[args.row]["per_user"])
    users = load_users(task, Path(args.data_dir) / task.name / TEST_USERS_FILE)
    users = [u for u in users if u["user_id"] in scored and u["query"]]  # no queries: no score (n 0)
    manifest = analysis.read_manifest(analysis.manifest_path(Path(rows[args.row]["predictions"]), task.name))
    scores = {name: r["per_user"] for name, r in rows.items()}
    lines = analysis.per_user_rows(users, scores, args.row, args.baseline, metric, manifest)
    split = None
    if task.is_classification and task.name != "citation":
        preds = {name: load_outputs(r["predictions"], task) for name, r in rows.items()}
        split = analysis.agreement_split(task, users, preds)
    out = (
        Path(args.work_dir)
        / "results"
        / task.name
        / "analysis"
        / re.sub(r"[^\w+-]", "_", f"{args.row}-vs-{args.baseline}")
    )
    title = f"{task.name}: {args.row} − {args.baseline} per user ({len(lines)} users)"
    written = {"gain_plot": analysis.plot_gain(lines, out / "gain_by_history.png", metric, title)}
    if manifest:
        written["curves_plot"] = analysis.plot_curves(manifest, out / "learning_curves.png", f"{task.name}: {args.row}")
    write_json(
        out / "analysis.json",
        {"row": args.row, "baseline": args.baseline, "metric": metric, "users": lines, "agreement": split},
    )
    text = analysis.markdown(lines, args.row, args.baseline, metric, split)
    (out / "analysis.md").write_text(f"# {title}\n\n{text}", encoding="utf-8")
    written |= {"json": out / "analysis.json", "md": out / "analysis.md"}
    for what, path in written.items():
        print(f"{what}: {path}")
    return written


if __name__ == "__main__":
    run_cli(main)
