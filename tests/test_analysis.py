"""Reading a grid user by user (oppu/analysis.py, eval/analyze_grid.py) on hand-made files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eval import analyze_grid, compare_rows
from oppu.analysis import agreement_split, manifest_path, markdown, per_user_rows, read_manifest, spearman
from oppu.runs import file_fingerprint
from oppu.tasks import TASKS
from utils import UserError

NEWS = TASKS["news_categorize"]


def user(uid: str, labels: list[str], golds: list[str], first_id: int) -> dict:
    profile = [{"id": f"{uid}h{i}", "text": "t", "title": "x", "category": lab} for i, lab in enumerate(labels)]
    queries = [{"id": str(first_id + i), "input": "q", "gold": g} for i, g in enumerate(golds)]
    return {"user_id": uid, "profile": profile, "query": queries}


# u1's majority label is sports (2 of 3); u2's is politics
USERS = [
    user("u1", ["sports", "sports", "crime"], ["sports", "crime", "sports"], 0),
    user("u2", ["politics"], ["politics", "business"], 10),
]
PREDS = {
    "non_personalized": {"0": "sports", "1": "crime", "2": "politics", "10": "politics", "11": "business"},
    "OPPU": {"0": "sports", "1": "sports", "2": "sports", "10": "politics", "11": "politics"},
}


def test_agreement_split_by_the_users_majority_label():
    split = agreement_split(NEWS, USERS, PREDS)
    # agrees: queries 0, 2 (u1, gold sports) and 10 (u2, gold politics); disagrees: 1 and 11
    assert split["agrees"]["queries"] == 3 and split["disagrees"]["queries"] == 2
    assert split["agrees"]["OPPU"] == {"accuracy": 1.0, "majority_answers": 1.0}
    assert split["disagrees"]["OPPU"] == {"accuracy": 0.0, "majority_answers": 1.0}  # the user's label, always
    assert split["agrees"]["non_personalized"] == pytest.approx({"accuracy": 2 / 3, "majority_answers": 2 / 3})
    assert split["disagrees"]["non_personalized"] == {"accuracy": 1.0, "majority_answers": 0.0}


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # hand-computed: ranks x 1,2,3 and y 1,3,2: d = 0,1,1, rho = 1 - 6*2/(3*8) = 0.5
    assert spearman([1, 2, 3], [5, 9, 7]) == pytest.approx(0.5)
    assert math.isnan(spearman([1, 2, 3], [1, 1, 1]))
    # ties share their mean rank: x ranks 1.5, 1.5, 3 against 1, 2, 3 -> Pearson on the ranks
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)


def test_per_user_lines_join_scores_and_the_manifest(tmp_path):
    path = tmp_path / "manifest.jsonl"
    lines = [{"user_id": "u1", "steps": 2, "final_loss": 9.0, "losses": [9.0, 9.0]}]
    lines.append({"user_id": "u1", "steps": 24, "final_loss": 0.5, "losses": [2.0] + [1.0] * 22 + [0.5]})
    path.write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    manifest = read_manifest(path)  # the resumed run's line wins
    scores = {
        "OPPU": {"u1": {"accuracy": 2 / 3}, "u2": {"accuracy": 0.5}},
        "non_personalized": {"u1": {"accuracy": 2 / 3}, "u2": {"accuracy": 1.0}},
    }
    rows = per_user_rows(USERS, scores, "OPPU", "non_personalized", "accuracy", manifest)
    assert rows[0] | {"difference": 0} == {
        "user_id": "u1",
        "history": 3,
        "queries": 3,
        "steps": 24,
        "first_loss": 2.0,
        "final_loss": 0.5,
        "OPPU": 2 / 3,
        "non_personalized": 2 / 3,
        "difference": 0,
    }
    assert rows[1]["steps"] is None and rows[1]["difference"] == -0.5


def test_manifest_path_mirrors_the_output_folder(tmp_path):
    pred = tmp_path / "W" / "output" / "news_categorize" / "k0-news_categorize-M-OPPU.json"
    assert manifest_path(pred, "news_categorize") == (
        tmp_path / "W" / "ckpt" / "news_categorize" / "k0-news_categorize-M-OPPU" / "manifest.jsonl"
    )


def test_manifest_path_follows_the_runs_recorded_checkpoint_folder(tmp_path):
    """A grid call with stage flags writes its predictions one folder deeper; the run's config
    beside them names its checkpoint folder."""
    pred = tmp_path / "W" / "output" / "stage-x" / "news_categorize" / "k0-news_categorize-M-OPPU.json"
    pred.parent.mkdir(parents=True)
    pred.with_suffix(".config.json").write_text(json.dumps({"ckpt_dir": str(tmp_path / "W" / "ckpt")}))
    assert manifest_path(pred, "news_categorize") == (
        tmp_path / "W" / "ckpt" / "news_categorize" / "k0-news_categorize-M-OPPU" / "manifest.jsonl"
    )
    pred.with_suffix(".config.json").unlink()  # without the config: the work folder's ckpt all the same
    assert manifest_path(pred, "news_categorize").parent.parent.parent == tmp_path / "W" / "ckpt"


def write_grid(data: Path, work: Path, preds_by_row: dict[str, dict[str, str]], empty_user: bool = False) -> Path:
    """A hand-made grid on USERS: the data file, each row's predictions file, and table.json
    with each row's per-user accuracy (as run_grid.py writes it). ``empty_user``: the data also
    holds a user without queries, whom per-user scores list with n 0 (eval_task.per_user_scores)."""
    users_file = data / "news_categorize" / "user_top_100_history.json"
    users_file.parent.mkdir(parents=True, exist_ok=True)
    users_file.write_text(json.dumps(USERS + ([user("u0", ["crime"], [], 20)] if empty_user else [])))
    out = work / "output" / "news_categorize"
    out.mkdir(parents=True)
    rows = {}
    for name, preds in preds_by_row.items():
        f = out / f"k0-news_categorize-M-{name}.json"
        f.write_text(json.dumps({"task": "LaMP_2N", "golds": [{"id": i, "output": p} for i, p in preds.items()]}))
        per_user = {u["user_id"]: {"accuracy": 0.0, "n": len(u["query"])} for u in USERS}
        for u in USERS:
            hits = [preds[q["id"]] == q["gold"] for q in u["query"]]
            per_user[u["user_id"]]["accuracy"] = per_user[u["user_id"]]["f1"] = sum(hits) / len(hits)
        if empty_user:
            per_user["u0"] = {"n": 0}
        rows[name] = {"metrics": {"accuracy": 0.0, "f1": 0.0}, "predictions": str(f), "per_user": per_user}
        rows[name] |= {"ci95": {"accuracy": [0.0, 1.0], "f1": [0.0, 1.0]}, "n_users": 2, "n_queries": 5, "seconds": 1}
    table = work / "results" / "news_categorize" / "table.json"
    table.parent.mkdir(parents=True)
    config = {"data_sha256": {"user_top_100_history.json": file_fingerprint(users_file)}}
    table.write_text(json.dumps({"config": config, "rows": rows}))
    return table


def test_script_on_a_hand_made_grid(tmp_path):
    data, work = tmp_path / "data", tmp_path / "W"
    write_grid(data, work, PREDS)
    run = work / "ckpt" / "news_categorize" / "k0-news_categorize-M-OPPU"
    run.mkdir(parents=True)
    manifest = [{"user_id": u, "steps": 3, "final_loss": 0.1, "losses": [1.0, 0.5, 0.1]} for u in ("u1", "u2")]
    (run / "manifest.jsonl").write_text("\n".join(json.dumps(m) for m in manifest))
    argv = ["--task_name", "news_categorize", "--data_dir", str(data), "--work_dir", str(work)]
    written = analyze_grid.main(argv)
    assert written["gain_plot"].stat().st_size > 1000 and written["curves_plot"].stat().st_size > 1000
    result = json.loads(written["json"].read_text())
    assert [u["difference"] for u in result["users"]] == pytest.approx([0.0, -0.5])
    assert result["agreement"]["disagrees"]["OPPU"]["majority_answers"] == 1.0
    md = written["md"].read_text()
    assert "0 users gained, 1 lost, 1 tied" in md and "| gold ≠ user's majority label | 2 |" in md
    with pytest.raises(UserError, match="table.json: no row 'RAG'; it has non_personalized, OPPU"):
        analyze_grid.main(argv + ["--row", "RAG"])


def test_compare_rows_of_two_grids(tmp_path, capsys):
    """The same row name from two grids on the same data (e.g. defaults against hand-tuned flags)."""
    data = tmp_path / "data"
    write_grid(data, tmp_path / "A", {"OPPU": PREDS["OPPU"]})
    table_b = write_grid(data, tmp_path / "B", {"OPPU": PREDS["non_personalized"]})
    argv = ["--task_name", "LaMP_2N", "--data_dir", str(data), "--resamples", "50"]
    argv += ["--row", f"{tmp_path / 'A'}:OPPU", "--baseline", f"{tmp_path / 'B'}:OPPU"]
    result = compare_rows.main(argv + ["--output_file", str(tmp_path / "c.json")])
    diff = result["paired"][0]["metrics"]["accuracy"]
    # pooled: OPPU right on queries 0, 2, 10 (3/5); the baseline on 0, 1, 10, 11 (4/5)
    assert diff["difference"] == pytest.approx(3 / 5 - 4 / 5)
    assert (diff["gained"], diff["lost"], diff["tied"]) == (0, 1, 1)  # u1 2/3 vs 2/3, u2 1/2 vs 1
    lo, hi = diff["ci95"]
    assert lo <= diff["difference"] <= hi
    assert json.loads((tmp_path / "c.json").read_text())["paired"][0]["metrics"]["accuracy"]["lost"] == 1
    assert f"| {tmp_path / 'A'}:OPPU − {tmp_path / 'B'}:OPPU | accuracy ↑ | -0.200" in capsys.readouterr().out
    # a grid scored on other users' data is refused, naming its table
    config = json.loads(table_b.read_text())
    config["config"]["data_sha256"]["user_top_100_history.json"] = "0" * 64
    table_b.write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"B/results/news_categorize/table.json: row 'OPPU' was scored on another"):
        compare_rows.main(argv)
    with pytest.raises(UserError, match="--row nocolon: expected SOURCE:ROW"):
        compare_rows.main(argv[:4] + ["--row", "nocolon", "--baseline", "x:OPPU"])


def test_compare_a_study_row_on_the_users_both_rows_scored(tmp_path, capsys):
    """A study's table.json (its grid part under "grid") names a row scored on u1 only, as a study
    run with --user_stride 2 is; against the grid's row on u1 and u2 it needs --common_users, and
    then both rows are scored again on u1 alone."""
    data = tmp_path / "data"
    grid_table = write_grid(data, tmp_path / "W", {"non_personalized": PREDS["non_personalized"]})
    study_table = write_grid(data, tmp_path / "S", {"OPPU": PREDS["OPPU"]})
    inner = json.loads(study_table.read_text())
    del inner["rows"]["OPPU"]["per_user"]["u2"]
    study_file = tmp_path / "S" / "studies" / "shift" / "news_categorize" / "table.json"
    study_file.parent.mkdir(parents=True)
    study_file.write_text(json.dumps({"study": "shift", "task": "news_categorize", "grid": inner}))
    argv = ["--task_name", "news_categorize", "--data_dir", str(data), "--resamples", "50"]
    argv += ["--row", f"{study_file}:OPPU", "--baseline", f"{tmp_path / 'W'}:non_personalized"]
    with pytest.raises(UserError, match="scored on different users .* with --common_users"):
        compare_rows.main(argv)
    result = compare_rows.main(argv + ["--common_users"])
    assert "on the 1 users both rows scored (1 and 2)" in capsys.readouterr().err
    assert result["common_users"] == ["u1"]
    row, baseline = result["rows"].values()
    # u1's queries 0, 1, 2 (golds sports, crime, sports): OPPU 2/3 right, the baseline 2/3 right
    assert row["metrics"]["accuracy"] == pytest.approx(2 / 3) and baseline["metrics"]["accuracy"] == pytest.approx(
        2 / 3
    )
    assert row["n_users"] == baseline["n_users"] == 1 and row["n_queries"] == 3
    assert set(baseline["per_user"]) == {"u1"}
    diff = result["paired"][0]["metrics"]["accuracy"]
    assert diff["difference"] == pytest.approx(0.0) and (diff["gained"], diff["lost"], diff["tied"]) == (0, 0, 1)
    assert json.loads(grid_table.read_text())["rows"]["non_personalized"]["n_users"] == 2  # nothing rewritten
    with pytest.raises(UserError, match="no row 'RAG'; it has OPPU"):
        compare_rows.main(argv[:6] + ["--row", f"{study_file}:RAG", "--baseline", f"{tmp_path / 'W'}:OPPU"])
    for bad in ({"users": []}, [1, 2], {"grid": None}):
        (tmp_path / "other.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match="other.json: not a grid's or a study's table.json"):
            compare_rows.main(
                argv[:6] + ["--row", f"{tmp_path / 'other.json'}:OPPU", "--baseline", f"{study_file}:OPPU"]
            )
    with pytest.raises(UserError, match="a grid's work folder, not a file"):  # analyze_grid reads only work folders
        analyze_grid.main(argv[:4] + ["--work_dir", str(study_file)])


def test_compare_rows_refuses_predictions_changed_since_scored(tmp_path):
    """A table row that recorded its predictions' hash (run_grid.py's since 2026-11-30) is not
    compared once another call has answered into the same file; a missing file is named."""
    data, work = tmp_path / "data", tmp_path / "W"
    table_file = write_grid(data, work, PREDS)
    table = json.loads(table_file.read_text())
    for row in table["rows"].values():
        row["predictions_sha256"] = file_fingerprint(Path(row["predictions"]))
    table_file.write_text(json.dumps(table))
    argv = ["--task_name", "news_categorize", "--data_dir", str(data), "--resamples", "20"]
    argv += ["--row", f"{work}:OPPU", "--baseline", f"{work}:non_personalized"]
    assert compare_rows.main(argv)["paired"][0]["metrics"]["accuracy"]["difference"] == pytest.approx(-0.2)
    oppu = Path(table["rows"]["OPPU"]["predictions"])
    oppu.write_text(oppu.read_text().replace('"sports"', '"crime"', 1))
    with pytest.raises(
        UserError, match=r"k0-news_categorize-M-OPPU.json: changed since .*table.json scored row 'OPPU'"
    ):
        compare_rows.main(argv)
    oppu.unlink()
    with pytest.raises(UserError, match=r"row 'OPPU''s predictions .*OPPU.json: no such file"):
        compare_rows.main(argv)


def test_a_user_without_queries_is_left_out_as_the_grid_does(tmp_path):
    """Per-user scores list a user without queries as n 0: both scripts skip them, as the grid's
    own intervals do, and give the figures they give without that user."""
    figures = []
    for empty in (False, True):
        data, work = tmp_path / f"data{empty}", tmp_path / f"W{empty}"
        write_grid(data, work, PREDS, empty_user=empty)
        argv = ["--task_name", "news_categorize", "--data_dir", str(data)]
        lines = json.loads(analyze_grid.main(argv + ["--work_dir", str(work)])["json"].read_text())["users"]
        pair = ["--row", f"{work}:OPPU", "--baseline", f"{work}:non_personalized", "--resamples", "50"]
        diff = compare_rows.main(argv + pair)["paired"][0]["metrics"]["accuracy"]
        figures.append(([u["user_id"] for u in lines], diff))
    assert figures[1] == figures[0] and figures[0][0] == ["u1", "u2"]


def test_an_error_that_falls_counts_as_a_gain():
    """MAE and RMSE are better lower: a user whose error fell gained."""
    lines = [
        {"user_id": "a", "history": 3, "queries": 1, "steps": 2, "first_loss": 1.0, "final_loss": 0.5,
         "OPPU": 0.5, "non_personalized": 1.5, "difference": -1.0},
        {"user_id": "b", "history": 2, "queries": 1, "steps": 2, "first_loss": 1.0, "final_loss": 0.5,
         "OPPU": 2.0, "non_personalized": 1.0, "difference": 1.0},
        {"user_id": "c", "history": 1, "queries": 1, "steps": 2, "first_loss": 1.0, "final_loss": 0.5,
         "OPPU": 0.0, "non_personalized": 1.0, "difference": -1.0},
    ]  # fmt: skip
    assert "2 users gained, 1 lost, 0 tied" in markdown(lines, "OPPU", "non_personalized", "MAE", None)
    assert "1 users gained, 2 lost, 0 tied" in markdown(lines, "OPPU", "non_personalized", "accuracy", None)
