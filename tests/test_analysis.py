"""Reading a grid user by user (oppu/analysis.py, eval/analyze_grid.py) on hand-made files."""

from __future__ import annotations

import json
import math

import pytest

from eval import analyze_grid
from oppu.analysis import agreement_split, manifest_path, per_user_rows, read_manifest, spearman
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


def test_script_on_a_hand_made_grid(tmp_path):
    data, work = tmp_path / "data", tmp_path / "W"
    (data / "news_categorize").mkdir(parents=True)
    (data / "news_categorize" / "user_top_100_history.json").write_text(json.dumps(USERS))
    out = work / "output" / "news_categorize"
    out.mkdir(parents=True)
    rows = {}
    for name, preds in PREDS.items():
        f = out / f"k0-news_categorize-M-{name}.json"
        f.write_text(json.dumps({"task": "LaMP_2N", "golds": [{"id": i, "output": p} for i, p in preds.items()]}))
        per_user = {u["user_id"]: {"accuracy": 0.0, "n": len(u["query"])} for u in USERS}
        for u in USERS:
            hits = [preds[q["id"]] == q["gold"] for q in u["query"]]
            per_user[u["user_id"]]["accuracy"] = sum(hits) / len(hits)
        rows[name] = {"metrics": {"accuracy": 0.0, "f1": 0.0}, "predictions": str(f), "per_user": per_user}
    run = work / "ckpt" / "news_categorize" / "k0-news_categorize-M-OPPU"
    run.mkdir(parents=True)
    manifest = [{"user_id": u, "steps": 3, "final_loss": 0.1, "losses": [1.0, 0.5, 0.1]} for u in ("u1", "u2")]
    (run / "manifest.jsonl").write_text("\n".join(json.dumps(m) for m in manifest))
    table = work / "results" / "news_categorize" / "table.json"
    table.parent.mkdir(parents=True)
    table.write_text(json.dumps({"rows": rows}))
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
