"""Turn a user's own records (JSON lines or CSV) into the per-user format of any LaMP task."""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oppu.data import User, time_key
from oppu.tasks import Task
from prompts import render_query_input
from utils import UserError, read_jsonl


@dataclass(frozen=True)
class RecordFields:
    user: str
    input: str
    output: str
    time: str | None = None
    title: str | None = None


def read_records(path: str | Path) -> list[dict]:
    """Records from a ``.csv`` file (header row) or JSON lines (anything else)."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        return read_jsonl(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None


def normalize_output(task: Task, value: Any) -> str | None:
    """The record's label in the task's form, or None when it is outside the label set.

    Ratings are rounded to 1-5; classification labels are lower-cased.
    """
    if value is None:  # JSON null, or a CSV row with too few columns
        return None
    if task.kind == "rating":
        try:
            return str(min(5, max(1, int(float(value) + 0.5))))
        except (TypeError, ValueError, OverflowError):
            return None
    text = str(value).strip()
    if task.is_classification and task.name != "citation":  # citation records carry an abstract
        text = text.lower()
        return text if text in task.labels else None
    return text or None


def _text(value: Any) -> str:
    """A field as text: JSON null (or a CSV row too short) is empty; 0 stays "0"."""
    return "" if value is None else str(value)


def _history_item(task: Task, rec: dict, f: RecordFields, label: str, item_id: str) -> dict:
    item = dict.fromkeys(task.history_fields, "")
    if f.title and "title" in item:
        item["title"] = _text(rec[f.title])
    item[task.text_field] = str(rec[f.input])
    item[task.target_field] = label  # last: a tweet record keeps the user's tweet, not its input
    return {"id": item_id} | item


def _query(task: Task, rec: dict, f: RecordFields, label: str, qid: str, refs: tuple[str, str, bool]) -> dict:
    if task.name != "citation":
        return {"id": qid, "input": render_query_input(task, text=str(rec[f.input])), "gold": label}
    # A citation record is one of the user's papers (title, abstract), with no references:
    # the query asks which of two titles is related, one of the author's earlier papers or
    # one by another author, at a seeded position.
    related, other, first = refs
    ref1, ref2 = (related, other) if first else (other, related)
    text = render_query_input(task, title=str(rec[f.input]), ref1=ref1, ref2=ref2)
    return {"id": qid, "input": text, "gold": "[1]" if first else "[2]"}


def _citation_refs(rng: random.Random, own: list[str], pool: list[tuple[str, str]], user: str) -> tuple[str, str, bool]:
    """(one of the user's earlier titles, a title by another user, whether the related one is [1])."""
    others = [t for u, t in rng.sample(pool, min(len(pool), 20)) if u != user] or ["(no other paper)"]
    return rng.choice(own), others[0], rng.random() < 0.5


def _check_fields(records: list[dict], f: RecordFields, path: str | Path) -> None:
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i}: expected an object, got {type(rec).__name__}")
        for name in (f.user, f.input, f.output, f.time, f.title):
            if name and name not in rec:
                raise UserError(f"{path}: record {i}: missing field {name!r}")


def records_to_users(
    task: Task,
    records: list[dict],
    f: RecordFields,
    queries_per_user: int,
    min_history: int,
    path: str | Path = "records",
    seed: int = 0,
    max_history: int = 0,
) -> tuple[list[User], Counter]:
    """Group records by user, order each user's records by time (stable), and make the last
    ``queries_per_user`` of each user queries and the earlier ones history.

    Returns the users (those with at least ``min_history`` history items) and a counter of
    what was skipped and why. ``max_history`` > 0 keeps only each user's most recent
    ``max_history`` history items (after the ``min_history`` check).
    """
    _check_fields(records, f, path)
    skipped: Counter = Counter()
    by_user: dict[str, list[tuple[dict, str]]] = defaultdict(list)
    for rec in records:
        user = _text(rec[f.user]).strip()
        label = normalize_output(task, rec[f.output])
        if not user or label is None or not _text(rec[f.input]).strip():
            skipped["no user" if not user else "label outside the task" if label is None else "empty input"] += 1
            continue
        by_user[user].append((rec, label))
    rng = random.Random(seed)
    pool = [(u, str(r[f.input])) for u in sorted(by_user) for r, _ in by_user[u]]
    users, counter = [], 0
    where = f"{path}: record {{}}: field {f.time!r}"
    when = {id(rec): time_key(rec[f.time], where.format(i)) for i, rec in enumerate(records)} if f.time else {}
    for user_id in sorted(by_user):
        recs = sorted(by_user[user_id], key=lambda rl: when[id(rl[0])] if f.time else ())
        cut = max(len(recs) - queries_per_user, 0)  # recs[-0:] would make every record a query
        history, queries = recs[:cut], recs[cut:]
        if len(history) < min_history:
            skipped["records of users below --min_history"] += len(recs)
            continue
        if 0 < max_history < len(history):
            skipped["older history records beyond --max_history"] += len(history) - max_history
            history = history[-max_history:]
        items, qs = [], []
        for rec, label in history:
            items.append(_history_item(task, rec, f, label, f"{counter}"))
            counter += 1
        own = [str(r[f.input]) for r, _ in history] or [""]
        for rec, label in queries:
            refs = _citation_refs(rng, own, pool, user_id) if task.name == "citation" else ("", "", True)
            qs.append(_query(task, rec, f, label, f"{counter}", refs))
            counter += 1
        users.append({"user_id": user_id, "profile": items, "query": qs})
    return users, skipped
