r"""Two trivial predictors for the classification and rating tasks, as LaMP predictions:
the global majority label (over every label the training data shows: all history items and
the other users' queries) and each user's most frequent history label. For ratings both
predict the mean rating instead (overall / of the user's history), the constant that minimises
RMSE.

Usage:
    python eval/trivial_baselines.py --task_name news_categorize --data_dir data --output_dir output
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# Run as `python eval/trivial_baselines.py`, sys.path[0] is eval/; the repo root holds oppu.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oppu.data import OTHER_USERS_FILE, TEST_USERS_FILE, User, load_users, predictions_json
from oppu.tasks import Task, get_task
from utils import UserError, run_cli, write_json

SUPPORTED = ("news_categorize", "movie_tagging", "product_rating")  # a label per history item


def most_common(labels: Sequence[str]) -> str:
    """The most frequent label; ties go to the label seen first."""
    counts = Counter(labels)
    return max(counts, key=lambda label: (counts[label], -labels.index(label)))


def typical(task: Task, labels: Sequence[str]) -> str:
    """The constant answer: the most frequent label, or for ratings the mean (4 significant digits)."""
    if task.kind == "rating":
        return f"{sum(float(x) for x in labels) / len(labels):.4g}"
    return most_common(labels)


def majority_predictions(task: Task, tests: list[User], others: list[User]) -> dict[str, str]:
    field = task.target_field
    seen = [it[field] for u in tests + others for it in u["profile"]] + [q["gold"] for u in others for q in u["query"]]
    label = typical(task, seen)
    return {q["id"]: label for u in tests for q in u["query"]}


def user_majority_predictions(task: Task, tests: list[User]) -> dict[str, str]:
    field = task.target_field
    return {q["id"]: typical(task, [it[field] for it in u["profile"]]) for u in tests for q in u["query"]}


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_name", required=True, help="news_categorize, movie_tagging or product_rating")
    parser.add_argument("--data_dir", default="./data")
    parser.add_argument("--output_dir", default="./output")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    task = get_task(args.task_name)
    if task.name not in SUPPORTED:
        raise UserError(f"--task_name {task.name}: trivial predictors exist for {', '.join(SUPPORTED)} only")
    folder = Path(args.data_dir) / task.name
    tests = load_users(task, folder / TEST_USERS_FILE)
    others = load_users(task, folder / OTHER_USERS_FILE, need_history=False)
    out = Path(args.output_dir) / task.name
    written = {}
    for name, preds in (
        ("majority", majority_predictions(task, tests, others)),
        ("user_majority", user_majority_predictions(task, tests)),
    ):
        written[name] = out / f"trivial-{name}.json"
        write_json(written[name], predictions_json(task, preds, f"trivial: {name}"))
        print(f"wrote {written[name]}")
    return written


if __name__ == "__main__":
    run_cli(main)
