"""Data formats: raw LaMP files, the per-user format, profiles and LaMP predictions.

Per-user format (one file per split of users), as in the paper's release::

    [{"user_id": "u1", "profile": [{"id", <task history fields>}],
      "query": [{"id", "input", "gold"}]}]

Validation runs before any model is loaded and reports the file, the record and the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oppu.tasks import Task, get_task
from utils import UserError, read_json, write_json

TEST_USERS_FILE = "user_top_100_history.json"
OTHER_USERS_FILE = "user_others.json"
TEST_PROFILES_FILE = "profile_user_100.json"
OTHER_PROFILES_FILE = "profile_user_others.json"
PROFILE_CONFIG_FILE = "profile_config.json"  # gen_profile.py's settings, beside the profiles
PROFILE_USERS_KEY = "users_sha256"  # in it: each user file's fingerprint when its profiles were made
GOLDS_FILE = "test_golds.json"

User = dict[str, Any]


def _field(record: Any, field: str, where: str, types: tuple[type, ...] = (str,)) -> Any:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object, got {type(record).__name__}")
    if field not in record:
        raise UserError(f"{where}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in types)
        raise UserError(f"{where}: field {field!r} must be {names}, got {type(value).__name__}")
    return value


def _as_id(record: Any, field: str, where: str) -> str:
    return str(_field(record, field, where, (str, int)))


def validate_history_item(task: Task, item: Any, where: str) -> dict[str, str]:
    """Check one history item and return it with ``id`` and every text field as ``str``."""
    clean = {"id": _as_id(item, "id", where)}
    for name in task.history_fields:
        types = (str, int, float) if name == "score" else (str,)
        clean[name] = str(_field(item, name, where, types))
    return clean


def validate_users(
    task: Task, users: Any, path: str | Path, need_gold: bool = True, need_history: bool = True
) -> list[User]:
    """Validate a per-user file's content; return users with string ids.

    Every query id must be unique within the file, and (for test users) every user needs a
    non-empty history.
    """
    if not isinstance(users, list):
        raise UserError(f"{path}: expected a list of users, got {type(users).__name__}")
    seen_users: set[str] = set()
    seen_queries: dict[str, int] = {}
    clean_users = []
    for u, user in enumerate(users):
        where = f"{path}: user {u}"
        user_id = _as_id(user, "user_id", where)
        if user_id in seen_users:
            raise UserError(f"{where}: duplicate user_id {user_id!r}")
        seen_users.add(user_id)
        history = _field(user, "profile", where, (list,))
        if need_history and not history:
            raise UserError(f"{where} ({user_id}): field 'profile' is empty: no history to train on")
        items = [validate_history_item(task, it, f"{where} profile item {i}") for i, it in enumerate(history)]
        queries = []
        for q, query in enumerate(_field(user, "query", where, (list,))):
            qwhere = f"{where} query {q}"
            clean = {"id": _as_id(query, "id", qwhere), "input": _field(query, "input", qwhere)}
            if need_gold:
                clean["gold"] = str(_field(query, "gold", qwhere, (str, int, float)))
            if clean["id"] in seen_queries:
                raise UserError(
                    f"{qwhere}: duplicate query id {clean['id']!r} (also in user {seen_queries[clean['id']]})"
                )
            seen_queries[clean["id"]] = u
            queries.append(clean)
        clean_users.append({"user_id": user_id, "profile": items, "query": queries})
    return clean_users


def load_users(task: Task, path: str | Path, need_gold: bool = True, need_history: bool = True) -> list[User]:
    """Read and validate a per-user file."""
    return validate_users(task, read_json(path), path, need_gold, need_history)


def load_profiles(path: str | Path, users: Sequence[User]) -> list[str]:
    """Read a profile file (one ``{"output": text}`` per user, in the users' order).

    An entry may also carry ``user_id``; where it does, it must match.
    """
    entries = read_json(path)
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected a list of profiles, got {type(entries).__name__}")
    if len(entries) != len(users):
        raise UserError(f"{path}: {len(entries)} profiles for {len(users)} users; they must line up one to one")
    profiles = []
    for i, (entry, user) in enumerate(zip(entries, users)):
        text = _field(entry, "output", f"{path}: profile {i}")
        if "user_id" in entry and str(entry["user_id"]) != user["user_id"]:
            raise UserError(
                f"{path}: profile {i}: user_id {entry['user_id']!r} does not match user {user['user_id']!r}"
            )
        profiles.append(text)
    return profiles


def golds_of(task: Task, users: Iterable[User]) -> dict:
    """The LaMP outputs file (``{"task", "golds"}``) for the users' queries."""
    golds = [{"id": q["id"], "output": q["gold"]} for u in users for q in u["query"]]
    return {"task": task.lamp_id, "golds": golds}


def predictions_json(task: Task, predictions: dict[str, str], model: str) -> dict:
    """Predictions in the LaMP convention (the key is ``golds`` even for predictions)."""
    golds = [{"id": qid, "output": out} for qid, out in predictions.items()]
    return {"task": task.lamp_id, "golds": golds, "model": model}


def write_user_split(task: Task, out_dir: str | Path, test_users: list[User], other_users: list[User]) -> Path:
    """Write the per-user files and the test users' gold file into ``out_dir/<task_name>``."""
    folder = Path(out_dir) / task.name
    write_json(folder / TEST_USERS_FILE, test_users)
    write_json(folder / OTHER_USERS_FILE, other_users)
    write_json(folder / GOLDS_FILE, golds_of(task, test_users))
    return folder


def _lamp_questions(task: Task, path: Path) -> list[dict]:
    questions = read_json(path)
    if not isinstance(questions, list):
        raise UserError(f"{path}: expected a list of questions, got {type(questions).__name__}")
    for i, q in enumerate(questions):
        where = f"{path}: question {i}"
        _as_id(q, "id", where), _field(q, "input", where), _field(q, "profile", where, (list,))
    return questions


def file_task(data: Mapping[str, Any], source: str) -> Task | None:
    """The task named by a LaMP outputs file's optional "task" field."""
    if "task" not in data:
        return None
    name = data["task"]
    if not isinstance(name, str):
        raise UserError(f"{source}: field 'task' must be a string, got {type(name).__name__}")
    try:
        return get_task(name)
    except UserError:
        raise UserError(f"{source}: unknown task {name!r} in field 'task'") from None


def check_record(record: Any, index: int, source: str) -> tuple[str, str]:
    """The (id, output) of one record of a "golds" list."""
    where = f"{source}: golds[{index}]"
    if not isinstance(record, dict):
        raise UserError(f"{where}: must be an object, got {type(record).__name__}")
    for field in ("id", "output"):
        if field not in record:
            raise UserError(f"{where}: field {field!r} is missing")
        if not isinstance(record[field], str):
            kind = type(record[field]).__name__
            raise UserError(f"{where}: field {field!r} must be a string, got {kind}")
    return record["id"], record["output"]


def lamp_outputs(data: Any, source: str, task: Task) -> dict[str, str]:
    """Validate parsed LaMP outputs (golds or predictions) of ``task`` and map id -> output."""
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise UserError(f"{source}: expected an object with a 'golds' list")
    named = file_task(data, source)
    if named is not None and named != task:
        raise UserError(f"{source}: field 'task' is {named.lamp_id!r}, not {task.lamp_id}")
    outputs: dict[str, str] = {}
    for index, record in enumerate(data["golds"]):
        key, output = check_record(record, index, source)
        if key in outputs:
            raise UserError(f"{source}: golds[{index}]: duplicate id {key!r}")
        outputs[key] = output
    return outputs


def _lamp_outputs(task: Task, path: Path) -> dict[str, str]:
    return lamp_outputs(read_json(path), str(path), task)


def time_key(value: Any, where: str) -> tuple[int, float]:
    """Sort key of a record's time: a number (numeric CSV strings too) by value, since "10" < "9"
    as text, or an ISO date or date-time (a time without zone is taken as UTC), after the numbers.
    Any other text is an error: "10/1/2021" would sort before "9/23/2020" as text, and its day and
    month cannot be told apart."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isnan(number):
        return (0, number)
    try:
        text = str(value).strip()  # Python 3.10 reads no trailing Z: it is +00:00
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise UserError(
            f"{where}: {value!r} is neither a number nor an ISO date (YYYY-MM-DD); convert the times first"
        ) from None
    return (1, (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp())


def by_date(items: list, where: str) -> list:
    """LaMP history items oldest first, by their ``date`` when every item has one (LaMP does not
    store them in time order; its recency ranker sorts by date), else as stored. Retrieval during
    personal training looks only at the items before each one, so the order must be time's."""
    if not items or not all(isinstance(it, dict) and it.get("date") not in (None, "") for it in items):
        return items
    keys = []
    for j, it in enumerate(items):
        try:  # as LaMP's recency ranker reads a date: "2014-07-03" -> (2014, 7, 3); "2014" -> (2014,)
            keys.append(tuple(int(part) for part in str(it["date"]).split("-")))
        except ValueError:
            raise UserError(f"{where} profile item {j}: field 'date' {it['date']!r} is not YYYY[-MM[-DD]]") from None
    return [items[j] for j in sorted(range(len(items)), key=lambda j: keys[j])]


def load_lamp(task: Task, questions_path: str | Path, outputs_path: str | Path) -> list[dict]:
    """Read raw LaMP ``*_questions.json`` + ``*_outputs.json`` into questions with a ``gold``."""
    questions = _lamp_questions(task, Path(questions_path))
    golds = _lamp_outputs(task, Path(outputs_path))
    merged = []
    for i, q in enumerate(questions):
        qid = str(q["id"])
        if qid not in golds:
            raise UserError(
                f"{outputs_path}: no gold output for question id {qid!r} (question {i} of {questions_path})"
            )
        profile = [
            validate_history_item(task, it, f"{questions_path}: question {i} profile item {j}")
            for j, it in enumerate(by_date(q["profile"], f"{questions_path}: question {i}"))
        ]
        merged.append({"id": qid, "input": q["input"], "gold": golds[qid], "profile": profile})
    return merged


def users_from_lamp(questions: list[dict]) -> list[User]:
    """Group LaMP questions into users: questions whose profiles hold the same item ids are
    one user (LaMP repeats a user's profile for each of their questions)."""
    by_key: dict[frozenset, User] = {}
    for q in questions:
        key = frozenset(it["id"] for it in q["profile"])
        user = by_key.get(key)
        if user is None:
            user = by_key[key] = {"user_id": f"u{q['id']}", "profile": q["profile"], "query": []}
        user["query"].append({"id": q["id"], "input": q["input"], "gold": q["gold"]})
    return list(by_key.values())


def split_test_users(users: list[User], num_test_users: int) -> tuple[list[User], list[User]]:
    """Test users are the ``num_test_users`` with the longest histories (ties: user id)."""
    order = sorted(users, key=lambda u: (-len(u["profile"]), u["user_id"]))
    test_ids = {u["user_id"] for u in order[:num_test_users]}
    return [u for u in order if u["user_id"] in test_ids], [u for u in users if u["user_id"] not in test_ids]
