"""The trivial predictors that OPPU must at least match."""

from __future__ import annotations

import json

import pytest

from eval import trivial_baselines
from oppu.tasks import get_task
from utils import UserError

TASK = get_task("news_categorize")


def user(uid: str, labels: list[str], queries: list[str]) -> dict:
    profile = [{"id": f"{uid}h{i}", "text": "t", "title": "", "category": c} for i, c in enumerate(labels)]
    return {
        "user_id": uid,
        "profile": profile,
        "query": [{"id": f"{uid}q{i}", "input": "x", "gold": g} for i, g in enumerate(queries)],
    }


def test_user_majority_is_each_users_most_frequent_history_label():
    tests = [user("a", ["sports", "crime", "sports"], ["crime"]), user("b", ["crime", "travel"], ["travel", "crime"])]
    # b's tie (crime 1, travel 1) goes to the label seen first
    assert trivial_baselines.user_majority_predictions(TASK, tests) == {"aq0": "sports", "bq0": "crime", "bq1": "crime"}


def test_global_majority_counts_histories_and_other_users_queries_only():
    tests = [user("a", ["sports"], ["travel"])]
    others = [user("o", [], ["crime", "crime"])]
    assert trivial_baselines.majority_predictions(TASK, tests, others) == {"aq0": "crime"}


def test_script_writes_lamp_predictions(tmp_path):
    folder = tmp_path / "data" / TASK.name
    folder.mkdir(parents=True)
    (folder / "user_top_100_history.json").write_text(json.dumps([user("a", ["sports", "sports"], ["sports"])]))
    (folder / "user_others.json").write_text(json.dumps([user("o", [], ["crime"] * 3)]))
    out = trivial_baselines.main(
        ["--task_name", "LaMP_2N", "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")]
    )
    majority = json.loads(out["majority"].read_text())
    assert majority["task"] == "LaMP_2N" and majority["golds"] == [{"id": "aq0", "output": "crime"}]
    assert json.loads(out["user_majority"].read_text())["golds"] == [{"id": "aq0", "output": "sports"}]


def test_generation_tasks_are_refused(tmp_path):
    with pytest.raises(UserError, match="trivial predictors exist for"):
        trivial_baselines.main(["--task_name", "news_headline", "--data_dir", str(tmp_path)])
