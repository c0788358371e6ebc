"""Stage 0: write the per-user data of one task (from raw LaMP, from your own records, or the demo).

Usage (see data/README.md):
    python prepare_data.py demo --output_dir data
    python prepare_data.py from-lamp --task_name LaMP_2N --questions dev_questions.json \
        --outputs dev_outputs.json --output_dir data
    python prepare_data.py from-records --input ../shared/data/huffpost-news/News_Category_Dataset_v3.head9999.jsonl \
        --task_name news_categorize --user_field authors --input_field short_description \
        --output_field category --time_field date --title_field headline --queries_per_user 5 \
        --min_history 10 --num_test_users 10 --output_dir data
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from oppu.data import User, load_lamp, split_test_users, users_from_lamp, validate_users, write_user_split
from oppu.records import RecordFields, read_records, records_to_users
from oppu.tasks import TASKS, Task, get_task
from utils import UserError, ensure_writable_dir, run_cli, write_json

# The demo: small enough that the whole pipeline runs on 2 CPU cores in minutes.
DEMO_SIZES = {"num_test_users": 6, "num_other_users": 24, "history_len": 16, "queries_per_user": 4}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    lamp = sub.add_parser("from-lamp", help="raw LaMP <split>_questions.json + <split>_outputs.json")
    lamp.add_argument("--task_name", required=True, help="task name or LaMP id, e.g. LaMP_2N")
    lamp.add_argument("--questions", required=True, help="path to <split>_questions.json")
    lamp.add_argument("--outputs", required=True, help="path to <split>_outputs.json")
    lamp.add_argument("--num_test_users", type=int, default=100, help="users with the longest histories")

    rec = sub.add_parser("from-records", help="your own JSON-lines or CSV records")
    rec.add_argument("--input", required=True, help="records file (.csv, else JSON lines)")
    rec.add_argument("--task_name", required=True, help="task name or LaMP id")
    rec.add_argument("--user_field", required=True, help="field naming the user")
    rec.add_argument("--input_field", required=True, help="field with the input text (article, review, ...)")
    rec.add_argument("--output_field", required=True, help="field with the output (label, rating, title, ...)")
    rec.add_argument("--time_field", help="field to order each user's records by (else file order)")
    rec.add_argument("--title_field", help="news_categorize only: field with the article title")
    rec.add_argument("--queries_per_user", type=int, default=5, help="each user's last N records become queries")
    rec.add_argument("--min_history", type=int, default=5, help="skip users with fewer history records")
    rec.add_argument(
        "--max_history", type=int, default=0, help="keep each user's most recent N history records; 0 = all"
    )
    rec.add_argument("--num_test_users", type=int, default=100, help="users with the longest histories")
    rec.add_argument("--seed", type=int, default=0, help="citation only: seeds the reference options")

    demo = sub.add_parser("demo", help="the generated demo data of every task")
    demo.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    demo.add_argument("--seed", type=int, default=0)
    for name, value in DEMO_SIZES.items():
        demo.add_argument(f"--{name}", type=int, default=value)

    for p in (lamp, rec, demo):
        p.add_argument("--output_dir", default="data", help="writes <output_dir>/<task_name>/...")
        p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def _summary(task: Task, folder: Path, test: list[User], others: list[User]) -> str:
    def count(users: list[User], key: str) -> int:
        return sum(len(u[key]) for u in users)

    return (
        f"{task.name}: {len(test)} test users ({count(test, 'profile')} history items, "
        f"{count(test, 'query')} queries), {len(others)} other users ({count(others, 'query')} "
        f"queries) -> {folder}"
    )


def write_split(task: Task, output_dir: str, users: list[User], num_test_users: int) -> Path:
    """Validate, pick the test users, and write the task's folder. Only test users need a history
    (a personal PEFT trains on it); the others give the task adapter their queries."""
    test, others = split_test_users(validate_users(task, users, "prepared data", need_history=False), num_test_users)
    validate_users(task, test, "prepared data (test users)")
    folder = write_user_split(task, output_dir, test, others)
    print(_summary(task, folder, test, others))
    return folder


def from_lamp(args: argparse.Namespace) -> list[Path]:
    task = get_task(args.task_name)
    questions = load_lamp(task, args.questions, args.outputs)
    return [write_split(task, args.output_dir, users_from_lamp(questions), args.num_test_users)]


def from_records(args: argparse.Namespace) -> list[Path]:
    task = get_task(args.task_name)
    fields = RecordFields(args.user_field, args.input_field, args.output_field, args.time_field, args.title_field)
    records = read_records(args.input)
    users, skipped = records_to_users(
        task, records, fields, args.queries_per_user, args.min_history, args.input, args.seed, args.max_history
    )
    kept = sum(len(u["profile"]) + len(u["query"]) for u in users)
    details = ", ".join(f"{n} ({why})" for why, n in sorted(skipped.items())) or "none"
    print(f"{args.input}: {len(records)} records, {kept} kept for {len(users)} users; skipped: {details}")
    return [write_split(task, args.output_dir, users, args.num_test_users)]


def demo(args: argparse.Namespace) -> list[Path]:
    from oppu.demo_data import demo_split

    folders = []
    for name in args.tasks.split(","):
        task = get_task(name.strip())
        test, others = demo_split(
            task, args.num_test_users, args.num_other_users, args.history_len, args.queries_per_user, args.seed
        )
        folder = write_user_split(task, args.output_dir, test, others)
        print(_summary(task, folder, test, others))
        folders.append(folder)
    return folders


def check_counts(args: argparse.Namespace) -> None:
    """Every count flag checked at once, before anything is read."""
    limits = {
        "num_test_users": 0,
        "queries_per_user": 1,
        "min_history": 0,
        "max_history": 0,
        "num_other_users": 0,
        "history_len": 1,
    }
    problems = [f"--{k} must be >= {low}" for k, low in limits.items() if getattr(args, k, low) < low]
    if problems:
        raise UserError("; ".join(problems))


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    check_counts(args)
    ensure_writable_dir(args.output_dir)
    folders = {"from-lamp": from_lamp, "from-records": from_records, "demo": demo}[args.command](args)
    for folder in folders:
        write_json(folder / "prepare_config.json", {k: v for k, v in vars(args).items() if k != "debug"})
    return folders


if __name__ == "__main__":
    run_cli(main)
