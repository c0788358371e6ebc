r"""Score one task's predictions against its golds with the official LaMP metrics.

Usage:
    python eval/eval_task.py --golds_json G.json --preds_json P.json --task_name LaMP_2M \
        --output_file R.json [--per_user user_top_100_history.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Run as `python eval/eval_task.py`, sys.path[0] is eval/; the repo root holds utils and oppu.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.metrics import score
from oppu.data import lamp_outputs, load_users
from oppu.tasks import Task, get_task
from utils import UserError, ensure_writable_dir, read_json, run_cli, write_json


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golds_json", required=True, help="LaMP outputs file with the golds")
    parser.add_argument("--preds_json", required=True, help="LaMP outputs file with predictions")
    parser.add_argument("--task_name", required=True, help="task name or LaMP id, e.g. LaMP_2M")
    parser.add_argument("--output_file", required=True, help="where to write the result JSON")
    parser.add_argument("--per_user", help="per-user data file; adds each user's metrics on their query ids")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser.parse_args(argv)


def load_outputs(path: str | Path, task: Task) -> dict[str, str]:
    """Read and validate a LaMP outputs file of ``task``."""
    return lamp_outputs(read_json(path), str(path), task)


def check_ids(golds: Mapping[str, str], preds: Mapping[str, str], preds_source: str) -> None:
    """Prediction ids must equal gold ids (the official rule)."""
    missing = sorted(set(golds) - set(preds))
    extra = sorted(set(preds) - set(golds))
    if missing or extra:
        raise UserError(
            f"{preds_source}: prediction ids differ from gold ids: {len(missing)} missing "
            f"{missing[:5]}, {len(extra)} extra {extra[:5]}"
        )


def check_rating_golds(task: Task, golds: Mapping[str, str], golds_source: str) -> None:
    """LaMP-3 golds must be numbers: the farthest-rating rule needs them."""
    if task.kind != "rating":
        return
    for key, gold in golds.items():
        try:
            float(gold)
        except ValueError:
            raise UserError(f"{golds_source}: id {key!r}: gold {gold!r} is not a number") from None


def evaluate(
    task: Task,
    golds: Mapping[str, str],
    preds: Mapping[str, str],
    golds_source: str,
    preds_source: str,
) -> dict[str, Any]:
    """Check ids and golds, then score: {"task", "n", metric: value}."""
    if not golds:
        raise UserError(f"{golds_source}: no golds to score")
    check_ids(golds, preds, preds_source)
    check_rating_golds(task, golds, golds_source)
    return {"task": task.lamp_id, "n": len(golds), **score(task, golds, preds)}


def per_user_scores(
    task: Task, golds: Mapping[str, str], preds: Mapping[str, str], users_path: str | Path
) -> dict[str, dict[str, float]]:
    """Each user's metrics on their own query ids, with their count "n". Users none of whose
    queries were scored (a ``--max_users`` run) are left out; a user scored in part is an error."""
    result: dict[str, dict[str, float]] = {}
    users = load_users(task, users_path, need_gold=False, need_history=False)
    for user_id, ids in ((u["user_id"], [q["id"] for q in u["query"]]) for u in users):
        unknown = [i for i in ids if i not in golds]
        if ids and len(unknown) == len(ids):
            continue
        if unknown:
            raise UserError(f"{users_path}: user {user_id!r}: query ids without gold: {unknown[:5]}")
        metrics = score(task, {i: golds[i] for i in ids}, {i: preds[i] for i in ids}) if ids else {}
        result[user_id] = {**metrics, "n": len(ids)}
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ensure_writable_dir(Path(args.output_file).parent)
    task = get_task(args.task_name)
    golds = load_outputs(args.golds_json, task)
    preds = load_outputs(args.preds_json, task)
    result = evaluate(task, golds, preds, args.golds_json, args.preds_json)
    if args.per_user:
        result["per_user"] = per_user_scores(task, golds, preds, args.per_user)
    write_json(args.output_file, result)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    run_cli(main)
