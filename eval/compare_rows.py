r"""Compare two finished rows on the same users, from one grid or from two, or from a study:
e.g. the defaults' OPPU against a hand-tuned OPPU run as a second grid on the same data, or a
study's row against a grid's.

A row is named SOURCE:ROW, where SOURCE is a work folder (its grid's results/<task>/table.json)
or a table.json file, a grid's or a study's (W/studies/<study>/<task>/table.json).

Prints (and with --output_file writes as JSON) both rows with their 95% intervals and the paired
difference ROW − BASELINE: each metric's difference, its bootstrap interval over users (the same
resampled users for both rows) and how many users gained, lost or tied, as run_grid.py's table.
Rows scored on different users (a study run with --user_stride 2 against the whole grid) are
compared on the users both scored with --common_users, both rows scored again on those users.
A row whose table recorded its predictions file's hash is refused if that file has changed since.

Usage:
    python eval/compare_rows.py --task_name news_categorize --data_dir D \
        --row W_defaults:OPPU --baseline W_hand:OPPU [--output_file compare.json]
    python eval/compare_rows.py --task_name news_headline --data_dir D --common_users \
        --row "W/studies/shift/news_headline/table.json:OPPU+RAG[least]" --baseline W:OPPU+RAG
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as `python eval/compare_rows.py`, sys.path[0] is eval/; the repo root holds utils and oppu.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oppu import grid as g
from oppu.data import TEST_USERS_FILE, load_users
from oppu.runs import file_fingerprint
from oppu.tasks import Task, get_task
from utils import UserError, run_cli, write_json


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_name", required=True, help="task name or LaMP id")
    parser.add_argument("--data_dir", required=True, help="the data folder both rows ran on")
    parser.add_argument(
        "--row",
        required=True,
        help="SOURCE:ROW, e.g. W:OPPU (a finished row of W's grid) or W/studies/shift/T/table.json:RAG[least]",
    )
    parser.add_argument("--baseline", required=True, help="SOURCE:ROW it is compared with")
    parser.add_argument(
        "--common_users",
        action="store_true",
        help="rows scored on different users: compare (and score) both on the users both scored",
    )
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the users")
    parser.add_argument("--bootstrap_seed", type=int, default=0)
    parser.add_argument("--output_file", help="also write the comparison here as JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def load_row(task: Task, spec: str, users_file: Path, flag: str) -> dict[str, Any]:
    """The scored row named by ``SOURCE:ROW`` from that grid's or study's table.json, checked to
    be scored on ``users_file`` as it is now, from its predictions file as it is now."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise UserError(f"{flag} {spec}: expected SOURCE:ROW (a work folder or a table.json), e.g. W:OPPU")
    table_file, table = g.read_table(Path(source), task, [name])
    config = table.get("config") if isinstance(table.get("config"), dict) else {}
    if (config.get("data_sha256") or {}).get(TEST_USERS_FILE) != file_fingerprint(users_file):
        raise UserError(f"{table_file}: row {name!r} was scored on another {TEST_USERS_FILE} than {users_file}")
    row = table["rows"][name]
    predictions, scored = Path(row["predictions"]), row.get("predictions_sha256")
    if not predictions.is_file():
        raise UserError(f"{table_file}: row {name!r}'s predictions {predictions}: no such file")
    if scored is not None and scored != file_fingerprint(predictions):
        raise UserError(
            f"{predictions}: changed since {table_file} scored row {name!r}; run that grid again to score it"
        )
    return row


def scored_users(row: dict[str, Any]) -> set[str]:
    """The users a row has scores for (per-user scores list a user without queries as n 0)."""
    return {u for u, s in row["per_user"].items() if s.get("n", 1)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    task = get_task(args.task_name)
    users_file = Path(args.data_dir) / task.name / TEST_USERS_FILE
    if not users_file.is_file():
        raise UserError(f"{users_file}: no such file")
    row = load_row(task, args.row, users_file, "--row")
    baseline = load_row(task, args.baseline, users_file, "--baseline")
    mine, theirs = scored_users(row), scored_users(baseline)
    # as the grid scores: users without queries have no score to resample
    users = [u for u in load_users(task, users_file, need_gold=True) if u["user_id"] in mine & theirs and u["query"]]
    extra: dict[str, Any] = {}  # what the comparison adds to the two rows and their difference
    if mine != theirs:
        if not args.common_users:
            raise UserError(
                f"--row {args.row} and --baseline {args.baseline} were scored on different users "
                f"({len(mine)} and {len(theirs)}): give both runs the same --max_users and --user_stride, "
                "or compare them on the users both scored with --common_users"
            )
        if not users:
            raise UserError(f"--row {args.row} and --baseline {args.baseline} have no scored user in common")
        print(
            f"note: on the {len(users)} users both rows scored ({len(mine)} and {len(theirs)}); "
            "the seconds are each whole row's",
            file=sys.stderr,
        )
        row, baseline = (on_users(task, r, users, users_file, args) for r in (row, baseline))
        extra["common_users"] = [u["user_id"] for u in users]
    diff = g.paired_rows(task, users, row, baseline, args.resamples, args.bootstrap_seed)
    table = {
        "rows": {args.row: row, args.baseline: baseline},
        "paired": [{"row": args.row, "baseline": args.baseline, "metrics": diff}],
    } | extra
    print(g.markdown_table(table), end="")
    if args.output_file:
        write_json(Path(args.output_file), table)
    return table


def on_users(
    task: Task, row: dict[str, Any], users: list, users_file: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """``row`` scored again on ``users`` only (its seconds and config kept)."""
    scores = g.score_predictions(task, users, users_file, Path(row["predictions"]), args.resamples, args.bootstrap_seed)
    return row | scores


if __name__ == "__main__":
    run_cli(main)
