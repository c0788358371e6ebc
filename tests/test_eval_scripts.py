"""The evaluation scripts: results, per-user scores, and one-line errors for bad inputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from eval import eval_all, eval_task
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
GOLDS = {"1": "comedy", "2": "action", "3": "sci-fi"}
PREDS = {"1": "comedy", "2": "horror", "3": "sci-fi"}  # 2 of 3 right; F1 = (1 + 1) / 15


def outputs(task: str, pairs: dict[str, str]) -> dict:
    return {"task": task, "golds": [{"id": k, "output": v} for k, v in pairs.items()]}


def write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def run_task(tmp_path: Path, golds: object, preds: object, *extra: str) -> dict:
    argv = [
        "--golds_json",
        str(write(tmp_path / "golds.json", golds)),
        "--preds_json",
        str(write(tmp_path / "preds.json", preds)),
        "--task_name",
        "LaMP_2M",
        "--output_file",
        str(tmp_path / "out" / "result.json"),
        *extra,
    ]
    return eval_task.main(argv)


def test_eval_task_writes_and_returns_the_metrics(tmp_path: Path):
    result = run_task(tmp_path, outputs("LaMP_2M", GOLDS), outputs("LaMP_2M", PREDS))
    assert result == pytest.approx({"task": "LaMP_2M", "n": 3, "accuracy": 2 / 3, "f1": 2 / 15})
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == result


def test_eval_task_accepts_the_task_name_and_files_without_a_task_field(tmp_path: Path):
    argv = [
        "--golds_json",
        str(write(tmp_path / "g.json", {"golds": outputs("", GOLDS)["golds"]})),
        "--preds_json",
        str(write(tmp_path / "p.json", outputs("movie_tagging", PREDS))),
        "--task_name",
        "movie_tagging",
        "--output_file",
        str(tmp_path / "r.json"),
    ]
    assert eval_task.main(argv)["accuracy"] == pytest.approx(2 / 3)


def test_eval_task_per_user(tmp_path: Path):
    users = [
        {
            "user_id": "u1",
            "profile": [],
            "query": [{"id": "1", "input": "", "gold": "comedy"}, {"id": "2", "input": "", "gold": "action"}],
        },
        {"user_id": 7, "profile": [], "query": [{"id": "3", "input": "", "gold": "sci-fi"}]},
        {"user_id": "empty", "profile": [], "query": []},
    ]
    users_file = str(write(tmp_path / "users.json", users))
    golds, preds = outputs("LaMP_2M", GOLDS), outputs("LaMP_2M", PREDS)
    per_user = run_task(tmp_path, golds, preds, "--per_user", users_file)["per_user"]
    # u1: comedy right, action missed -> comedy F1 1, action F1 0, macro 1/15.
    assert per_user["u1"] == pytest.approx({"accuracy": 0.5, "f1": 1 / 15, "n": 2})
    assert per_user["7"] == pytest.approx({"accuracy": 1.0, "f1": 1 / 15, "n": 1})
    assert per_user["empty"] == {"n": 0}


def bad_record(field: str, value: object) -> dict:
    data = outputs("LaMP_2M", PREDS)
    data["golds"][1][field] = value
    return data


def without_id() -> dict:
    data = outputs("LaMP_2M", PREDS)
    del data["golds"][1]["id"]
    return data


@pytest.mark.parametrize(
    ("preds", "message"),
    [
        ({"task": "LaMP_2M"}, "'golds' list"),
        ([], "'golds' list"),
        (without_id(), "golds[1]: field 'id' is missing"),
        (bad_record("output", 3), "golds[1]: field 'output' must be a string, got int"),
        (bad_record("id", "1"), "golds[1]: duplicate id '1'"),
        (outputs("LaMP_2N", PREDS), "field 'task' is 'LaMP_2N', not LaMP_2M"),
        (outputs("LaMP_9", PREDS), "unknown task 'LaMP_9'"),
        (
            outputs("LaMP_2M", {"1": "a", "9": "b", "8": "c"}),
            "2 missing ['2', '3'], 2 extra ['8', '9']",
        ),
    ],
)
def test_eval_task_bad_predictions(tmp_path: Path, preds: object, message: str):
    with pytest.raises(UserError) as err:
        run_task(tmp_path, outputs("LaMP_2M", GOLDS), preds)
    assert str(tmp_path / "preds.json") in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"{", "malformed JSON"), (b'{"golds": "\xff"}', "not UTF-8")],
)
def test_eval_task_unreadable_golds(tmp_path: Path, content: bytes, message: str):
    golds = tmp_path / "golds.json"
    golds.write_bytes(content)
    argv = [
        "--golds_json",
        str(golds),
        "--preds_json",
        str(write(tmp_path / "p.json", {})),
        "--task_name",
        "LaMP_2M",
        "--output_file",
        str(tmp_path / "r.json"),
    ]
    with pytest.raises(UserError, match=message) as err:
        eval_task.main(argv)
    assert str(golds) in str(err.value)


def test_eval_task_rating_golds_must_be_numbers(tmp_path: Path):
    argv = [
        "--golds_json",
        str(write(tmp_path / "g.json", outputs("LaMP_3", {"1": "five"}))),
        "--preds_json",
        str(write(tmp_path / "p.json", outputs("LaMP_3", {"1": "5"}))),
        "--task_name",
        "LaMP_3",
        "--output_file",
        str(tmp_path / "r.json"),
    ]
    with pytest.raises(UserError, match=re.escape("g.json: id '1': gold 'five' is not a number")):
        eval_task.main(argv)


def test_eval_task_per_user_query_without_gold(tmp_path: Path):
    queries = [{"id": "1", "input": ""}, {"id": "404", "input": ""}]
    users = write(tmp_path / "users.json", [{"user_id": "u", "profile": [], "query": queries}])
    golds, preds = outputs("LaMP_2M", GOLDS), outputs("LaMP_2M", PREDS)
    with pytest.raises(UserError, match=re.escape("users.json: user 'u': query ids without gold: ['404']")):
        run_task(tmp_path, golds, preds, "--per_user", str(users))


def test_eval_task_per_user_leaves_out_users_not_scored(tmp_path: Path):
    users = [
        {"user_id": "in", "profile": [], "query": [{"id": i, "input": ""} for i in GOLDS]},
        {"user_id": "not run", "profile": [], "query": [{"id": "404", "input": ""}]},
    ]
    golds, preds = outputs("LaMP_2M", GOLDS), outputs("LaMP_2M", PREDS)
    result = run_task(tmp_path, golds, preds, "--per_user", str(write(tmp_path / "users.json", users)))
    assert list(result["per_user"]) == ["in"] and result["per_user"]["in"]["n"] == 3


def test_eval_task_command_line_error_is_one_line_with_status_2(tmp_path: Path):
    golds = write(tmp_path / "golds.json", outputs("LaMP_2M", GOLDS))
    preds = write(tmp_path / "preds.json", outputs("LaMP_2M", {"1": "comedy"}))
    command = [
        sys.executable,
        "eval/eval_task.py",
        "--golds_json",
        str(golds),
        "--preds_json",
        str(preds),
        "--task_name",
        "LaMP_2M",
        "--output_file",
        str(tmp_path / "r.json"),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {preds}: prediction ids differ from gold ids")
    assert not (tmp_path / "r.json").exists()


def make_zip(path: Path, members: dict[str, object]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, obj in members.items():
            archive.writestr(name, json.dumps(obj))
    return path


def test_eval_all_matches_files_by_task(tmp_path: Path, capsys):
    golds = make_zip(
        tmp_path / "golds.zip",
        {
            "a/b/movies.json": outputs("LaMP_2M", GOLDS),
            "ratings.json": outputs("LaMP_3", {"1": "2", "2": "4"}),
            "headlines.json": outputs("LaMP_4", {"1": "a b"}),  # no predictions: not scored
        },
    )
    preds = make_zip(
        tmp_path / "preds.zip",
        {
            "x.json": outputs("LaMP_3", {"2": "3", "1": "oops"}),  # oops -> 5: errors 3 and -1
            "deep/er/y.json": outputs("LaMP_2M", PREDS),
            "__MACOSX/deep/er/._y.json": "",
        },
    )
    out = tmp_path / "result.json"
    argv = [
        "--golds_zip",
        str(golds),
        "--preds_zip",
        str(preds),
        "--output_file",
        str(out),
        "--temp_dir",
        str(tmp_path / "unused"),
    ]
    result = eval_all.main(argv)
    assert list(result) == ["LaMP_2M", "LaMP_3"]
    assert "no predictions for LaMP_4; not scored" in capsys.readouterr().err
    movies = {"task": "LaMP_2M", "n": 3, "accuracy": 2 / 3, "f1": 2 / 15}
    assert result["LaMP_2M"] == pytest.approx(movies)
    assert result["LaMP_3"] == pytest.approx({"task": "LaMP_3", "n": 2, "MAE": 2.0, "RMSE": 5**0.5})
    assert json.loads(out.read_text()) == result


@pytest.mark.parametrize(
    ("golds", "preds", "message"),
    [
        (
            {"g.json": outputs("LaMP_2M", GOLDS)},
            {"p.json": outputs("LaMP_3", {"1": "1"})},
            "preds.zip:p.json: no gold file for LaMP_3",
        ),
        (
            {"g.json": outputs("LaMP_2M", GOLDS), "d/g2.json": outputs("LaMP_2M", GOLDS)},
            {"p.json": outputs("LaMP_2M", PREDS)},
            "golds.zip:d/g2.json: second file for LaMP_2M",
        ),
        (
            {"g.json": outputs("LaMP_2M", GOLDS)},
            {"p.json": {"golds": []}},
            "preds.zip:p.json: expected an object with a 'task' field",
        ),
        (
            {"g.json": outputs("LaMP_2M", GOLDS)},
            {"p.json": outputs("LaMP_2M", {"1": "comedy"})},
            "preds.zip:p.json: prediction ids differ from gold ids: 2 missing",
        ),
    ],
)
def test_eval_all_errors(tmp_path: Path, golds: dict, preds: dict, message: str):
    argv = [
        "--golds_zip",
        str(make_zip(tmp_path / "golds.zip", golds)),
        "--preds_zip",
        str(make_zip(tmp_path / "preds.zip", preds)),
        "--output_file",
        str(tmp_path / "r.json"),
    ]
    with pytest.raises(UserError) as err:
        eval_all.main(argv)
    assert message in str(err.value)


def test_eval_all_rejects_a_file_that_is_not_a_zip(tmp_path: Path):
    not_zip = write(tmp_path / "golds.zip", {})
    argv = ["--golds_zip", str(not_zip), "--preds_zip", str(not_zip), "--output_file", str(tmp_path / "r.json")]
    with pytest.raises(UserError, match=re.escape("golds.zip: cannot open as a zip file")):
        eval_all.main(argv)
