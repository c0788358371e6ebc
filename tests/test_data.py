"""Data validation, raw LaMP conversion and records conversion (prepare_data.py), on files made here."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

import prepare_data
from oppu.data import (
    GOLDS_FILE,
    OTHER_USERS_FILE,
    TEST_USERS_FILE,
    load_profiles,
    load_users,
    validate_users,
)
from oppu.records import RecordFields, normalize_output, records_to_users
from oppu.tasks import NEWS_CATEGORIES, TASKS
from prompts import render_query_input
from utils import UserError

NEWS = TASKS["news_categorize"]
HUFFPOST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "huffpost-news"
HUFFPOST = HUFFPOST / "News_Category_Dataset_v3.head9999.jsonl"


def news_item(i: int, category: str = "sports") -> dict:
    return {"id": f"p{i}", "text": f"article {i}", "title": f"title {i}", "category": category}


def valid_users() -> list[dict]:
    return [
        {
            "user_id": f"u{u}",
            "profile": [news_item(10 * u + i) for i in range(3)],
            "query": [{"id": f"q{u}{q}", "input": f"query {u} {q}", "gold": "sports"} for q in range(2)],
        }
        for u in range(2)
    ]


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def user_error(func, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- validation of per-user files ------------------------------------------------------------


def test_valid_file_loads_with_string_ids(tmp_path):
    users = valid_users()
    users[0]["user_id"] = 7
    users[0]["profile"][0]["id"] = 3
    users[0]["query"][0]["gold"] = 5
    loaded = load_users(NEWS, write(tmp_path / "users.json", users))
    assert loaded[0]["user_id"] == "7" and loaded[0]["profile"][0]["id"] == "3"
    assert loaded[0]["query"][0]["gold"] == "5"
    assert loaded[1] == valid_users()[1]


def broken(mutate) -> list | dict:
    """Valid users after ``mutate`` (which edits them in place, or returns a replacement)."""
    users = valid_users()
    return mutate(users) or users


BROKEN_FILES = {
    "not a list": (lambda u: {"users": u}, ["expected a list of users", "dict"]),
    "user missing user_id": (lambda u: u[1].pop("user_id") and None, ["user 1", "'user_id'"]),
    "profile not a list": (lambda u: u[0].update(profile={"a": 1}), ["user 0", "'profile'", "list"]),
    "empty profile": (lambda u: u[1].update(profile=[]), ["user 1", "(u1)", "'profile'", "empty"]),
    "history item missing category": (
        lambda u: u[1]["profile"][2].pop("category") and None,
        ["user 1 profile item 2", "'category'"],
    ),
    "input is a number": (lambda u: u[0]["query"][1].update(input=3), ["user 0 query 1", "'input'", "str", "int"]),
    "duplicate query ids": (lambda u: u[1]["query"][0].update(id="q00"), ["user 1 query 0", "id", "'q00'"]),
    "query is not an object": (lambda u: u[0]["query"].append("q"), ["user 0 query 2", "object"]),
    "duplicate user ids": (lambda u: u[1].update(user_id="u0"), ["user 1", "user_id", "'u0'"]),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_user_file_names_file_record_and_field(tmp_path, case):
    mutate, expected = BROKEN_FILES[case]
    path = write(tmp_path / "users.json", broken(mutate))
    message = user_error(load_users, NEWS, path)
    assert str(path) in message
    for part in expected:
        assert part in message, (part, message)


def test_empty_profile_is_allowed_where_no_history_is_needed():
    users = broken(lambda u: u[1].update(profile=[]))
    assert validate_users(NEWS, users, "x", need_history=False)[1]["profile"] == []


def test_gold_is_required_only_when_asked():
    users = broken(lambda u: u[0]["query"][0].pop("gold") and None)
    message = user_error(validate_users, NEWS, users, "f.json")
    assert "f.json: user 0 query 0" in message and "'gold'" in message
    assert "gold" not in validate_users(NEWS, users, "f.json", need_gold=False)[0]["query"][0]


def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "users.json"
    path.write_text('[{"user_id": "u0",\n "profile": [}]', encoding="utf-8")
    message = user_error(load_users, NEWS, path)
    assert str(path) in message and "malformed JSON at line 2 column" in message


def test_non_utf8_bytes_name_file_and_byte(tmp_path):
    path = tmp_path / "users.json"
    path.write_bytes(b'[{"user_id": "caf\xe9"}]')
    message = user_error(load_users, NEWS, path)
    assert str(path) in message and "not UTF-8" in message and "byte 17" in message


def test_missing_file(tmp_path):
    message = user_error(load_users, NEWS, tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in message and "not found" in message


# --- profiles --------------------------------------------------------------------------------


def test_load_profiles_in_user_order(tmp_path):
    users = validate_users(NEWS, valid_users(), "x")
    path = write(tmp_path / "profiles.json", [{"output": "likes sports"}, {"output": "likes food", "user_id": "u1"}])
    assert load_profiles(path, users) == ["likes sports", "likes food"]


def test_load_profiles_count_mismatch(tmp_path):
    users = validate_users(NEWS, valid_users(), "x")
    path = write(tmp_path / "profiles.json", [{"output": "likes sports"}])
    message = user_error(load_profiles, path, users)
    assert str(path) in message and "1 profiles for 2 users" in message


def test_load_profiles_user_id_mismatch(tmp_path):
    users = validate_users(NEWS, valid_users(), "x")
    path = write(tmp_path / "profiles.json", [{"output": "a", "user_id": "u0"}, {"output": "b", "user_id": "u9"}])
    message = user_error(load_profiles, path, users)
    assert str(path) in message and "profile 1" in message and "'u9'" in message and "'u1'" in message


def test_load_profiles_entry_without_output(tmp_path):
    users = validate_users(NEWS, valid_users(), "x")
    path = write(tmp_path / "profiles.json", [{"output": "a"}, {"text": "b"}])
    message = user_error(load_profiles, path, users)
    assert str(path) in message and "profile 1" in message and "'output'" in message


# --- from-lamp -------------------------------------------------------------------------------


def lamp_files(tmp_path: Path, task: str = "LaMP_2N", drop_gold: str | None = None) -> list[str]:
    """Five LaMP_2N questions; questions 110 and 111 share one profile (one user with 2 queries)."""
    items = {n: news_item(n, NEWS_CATEGORIES[n % len(NEWS_CATEGORIES)]) for n in range(12)}
    profiles = {"100": [0, 1], "110": [2, 3, 4, 5], "111": [5, 4, 3, 2], "120": [6, 7, 8, 9, 10], "130": [11]}
    questions = [
        {"id": qid, "input": render_query_input(NEWS, text=f"news {qid}"), "profile": [items[n] for n in ns]}
        for qid, ns in profiles.items()
    ]
    golds = [
        {"id": qid, "output": cat} for qid, cat in zip(profiles, ["sports", "crime", "women", "travel", "food & drink"])
    ]
    golds = [g for g in golds if g["id"] != drop_gold]
    write(tmp_path / "dev_questions.json", questions)
    write(tmp_path / "dev_outputs.json", {"task": task, "golds": golds})
    return [
        "from-lamp",
        "--task_name",
        "LaMP_2N",
        "--questions",
        str(tmp_path / "dev_questions.json"),
        "--outputs",
        str(tmp_path / "dev_outputs.json"),
        "--output_dir",
        str(tmp_path / "data"),
    ]


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_from_lamp_merges_users_and_picks_the_longest_histories(tmp_path, capsys):
    (folder,) = prepare_data.main([*lamp_files(tmp_path), "--num_test_users", "2"])
    assert folder == tmp_path / "data" / "news_categorize"
    test = read(folder / TEST_USERS_FILE)
    others = read(folder / OTHER_USERS_FILE)
    assert [u["user_id"] for u in test] == ["u120", "u110"]  # 5 and 4 history items
    assert [u["user_id"] for u in others] == ["u100", "u130"]
    merged = test[1]
    assert [q["id"] for q in merged["query"]] == ["110", "111"]
    assert [q["gold"] for q in merged["query"]] == ["crime", "women"]
    assert merged["query"][1]["input"] == render_query_input(NEWS, text="news 111")
    assert [it["id"] for it in merged["profile"]] == ["p2", "p3", "p4", "p5"]
    assert merged["profile"][0] == news_item(2, NEWS_CATEGORIES[2])
    assert read(folder / GOLDS_FILE) == {
        "task": "LaMP_2N",
        "golds": [
            {"id": "120", "output": "travel"},
            {"id": "110", "output": "crime"},
            {"id": "111", "output": "women"},
        ],
    }
    assert read(folder / "prepare_config.json")["num_test_users"] == 2
    assert load_users(NEWS, folder / TEST_USERS_FILE) == test
    out = capsys.readouterr().out
    assert "2 test users (9 history items, 3 queries), 2 other users (2 queries)" in out


def test_from_lamp_outputs_of_another_task(tmp_path):
    message = user_error(prepare_data.main, lamp_files(tmp_path, task="LaMP_3"))
    assert "dev_outputs.json" in message and "'task'" in message and "'LaMP_3'" in message and "LaMP_2N" in message


def test_from_lamp_question_without_gold(tmp_path):
    message = user_error(prepare_data.main, lamp_files(tmp_path, drop_gold="120"))
    assert "dev_outputs.json" in message and "'120'" in message and "question 3" in message


def test_from_lamp_history_item_missing_field(tmp_path):
    args = lamp_files(tmp_path)
    questions = read(tmp_path / "dev_questions.json")
    del questions[2]["profile"][1]["title"]
    write(tmp_path / "dev_questions.json", questions)
    message = user_error(prepare_data.main, args)
    assert "dev_questions.json: question 2 profile item 1" in message and "'title'" in message


# --- from-records on the HuffPost file -------------------------------------------------------


def huffpost_args(tmp_path: Path, task: str, output_field: str) -> list[str]:
    if not HUFFPOST.is_file():
        pytest.skip(f"the HuffPost records file is not there: {HUFFPOST}")
    args = [
        "from-records",
        "--input",
        str(HUFFPOST),
        "--task_name",
        task,
        "--user_field",
        "authors",
        "--input_field",
        "short_description",
        "--output_field",
        output_field,
        "--time_field",
        "date",
        "--queries_per_user",
        "5",
        "--min_history",
        "10",
        "--num_test_users",
        "10",
        "--output_dir",
        str(tmp_path / "data"),
    ]
    return args + (["--title_field", "headline"] if task == "news_categorize" else [])


def expected_users(keep) -> dict[str, list[dict]]:
    """Recompute from the raw file: each author's kept records, oldest first (file order on ties)."""
    records = [json.loads(line) for line in HUFFPOST.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_author: dict[str, list[dict]] = {}
    for rec in records:
        if rec["authors"].strip() and rec["short_description"].strip() and keep(rec):
            by_author.setdefault(rec["authors"].strip(), []).append(rec)
    return {a: sorted(recs, key=lambda r: r["date"]) for a, recs in by_author.items()}


def check_test_users(test: list[dict], expected: dict[str, list[dict]]) -> None:
    ranked = sorted((a for a in expected if len(expected[a]) - 5 >= 10), key=lambda a: (-len(expected[a]), a))
    assert [u["user_id"] for u in test] == ranked[:10]
    for user in test:
        recs = expected[user["user_id"]]
        assert len(user["query"]) == 5 and len(user["profile"]) == len(recs) - 5
        history_dates = [r["date"] for r in recs[:-5]]
        assert max(history_dates) <= min(r["date"] for r in recs[-5:])


def test_from_records_news_categorize_on_huffpost(tmp_path, capsys):
    (folder,) = prepare_data.main(huffpost_args(tmp_path, "news_categorize", "category"))
    test = read(folder / TEST_USERS_FILE)
    expected = expected_users(lambda r: r["category"].lower() in NEWS_CATEGORIES)
    check_test_users(test, expected)
    for user in test:
        recs = expected[user["user_id"]]
        assert [(it["text"], it["title"], it["category"]) for it in user["profile"]] == [
            (r["short_description"], r["headline"], r["category"].lower()) for r in recs[:-5]
        ]
        assert [(q["input"], q["gold"]) for q in user["query"]] == [
            (render_query_input(NEWS, text=r["short_description"]), r["category"].lower()) for r in recs[-5:]
        ]
    golds = read(folder / GOLDS_FILE)
    assert golds["task"] == "LaMP_2N" and len(golds["golds"]) == 50
    assert all(g["output"] in NEWS_CATEGORIES and g["output"] == g["output"].lower() for g in golds["golds"])
    ids = [g["id"] for g in golds["golds"]]
    assert len(set(ids)) == 50
    others = read(folder / OTHER_USERS_FILE)
    assert all(q["gold"] in NEWS_CATEGORIES for u in others for q in u["query"])
    records = [json.loads(line) for line in HUFFPOST.read_text(encoding="utf-8").splitlines() if line.strip()]
    outside = sum(1 for r in records if r["authors"].strip() and r["category"].lower() not in NEWS_CATEGORIES)
    out = capsys.readouterr().out
    assert f"{HUFFPOST}: {len(records)} records" in out
    assert f"{outside} (label outside the task)" in out
    assert "news_categorize: 10 test users" in out and "50 queries" in out


def test_from_records_news_headline_on_huffpost(tmp_path):
    (folder,) = prepare_data.main(huffpost_args(tmp_path, "news_headline", "headline"))
    test = read(folder / TEST_USERS_FILE)
    expected = expected_users(lambda r: bool(r["headline"].strip()))
    check_test_users(test, expected)
    headline = TASKS["news_headline"]
    for user in test:
        recs = expected[user["user_id"]]
        assert [(it["text"], it["title"]) for it in user["profile"]] == [
            (r["short_description"], r["headline"].strip()) for r in recs[:-5]
        ]
        assert [(q["input"], q["gold"]) for q in user["query"]] == [
            (render_query_input(headline, text=r["short_description"]), r["headline"].strip()) for r in recs[-5:]
        ]
    assert read(folder / GOLDS_FILE)["task"] == "LaMP_4"
    assert len(read(folder / GOLDS_FILE)["golds"]) == 50


# --- from-records on small files -------------------------------------------------------------


def test_from_records_product_rating_csv_rounds_ratings(tmp_path, capsys):
    rows = [("ann", f"review {i}", r, f"2024-01-0{i + 1}") for i, r in enumerate(["4.5", "2.4", "0.5", "3", "5"])]
    rows += [("bob", f"bob review {i}", "1", f"2024-02-0{i + 1}") for i in range(3)]
    rows += [("bob", "not a rating", "great", "2024-03-01")]
    path = tmp_path / "reviews.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("user", "review", "rating", "when"), *rows])
    (folder,) = prepare_data.main(
        [
            "from-records",
            "--input",
            str(path),
            "--task_name",
            "LaMP_3",
            "--user_field",
            "user",
            "--input_field",
            "review",
            "--output_field",
            "rating",
            "--time_field",
            "when",
            "--queries_per_user",
            "1",
            "--min_history",
            "2",
            "--num_test_users",
            "1",
            "--output_dir",
            str(tmp_path / "d"),
        ]
    )
    (ann,) = read(folder / TEST_USERS_FILE)
    assert ann["user_id"] == "ann"
    assert [it["score"] for it in ann["profile"]] == ["5", "2", "1", "3"]
    assert [it["text"] for it in ann["profile"]] == ["review 0", "review 1", "review 2", "review 3"]
    assert ann["query"] == [
        {"id": "4", "input": render_query_input(TASKS["product_rating"], text="review 4"), "gold": "5"}
    ]
    (bob,) = read(folder / OTHER_USERS_FILE)
    assert len(bob["profile"]) == 2 and bob["query"][0]["gold"] == "1"
    assert read(folder / GOLDS_FILE) == {"task": "LaMP_3", "golds": [{"id": "4", "output": "5"}]}
    assert "1 (label outside the task)" in capsys.readouterr().out


def test_from_records_min_history_0_keeps_other_users_without_a_history(tmp_path):
    """Only test users train a personal PEFT on a history; another user with none still gives the
    task adapter its queries. A test user without one is refused, naming the user."""
    rows = [("ann", f"review {i}", "4", f"2024-01-0{i + 1}") for i in range(3)] + [("cy", "once", "2", "2024-02-01")]
    path = tmp_path / "reviews.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("user", "review", "rating", "when"), *rows])
    argv = ["from-records", "--input", str(path), "--task_name", "LaMP_3", "--user_field", "user"]
    argv += ["--input_field", "review", "--output_field", "rating", "--time_field", "when"]
    argv += ["--queries_per_user", "1", "--min_history", "0"]
    (folder,) = prepare_data.main([*argv, "--num_test_users", "1", "--output_dir", str(tmp_path / "d")])
    (cy,) = read(folder / OTHER_USERS_FILE)
    assert cy["user_id"] == "cy" and cy["profile"] == [] and len(cy["query"]) == 1
    assert [u["user_id"] for u in read(folder / TEST_USERS_FILE)] == ["ann"]
    with pytest.raises(UserError, match="test users.*'profile' is empty"):
        prepare_data.main([*argv, "--num_test_users", "2", "--output_dir", str(tmp_path / "e")])


def test_from_records_missing_field_names_file_record_and_field(tmp_path):
    path = tmp_path / "records.jsonl"
    lines = [{"who": "a", "text": "t", "label": "sports"}, {"who": "a", "label": "sports"}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n", encoding="utf-8")
    args = [
        "from-records",
        "--input",
        str(path),
        "--task_name",
        "news_categorize",
        "--user_field",
        "who",
        "--input_field",
        "text",
        "--output_field",
        "label",
        "--output_dir",
        str(tmp_path / "d"),
    ]
    message = user_error(prepare_data.main, args)
    assert message == f"{path}: record 1: missing field 'text'"


def test_from_records_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"who": "a"}\n\n{"who": \n', encoding="utf-8")
    args = [
        "from-records",
        "--input",
        str(path),
        "--task_name",
        "news_headline",
        "--user_field",
        "who",
        "--input_field",
        "text",
        "--output_field",
        "label",
        "--output_dir",
        str(tmp_path / "d"),
    ]
    message = user_error(prepare_data.main, args)
    assert str(path) in message and "line 3" in message


def test_skipped_reasons_are_counted(tmp_path, capsys):
    rows = [{"who": "a", "text": f"t{i}", "label": "Sports"} for i in range(4)]
    rows += [{"who": "", "text": "t", "label": "sports"}, {"who": "a", "text": " ", "label": "sports"}]
    rows += [{"who": "a", "text": "t", "label": "weird news"}]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    prepare_data.main(
        [
            "from-records",
            "--input",
            str(path),
            "--task_name",
            "news_categorize",
            "--user_field",
            "who",
            "--input_field",
            "text",
            "--output_field",
            "label",
            "--queries_per_user",
            "1",
            "--min_history",
            "3",
            "--num_test_users",
            "1",
            "--output_dir",
            str(tmp_path / "d"),
        ]
    )
    out = capsys.readouterr().out
    assert "7 records, 4 kept for 1 users" in out
    assert Counter(out.split("skipped: ")[1].split("\n")[0].split(", ")) == Counter(
        ["1 (empty input)", "1 (label outside the task)", "1 (no user)"]
    )


def test_records_with_numeric_times_are_ordered_by_value(tmp_path):
    # As text "10" < "9"; CSV times are always text, so numbers must be compared as numbers.
    path = tmp_path / "reviews.csv"
    times = ["10", "9", "11", "100", "8"]
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("user", "review", "rating", "step"), *[("ann", f"r{t}", "3", t) for t in times]])
    (folder,) = prepare_data.main(
        [
            "from-records",
            "--input",
            str(path),
            "--task_name",
            "product_rating",
            "--user_field",
            "user",
            "--input_field",
            "review",
            "--output_field",
            "rating",
            "--time_field",
            "step",
            "--queries_per_user",
            "1",
            "--min_history",
            "1",
            "--num_test_users",
            "1",
            "--output_dir",
            str(tmp_path / "d"),
        ]
    )
    (ann,) = read(folder / TEST_USERS_FILE)
    assert [it["text"] for it in ann["profile"]] == ["r8", "r9", "r10", "r11"]
    assert ann["query"][0]["input"].endswith("review: r100")


def test_records_to_users_edge_cases():
    rating, headline = TASKS["product_rating"], TASKS["news_headline"]
    assert [normalize_output(rating, v) for v in [4.5, "2.4", 0.5, 7, "-3", "x", None, "inf", "nan"]] == [
        "5",
        "2",
        "1",
        "5",
        "1",
        None,
        None,
        None,
        None,
    ]
    assert normalize_output(headline, None) is None  # a JSON null is no headline "None"
    assert normalize_output(headline, "  Big News ") == "Big News"
    fields = RecordFields("u", "x", "y")
    recs = [{"u": "a", "x": f"x{i}", "y": "3"} for i in range(4)]
    users, _ = records_to_users(rating, recs, fields, queries_per_user=0, min_history=1)
    assert len(users[0]["profile"]) == 4 and users[0]["query"] == []  # 0 queries: all history
    users, skipped = records_to_users(rating, recs, fields, queries_per_user=2, min_history=3)
    assert users == [] and skipped == Counter({"records of users below --min_history": 4})
    users, skipped = records_to_users(rating, recs, fields, queries_per_user=1, min_history=3, max_history=2)
    assert [it["text"] for it in users[0]["profile"]] == ["x1", "x2"]  # the most recent two
    assert [q["input"][-2:] for q in users[0]["query"]] == ["x3"]
    assert skipped == Counter({"older history records beyond --max_history": 1})


def test_records_times_iso_dates_and_errors():
    """ISO dates and date-times (zones honoured) sort by time; other text times are an error that
    names the record and the field; a title field must exist; a user id 0 is a user."""
    news, rating = TASKS["news_categorize"], TASKS["product_rating"]
    times = ["2021-01-02T00:30:00+01:00", "2020-12-31", "2021-01-01T23:45:00Z", "2021-01-01"]
    recs = [{"u": 0, "x": f"x{i}", "y": "3", "t": t} for i, t in enumerate(times)]
    users, _ = records_to_users(rating, recs, RecordFields("u", "x", "y", "t"), queries_per_user=1, min_history=1)
    # 2020-12-31 < 2021-01-01 (midnight UTC) < 2021-01-01 23:30 UTC (the +01:00 one) < 23:45 UTC
    assert users[0]["user_id"] == "0"
    assert [it["text"] for it in users[0]["profile"]] == ["x1", "x3", "x0"] and users[0]["query"][0]["input"].endswith(
        "x2"
    )
    recs[2]["t"] = "10/1/2021"  # would sort before "9/23/2020" as text
    with pytest.raises(UserError, match=r"records: record 2: field 't': '10/1/2021' is neither a number nor an ISO"):
        records_to_users(rating, recs, RecordFields("u", "x", "y", "t"), queries_per_user=1, min_history=1)
    article = [{"u": "a", "x": "a storm", "y": "crime", "headline": None}]
    with pytest.raises(UserError, match=r"record 0: missing field 'title'"):
        records_to_users(news, article, RecordFields("u", "x", "y", title="title"), queries_per_user=0, min_history=1)
    users, _ = records_to_users(news, article, RecordFields("u", "x", "y", title="headline"), 0, 1)
    assert users[0]["profile"][0]["title"] == ""  # a JSON null title is no title "None"


def test_from_lamp_orders_each_history_by_date(tmp_path):
    """LaMP stores history items out of time order; they are read oldest first by their date, as
    LaMP's recency ranker reads it (YYYY[-MM[-DD]], parts as numbers), so that retrieval during
    personal training never sees a later item; an unreadable date names the item."""
    args = lamp_files(tmp_path)
    questions = read(tmp_path / "dev_questions.json")
    for q in questions:  # question 120's items p6..p10 dated out of order; "2014-7-3" is not zero-padded
        for item, date in zip(q["profile"], ["2015-01-02", "2014-7-3", "2014-12-30", "2016", "2014-07-10"]):
            item["date"] = date
    write(tmp_path / "dev_questions.json", questions)
    (folder,) = prepare_data.main([*args, "--num_test_users", "2"])
    test = {u["user_id"]: u for u in read(folder / TEST_USERS_FILE)}
    assert [it["id"] for it in test["u120"]["profile"]] == ["p7", "p10", "p8", "p6", "p9"]
    questions[3]["profile"][1]["date"] = "July 2014"
    write(tmp_path / "dev_questions.json", questions)
    message = user_error(prepare_data.main, [*args, "--output_dir", str(tmp_path / "d2")])
    assert "question 3 profile item 1: field 'date' 'July 2014' is not YYYY[-MM[-DD]]" in message
