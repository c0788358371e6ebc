"""run_grid.py: every requested row on a tiny slice with a tiny random model, rerun skips,
bootstrap intervals and paired differences on hand-computed cases, trivial rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import prepare_data
import run_grid
from eval import grid_overview, trivial_baselines
from oppu import analysis, grid
from oppu.tasks import get_task
from utils import UserError

NEWS = get_task("news_categorize")
SIZES = ["--num_test_users", "2", "--num_other_users", "2", "--history_len", "3", "--queries_per_user", "2"]
QUICK = ["--max_step", "1", "--batch_size", "2", "--micro_batch_size", "2", "--max_new_tokens", "3"]
PROFILE_FLAGS = "--max_new_tokens 4 --num_history 2"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_model, tokenizer) -> Path:
    """A 2-layer random Llama saved as a local model folder (config, safetensors, the embedded tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model(0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("grid")
    prepare_data.main(["demo", "--tasks", NEWS.name, "--output_dir", str(root / "data")] + SIZES)
    own = grid.as_flags(task_name=NEWS.name, data_dir=root / "data", work_dir=root / "W", resamples=20)
    own += ["--profile_flags", PROFILE_FLAGS]
    stage = ["--model_name", str(tiny_model_dir), *QUICK]
    return {"root": root, "own": own, "stage": stage, "table": run_grid.main([*own, "--", *stage])}


def test_grid_writes_every_row_with_intervals(full_grid):
    table = full_grid["table"]
    assert list(table["rows"]) == list(grid.PAPER_ROWS)
    for name, row in table["rows"].items():
        assert set(row["metrics"]) == {"accuracy", "f1"}, name
        for metric, (lo, hi) in row["ci95"].items():
            assert 0.0 <= lo <= hi <= 1.0, (name, metric)
        assert row["n_users"] == 2 and row["n_queries"] == 4
        assert set(row["per_user"]) == {"demo-news-000", "demo-news-001"}
        assert row["config"]["data_sha256"]["user_top_100_history.json"]
    assert table["rows"]["OPPU+PAG"]["config"]["data_sha256"]["profile_user_100.json"]
    assert table["config"]["model_name"] == full_grid["stage"][1]
    assert [(p["row"], p["baseline"]) for p in table["paired"]] == list(grid.PAIRS)
    for p in table["paired"]:
        for d in p["metrics"].values():
            assert d["gained"] + d["lost"] + d["tied"] == 2 and d["ci95"][0] <= d["ci95"][1]
    results = full_grid["root"] / "W" / "results" / NEWS.name
    assert json.loads((results / "table.json").read_text())["rows"].keys() == table["rows"].keys()
    text = (results / "table.md").read_text()
    assert all(f"| {name} |" in text for name in grid.PAPER_ROWS) and "**" in text


def test_oppu_rows_count_their_users_own_seconds(full_grid):
    """An OPPU row's time is its users' training and answering summed from its manifest (a
    resumed run counts every user once); other rows keep the call's wall time."""
    rows = full_grid["table"]["rows"]
    assert rows["non_personalized"]["user_seconds"] is None
    manifest = analysis.read_manifest(analysis.manifest_path(Path(rows["OPPU"]["predictions"]), NEWS.name))
    assert set(manifest) == {"demo-news-000", "demo-news-001"}
    assert rows["OPPU"]["user_seconds"] == pytest.approx(sum(m["seconds"] for m in manifest.values()), abs=0.1)
    assert rows["OPPU"]["user_seconds"] > 0
    assert grid.row_seconds(rows["OPPU"]) == rows["OPPU"]["user_seconds"]
    assert grid.row_seconds(rows["base"]) == rows["base"]["seconds"]


def test_profiles_were_generated_for_the_pag_rows(full_grid):
    data = full_grid["root"] / "data" / NEWS.name
    tests = json.loads((data / "profile_user_100.json").read_text())
    assert [p["user_id"] for p in tests] == ["demo-news-000", "demo-news-001"]
    assert len(json.loads((data / "profile_user_others.json").read_text())) == 2


def test_rerun_skips_finished_rows(full_grid, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished row was run again")

    for module, name in (("task_LoRA", "main"), ("OPPU", "main"), ("gen_profile", "main")):
        monkeypatch.setattr(getattr(grid, module), name, refuse)
    monkeypatch.setattr(grid.trivial_baselines, "main", refuse)
    again = run_grid.main([*full_grid["own"], "--", *full_grid["stage"]])
    assert {n: r["metrics"] for n, r in again["rows"].items()} == {
        n: r["metrics"] for n, r in full_grid["table"]["rows"].items()
    }
    # a call for some rows writes a table of every row finished under the same config, in ROWS order
    subset = run_grid.main([*full_grid["own"], "--rows", "OPPU,non_personalized", "--", *full_grid["stage"]])
    assert list(subset["rows"]) == list(grid.PAPER_ROWS) and len(subset["paired"]) == len(grid.PAIRS)


def test_a_call_under_other_stage_flags_leaves_the_first_calls_rows_finished(full_grid, monkeypatch):
    """A study on fewer users in the same work folder answers into its own folder and keeps its
    own records: the full call's predictions and records stay, and its rerun runs nothing."""
    g = grid.Grid(NEWS, full_grid["root"] / "data", full_grid["root"] / "W", tuple(full_grid["stage"]))
    names = ("non_personalized", "OPPU")
    kept = {n: Path(grid.finished_record(g, n)["predictions"]).read_bytes() for n in names}
    fewer = run_grid.main(
        [*full_grid["own"], "--rows", ",".join(names), "--", *full_grid["stage"], "--user_stride", "2"]
    )
    for n in names:
        assert (
            fewer["rows"][n]["n_users"] == 1
            and fewer["rows"][n]["predictions"] != full_grid["table"]["rows"][n]["predictions"]
        )
        assert Path(grid.finished_record(g, n)["predictions"]).read_bytes() == kept[n]

    def refuse(*args, **kwargs):
        raise AssertionError("a finished row ran again")

    for module in ("task_LoRA", "OPPU"):
        monkeypatch.setattr(getattr(grid, module), "main", refuse)
    again = run_grid.main([*full_grid["own"], "--rows", ",".join(names), "--", *full_grid["stage"]])
    assert {n: again["rows"][n]["metrics"] for n in names} == {
        n: full_grid["table"]["rows"][n]["metrics"] for n in names
    }


def test_an_unfinished_oppu_row_reuses_the_task_adapter_without_answering_again(full_grid, monkeypatch):
    g = grid.Grid(NEWS, full_grid["root"] / "data", full_grid["root"] / "W", tuple(full_grid["stage"]))
    grid.record_path(g, "OPPU").unlink()
    answers = Path(full_grid["table"]["rows"]["non_personalized"]["predictions"])
    before = answers.stat().st_mtime_ns
    calls = []
    real = grid.task_LoRA.main

    def spy(argv):
        calls.append(list(argv))
        return real(argv)

    monkeypatch.setattr(grid.task_LoRA, "main", spy)
    again = run_grid.main([*full_grid["own"], "--rows", "non_personalized,OPPU", "--", *full_grid["stage"]])
    assert len(calls) == 1 and "--no_answer" in calls[0] and "--predict_base" not in calls[0]
    assert answers.stat().st_mtime_ns == before  # the task adapter's answers were not rewritten
    assert set(again["rows"]) == set(grid.PAPER_ROWS) and grid.finished_record(g, "OPPU") is not None


def test_a_row_whose_predictions_were_answered_again_is_not_reused(full_grid, monkeypatch):
    """Another call into the same folder under other flags may answer into a finished row's
    predictions file: the record keeps the file's hash, and a file that changed makes the row
    run again. A call for the base row alone does not rewrite the task adapter's answers."""
    g = grid.Grid(NEWS, full_grid["root"] / "data", full_grid["root"] / "W", tuple(full_grid["stage"]))
    answers = Path(grid.finished_record(g, "non_personalized")["predictions"])
    kept = answers.read_bytes()
    grid.record_path(g, "base").unlink()
    calls = []
    real = grid.task_LoRA.main
    monkeypatch.setattr(grid.task_LoRA, "main", lambda argv: calls.append(list(argv)) or real(argv))
    run_grid.main([*full_grid["own"], "--rows", "base", "--", *full_grid["stage"]])
    assert "--no_answer" in calls[0] and "--predict_base" in calls[0] and answers.read_bytes() == kept
    answers.write_text(answers.read_text().replace('"output": "', '"output": "x'))  # answered otherwise
    try:
        assert grid.finished_record(g, "non_personalized") is None
    finally:
        answers.write_bytes(kept)
    assert grid.finished_record(g, "non_personalized") is not None


def test_changed_stage_flags_rerun_the_rows(full_grid):
    data, work = full_grid["root"] / "data", full_grid["root"] / "W"
    same = grid.Grid(NEWS, data, work, tuple(full_grid["stage"]))
    assert grid.finished_record(same, "OPPU") is not None
    fewer_users = grid.Grid(NEWS, data, work, (*full_grid["stage"], "--max_users", "1"))
    assert grid.finished_record(fewer_users, "OPPU") is None
    # the profiles' flags are part of the rows that read profiles, and only of those
    written = tuple(PROFILE_FLAGS.split())
    assert grid.finished_record(grid.Grid(NEWS, data, work, same.stage_flags, profile_flags=written), "PAG")
    other = grid.Grid(NEWS, data, work, same.stage_flags, profile_flags=(*written[:-1], "3"))
    assert grid.finished_record(other, "PAG") is None and grid.finished_record(other, "OPPU") is not None


def test_bootstrap_matches_numpy_by_hand():
    """Three users with 1, 2 and 1 queries, correct = [1], [1, 0], [0]: each resample draws 3
    users with numpy's default_rng(7).integers and takes the accuracy of the pooled queries."""
    groups = [[0], [1, 2], [3]]
    golds = ["sports", "crime", "crime", "travel"]
    preds = ["sports", "crime", "sports", "crime"]
    statistic = grid.pooled_scorer(NEWS, golds, preds)
    assert statistic([0, 1, 2, 3])["accuracy"] == 0.5
    ci = grid.bootstrap_ci(groups, statistic, resamples=200, seed=7)
    correct = [[1.0], [1.0, 0.0], [0.0]]
    rng = np.random.default_rng(7)
    by_hand = []
    for _ in range(200):
        pooled = [c for u in rng.integers(0, 3, size=3) for c in correct[u]]
        by_hand.append(sum(pooled) / len(pooled))
    assert ci["accuracy"] == pytest.approx(list(np.percentile(by_hand, [2.5, 97.5])))
    one_user = grid.bootstrap_ci([[0, 1]], statistic, resamples=20, seed=0)
    assert one_user["accuracy"] == [1.0, 1.0]  # a single user: every resample is that user


def test_bca_is_the_percentile_interval_without_bias_or_skew():
    draws = np.linspace(-1, 1, 1001)
    assert grid.bca_interval(draws, 0.0, [-1.0, 0.0, 1.0]) == pytest.approx(list(np.percentile(draws, [2.5, 97.5])))
    # every resample below the sample's value: the interval moves to the top of the draws
    low, high = grid.bca_interval(draws, 2.0, [0.0, 1.0])
    assert low > 0.9 and high == pytest.approx(1.0, abs=1e-3)


def test_macro_f1_intervals_are_corrected_for_the_resamples_bias():
    """Resampled users drop rare labels, which score 0 in macro F1: the percentile interval sits
    below the sample's F1 (its top near it); the BCa interval the grid gives F1 is centred
    better. Accuracy, a plain mean, keeps its percentile interval."""
    from oppu.tasks import NEWS_CATEGORIES

    rng = np.random.default_rng(3)
    labels = list(NEWS_CATEGORIES)
    weights = np.array([0.5**i for i in range(len(labels))])
    golds, preds, groups = [], [], []
    for _ in range(40):
        groups.append(list(range(len(golds), len(golds) + 8)))
        for _ in range(8):
            g = labels[rng.choice(len(labels), p=weights / weights.sum())]
            golds.append(g)
            preds.append(g if rng.random() < 0.85 else labels[rng.integers(len(labels))])
    statistic = grid.pooled_scorer(NEWS, golds, preds)
    point = statistic(range(len(golds)))["f1"]
    percentile = grid.bootstrap_ci(groups, statistic, resamples=300, seed=0, corrected=())
    bca = grid.bootstrap_ci(groups, statistic, resamples=300, seed=0)
    assert bca["accuracy"] == percentile["accuracy"]
    assert percentile["f1"][1] - point < point - percentile["f1"][0]  # lopsided: the point near its top
    assert bca["f1"][0] > percentile["f1"][0] and bca["f1"][1] > percentile["f1"][1]
    assert bca["f1"][0] < point < bca["f1"][1]


def test_rouge_bootstrap_averages_per_example_scores():
    task = get_task("news_headline")
    statistic = grid.pooled_scorer(task, ["a b", "c d"], ["a b", "x y"])
    assert statistic([0, 1]) == {"rouge-1": 0.5, "rouge-L": 0.5}
    assert statistic([0, 0, 1]) == pytest.approx({"rouge-1": 2 / 3, "rouge-L": 2 / 3})


def test_paired_difference_counts_users_gained_lost_tied():
    golds = ["sports", "crime", "crime", "travel"]
    users, groups = ["u1", "u2", "u3"], [[0], [1, 2], [3]]
    a = grid.Examples(users, groups, golds, ["sports", "crime", "crime", "crime"])  # u2 both right
    b = grid.Examples(users, groups, golds, ["crime", "crime", "sports", "crime"])  # u1 wrong, u2 half
    per_a = {"u1": {"accuracy": 1.0, "f1": 1.0}, "u2": {"accuracy": 1.0, "f1": 1.0}, "u3": {"accuracy": 0.0, "f1": 0.0}}
    per_b = {"u1": {"accuracy": 0.0, "f1": 0.0}, "u2": {"accuracy": 0.5, "f1": 0.5}, "u3": {"accuracy": 0.0, "f1": 0.0}}
    diff = grid.paired_difference(NEWS, a, b, per_a, per_b, resamples=30, seed=3)["accuracy"]
    assert diff["difference"] == pytest.approx(0.75 - 0.25)
    assert (diff["gained"], diff["lost"], diff["tied"]) == (2, 0, 1)
    assert diff["ci95"][0] >= 0.0  # a is never worse on any user
    same = grid.paired_difference(NEWS, a, a, per_a, per_a, resamples=20)["accuracy"]
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["tied"] == 3


def test_lower_is_better_for_errors():
    assert grid.better("MAE", 0.5, 1.0) and not grid.better("accuracy", 0.5, 1.0)


def _user(uid: str, scores: list[str], golds: list[str], field: str = "category") -> dict:
    items = [{"id": f"{uid}h{i}", "text": "t", "title": "", field: s} for i, s in enumerate(scores)]
    return {
        "user_id": uid,
        "profile": items,
        "query": [{"id": f"{uid}q{i}", "input": "x", "gold": g} for i, g in enumerate(golds)],
    }


def test_trivial_rows_on_a_hand_made_file(tmp_path):
    """No model: global majority 'crime' (5 of 7 labels seen) and each user's own majority."""
    folder = tmp_path / "data" / NEWS.name
    folder.mkdir(parents=True)
    tests = [_user("a", ["sports", "sports", "crime"], ["sports", "crime"]), _user("b", ["crime"], ["travel"])]
    (folder / "user_top_100_history.json").write_text(json.dumps(tests))
    (folder / "user_others.json").write_text(json.dumps([_user("o", ["crime"], ["crime", "crime"])]))
    argv = grid.as_flags(task_name=NEWS.name, data_dir=tmp_path / "data", work_dir=tmp_path / "W", resamples=10)
    table = run_grid.main(argv + ["--rows", "global_majority,user_majority"])
    assert table["rows"]["global_majority"]["metrics"]["accuracy"] == pytest.approx(1 / 3)  # crime right once
    assert table["rows"]["user_majority"]["metrics"]["accuracy"] == pytest.approx(1 / 3)  # a: sports right once
    assert table["rows"]["user_majority"]["per_user"]["a"] == {"accuracy": 0.5, "f1": pytest.approx(2 / 3 / 15), "n": 2}
    assert table["rows"]["global_majority"]["n_queries"] == 3 and table["paired"] == []


def test_trivial_ratings_predict_the_mean():
    task = get_task("product_rating")
    tests = [_user("a", ["5", "4", "4"], ["5"], field="score")]
    others = [_user("o", ["1"], ["2", "3"], field="score")]
    assert trivial_baselines.user_majority_predictions(task, tests) == {"aq0": "4.333"}
    assert trivial_baselines.majority_predictions(task, tests, others) == {"aq0": "3.167"}  # 19 / 6


def test_rows_that_cannot_run_are_left_out_and_unknown_rows_refused():
    assert "no trivial predictor" in grid.applicable(get_task("news_headline"), "user_majority")
    assert grid.applicable(NEWS, "OPPU") is None
    with pytest.raises(UserError, match=re.escape("unknown row 'OPPU+XYZ'")):
        grid.applicable(NEWS, "OPPU+XYZ")


def test_flags_the_grid_sets_are_refused(tmp_path):
    with pytest.raises(UserError, match="--k: the grid sets this flag"):
        run_grid.main(["--task_name", NEWS.name, "--work_dir", str(tmp_path), "--", "--k", "2"])
    # a flag that defines rows of its own would relabel: RAG with --retrieval least is RAG[least]
    with pytest.raises(
        UserError, match=r"--retrieval: rows set this flag themselves \(RAG\[least\], OPPU\+RAG\[least\]\)"
    ):
        run_grid.main(["--task_name", NEWS.name, "--work_dir", str(tmp_path), "--", "--retrieval", "least"])
    with pytest.raises(UserError, match="--peft_type=ia3: rows set this flag themselves"):
        run_grid.main(["--task_name", NEWS.name, "--work_dir", str(tmp_path), "--oppu_flags=--peft_type=ia3"])
    for row in grid.ROWS.values():  # every row-defining flag is in ROW_FLAGS, or is --answer_mode
        assert {f for f in row.flags + row.user_flags if f.startswith("--")} <= grid.ROW_FLAGS | {"--answer_mode"}


def test_answer_only_rows_reuse_the_plain_task_adapter_but_write_their_own_predictions(tmp_path):
    g = grid.Grid(NEWS, tmp_path / "data", tmp_path / "W")
    assert grid.answer_only(("--answer_mode", "score")) and grid.answer_only(("--retrieval", "least"))
    assert not grid.answer_only(("--learning_rate", "1e-3")) and grid.answer_only(())
    flags = grid.ROWS["OPPU[score]"].flags
    task_argv = grid.stage_argv(g, grid.ROWS["non_personalized[score]"], flags, [], share_adapter=True)
    oppu_argv = grid.stage_argv(g, grid.ROWS["OPPU[score]"], flags, [])
    value = dict(zip(task_argv[::2], task_argv[1::2]))
    assert value["--ckpt_dir"] == str(tmp_path / "W" / "ckpt")  # the plain task adapter
    assert value["--output_dir"] != str(tmp_path / "W" / "output") and "variants" in value["--output_dir"]
    assert "variants" in dict(zip(oppu_argv[::2], oppu_argv[1::2]))["--ckpt_dir"]  # OPPU's own run folder


def _row(metrics: dict[str, float], users: int = 2) -> dict:
    return {"metrics": metrics, "ci95": {m: [v - 0.1, v + 0.1] for m, v in metrics.items()}, "n_users": users}


def test_overview_puts_each_task_in_a_column_with_the_best_in_bold(tmp_path):
    tables = {
        "news_categorize": {"rows": {"OPPU": _row({"accuracy": 0.8, "f1": 0.2}), "base": _row({"accuracy": 0.1})}},
        "product_rating": {"rows": {"OPPU": _row({"MAE": 0.5, "RMSE": 0.9}), "RAG": _row({"MAE": 0.4, "RMSE": 1})}},
    }
    lines = grid.overview_markdown(tables).splitlines()
    assert lines[0] == "| row | news_categorize accuracy ↑ | product_rating MAE ↓ |"
    # rows in the paper's order; a task without the row shows a dash
    assert lines[2:5] == [
        "| base | 0.100 [0.000, 0.200] | — |",
        "| RAG | — | **0.400** [0.300, 0.500] |",
        "| OPPU | **0.800** [0.700, 0.900] | 0.500 [0.400, 0.600] |",
    ]
    for task, table in tables.items():
        (tmp_path / "results" / task).mkdir(parents=True)
        (tmp_path / "results" / task / "table.json").write_text(json.dumps(table))
    out = grid_overview.main(["--work_dir", str(tmp_path)])
    assert out.read_text().splitlines()[:5] == lines[:5]
    with pytest.raises(UserError, match="results/news_headline/table.json; run run_grid.py first"):
        grid_overview.main(["--work_dir", str(tmp_path), "--tasks", "news_headline"])


def test_other_processes_wait_until_both_profile_files_are_complete(tmp_path):
    folder = tmp_path / NEWS.name
    folder.mkdir()
    users = [{"user_id": u, "profile": [], "query": []} for u in ("a", "b")]
    (folder / "user_top_100_history.json").write_text(json.dumps(users))
    (folder / "user_others.json").write_text(json.dumps(users[:1]))
    g = grid.Grid(NEWS, tmp_path, tmp_path / "W")
    written = iter(
        [
            ("profile_user_100.json", [{"user_id": "a", "output": "x"}]),  # one of two users
            ("profile_user_others.json", [{"user_id": "a", "output": "y"}]),
            ("profile_user_100.json", [{"user_id": "a", "output": "x"}, {"user_id": "b", "output": "z"}]),
        ]
    )
    sleeps = []

    def sleep(seconds):  # stands in for the main process writing the files, batch by batch
        sleeps.append(seconds)
        name, entries = next(written)
        (folder / name).write_text(json.dumps(entries))

    grid.wait_for_profiles(g, poll_seconds=3, sleep=sleep)
    assert sleeps == [3, 3, 3]
    assert grid.profiles_complete(g, {"user_top_100_history.json": users, "user_others.json": users[:1]})


def test_an_answer_only_oppu_row_answers_with_the_plain_rows_peft_and_trains_none(full_grid, monkeypatch, tmp_path):
    """OPPU[score] answers with OPPU's saved PEFTs (nothing trained, nothing rewritten); its answers
    equal those of a run that trains every user's PEFT afresh and answers by scoring."""
    import OPPU

    adapters = sorted((full_grid["root"] / "W" / "ckpt").glob("**/users/*/adapter/*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in adapters}
    train_user = OPPU.train_user

    def refuse(*args, **kwargs):
        raise AssertionError("a user was trained")

    monkeypatch.setattr(OPPU, "train_user", refuse)
    table = run_grid.main([*full_grid["own"], "--rows", "OPPU,OPPU[score]", "--", *full_grid["stage"]])
    assert {p: p.stat().st_mtime_ns for p in adapters} == before
    reused = sorted((full_grid["root"] / "W" / "variants").glob("**/users/*/result.json"))
    assert len(reused) == 2 and all("adapter_from" in json.loads(p.read_text()) for p in reused)
    for path in reused:  # this run's own answering time, not the source run's
        result = json.loads(path.read_text())
        source = json.loads((Path(result["adapter_from"]) / "users" / path.parent.name / "result.json").read_text())
        assert 0 < result["answer_seconds"] <= result["seconds"] + 0.01
        assert result["source_seconds"] == source["seconds"] and result["train_seconds"] == source["train_seconds"]

    monkeypatch.setattr(OPPU, "train_user", train_user)  # the same row trained from scratch elsewhere
    own = [a if a != str(full_grid["root"] / "W") else str(tmp_path / "W2") for a in full_grid["own"]]
    fresh = run_grid.main([*own, "--rows", "OPPU[score]", "--", *full_grid["stage"]])
    records = [
        grid.record_path(grid.Grid(NEWS, full_grid["root"] / "data", w, tuple(full_grid["stage"])), "OPPU[score]")
        for w in (full_grid["root"] / "W", tmp_path / "W2")
    ]
    preds = [json.loads(Path(json.loads(r.read_text())["predictions"]).read_text())["golds"] for r in records]
    assert preds[0] == preds[1] and len(preds[0]) == 4
    assert table["rows"]["OPPU[score]"]["n_queries"] == fresh["rows"]["OPPU[score]"]["n_queries"] == 4


def test_a_peft_is_reused_only_under_the_same_training_settings(tmp_path):
    from oppu.runs import reuse_mismatch

    ours = {"learning_rate": 1e-3, "answer_mode": "score", "max_new_tokens": 3, "ckpt_dir": "a", "retrieval": "most"}
    assert reuse_mismatch(ours, ours | {"answer_mode": "generate", "max_new_tokens": 32, "ckpt_dir": "b"}) is None
    assert reuse_mismatch(ours, ours | {"learning_rate": 1e-4}) == "learning_rate"
    assert reuse_mismatch(ours, ours | {"retrieval": "least"}) == "retrieval"  # OPPU+RAG trains on retrieved items
    assert reuse_mismatch(ours | {"task_lora": "a"}, ours | {"task_lora": "b"}) is None  # its hash is compared
    import argparse

    import OPPU
    from oppu.runs import config_fingerprint

    source, here = tmp_path / "plain-OPPU", tmp_path / "score-OPPU"
    source.mkdir()
    (source / "run_config.json").write_text(json.dumps(ours | {"answer_mode": "generate"}))
    args = argparse.Namespace(reuse_adapters=str(source))
    assert OPPU.reused_source(args, ours, here) == (source, config_fingerprint(ours | {"answer_mode": "generate"}))
    # a plain run trained otherwise (e.g. the grid's --oppu_flags changed since): trained, not refused
    assert OPPU.reused_source(args, ours | {"learning_rate": 1e-4}, here) is None
    with pytest.raises(UserError, match="own folder"):
        OPPU.reused_source(args, ours, source)
    row = grid.ROWS["OPPU[score]"]
    g = grid.Grid(NEWS, tmp_path / "data", tmp_path / "W")
    assert grid.reusable_oppu_run(g, row) is None  # no plain run yet: the row trains
    assert grid.reusable_oppu_run(g, grid.ROWS["OPPU+RAG[least]"]) is None
    assert grid.reusable_oppu_run(g, grid.ROWS["OPPU[ia3]"]) is None


def test_a_user_stride_keeps_every_other_user_and_reuses_their_finished_adapters(full_grid):
    """--user_stride 2 scores every row on users 0, 2, ... of the file; the OPPU stage reuses those
    users' finished adapters (the flag is resume-neutral) instead of training them again. Last in
    this file: it replaces the fixture's row records."""
    adapters = sorted((full_grid["root"] / "W" / "ckpt").glob("**/users/*/**/*.safetensors"))
    assert adapters, "the fixture's OPPU run saved no adapter"
    before = {p: p.stat().st_mtime_ns for p in adapters}
    stage = [*full_grid["stage"], "--user_stride", "2"]
    table = run_grid.main([*full_grid["own"], "--rows", "user_majority,non_personalized,OPPU", "--", *stage])
    for name, row in table["rows"].items():
        assert set(row["per_user"]) == {"demo-news-000"} and row["n_queries"] == 2, name
    assert {p: p.stat().st_mtime_ns for p in adapters} == before  # nothing retrained
    assert table["config"]["user_stride"] == 2


def test_a_table_holds_only_rows_of_its_own_config(full_grid):
    """Rows finished under other stage flags are not this config's: a capped call's table holds its
    own rows. (Last of the full grid's tests: a row's record is kept per row name, so the capped
    call replaces the full grid's global_majority record.)"""
    capped = run_grid.main(
        [*full_grid["own"], "--rows", "global_majority", "--", *full_grid["stage"], "--max_users", "1"]
    )
    assert list(capped["rows"]) == ["global_majority"] and capped["rows"]["global_majority"]["n_users"] == 1
