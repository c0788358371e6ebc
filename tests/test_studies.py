"""The studies: activity bins, per-bin scores and intervals, the plot and the tables, on hand-made
per-user score files; the study rows exist in the grid and parse as stage flags."""

from __future__ import annotations

import json
import math

import pytest

import OPPU
import studies as script
import task_LoRA
from oppu import grid as G
from oppu.studies import (
    STUDIES,
    activity_bins,
    activity_markdown,
    activity_table,
    bin_scores,
    plot_activity,
    select_rows,
    side_by_side,
    users_scorer,
)
from utils import UserError

LENGTHS = {"a": 3, "b": 3, "c": 4, "d": 5, "e": 8, "f": 8, "g": 8, "h": 12, "i": 20}


def test_bins_are_equal_count_by_history_length_and_keep_ties_together():
    bins = activity_bins(LENGTHS, n_bins=3, min_users=2)
    # ranks 0-8: a user joins the bin of the middle rank of its length (rank * 3 // 9)
    assert [b.users for b in bins] == [("a", "b", "c"), ("d", "e", "f", "g"), ("h", "i")]
    assert [b.label for b in bins] == ["3-4 items", "5-8 items", "12-20 items"]
    assert [(b.low, b.high) for b in bins] == [(3, 4), (5, 8), (12, 20)]


def test_a_run_of_ties_goes_to_the_bin_of_its_middle_rank():
    # e-i (ranks 4-8, middle 6) all have 9 items: by their first rank (4 * 3 // 9 = 1) they would
    # join d and leave the top bin empty; by their middle rank (6 * 3 // 9 = 2) they fill it
    capped = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 9, "f": 9, "g": 9, "h": 9, "i": 9}
    bins = activity_bins(capped, n_bins=3, min_users=1)
    assert [b.users for b in bins] == [("a", "b", "c"), ("d",), ("e", "f", "g", "h", "i")]


def test_small_bins_join_their_neighbour():
    bins = activity_bins(LENGTHS, n_bins=3, min_users=3)
    assert [b.users for b in bins] == [("a", "b", "c"), ("d", "e", "f", "g", "h", "i")]
    assert [b.label for b in activity_bins(LENGTHS, n_bins=3, min_users=10)] == ["3-20 items"]
    assert [b.label for b in activity_bins({"x": 12, "y": 12, "z": 12}, n_bins=3, min_users=1)] == ["12 items"]


# A hand-made per-user score file, as eval/eval_task.py --per_user writes it (one per row).
PER_USER = {
    "OPPU": {
        "a": {"accuracy": 1.0, "f1": 1.0, "n": 2},
        "b": {"accuracy": 0.5, "f1": 0.25, "n": 2},
        "c": {"accuracy": 0.0, "f1": 0.0, "n": 4},
        "d": {"accuracy": 1.0, "f1": 1.0, "n": 1},
        "e": {"accuracy": 0.5, "f1": 0.5, "n": 2},
        "f": {"accuracy": 1.0, "f1": 1.0, "n": 3},
    },
    "non_personalized": {u: {"accuracy": 0.5, "f1": 0.2, "n": n} for u, n in zip("abcdef", [2, 2, 4, 1, 2, 3])},
}
SIX = {u: LENGTHS[u] for u in "abcdef"}  # bins: a, b (3 items) | c, d (4-5) | e, f (8)


def test_bin_score_weights_users_by_their_queries():
    stat = users_scorer(PER_USER["OPPU"], ["a", "b", "c"])
    assert stat([0, 1, 2]) == pytest.approx({"accuracy": (2 * 1 + 2 * 0.5 + 0) / 8, "f1": (2 + 0.5 + 0) / 8})
    assert stat([0, 0]) == {"accuracy": 1.0, "f1": 1.0}  # a resample may draw a user twice
    rmse = {"u": {"MAE": 1.0, "RMSE": 2.0, "n": 1}, "v": {"MAE": 0.0, "RMSE": 0.0, "n": 3}}
    assert users_scorer(rmse, ["u", "v"])([0, 1]) == pytest.approx({"MAE": 0.25, "RMSE": math.sqrt(4 / 4)})


def test_bin_scores_and_their_intervals():
    bins = activity_bins(SIX, n_bins=3, min_users=1)
    assert [b.users for b in bins] == [("a", "b"), ("c", "d"), ("e", "f")]
    scores = bin_scores(PER_USER["OPPU"], bins, resamples=200, seed=0)
    assert [s["n_users"] for s in scores] == [2, 2, 2] and [s["n_queries"] for s in scores] == [4, 5, 5]
    assert [s["metrics"]["accuracy"] for s in scores] == pytest.approx([0.75, 0.2, 0.8])
    for s in scores:
        lo, hi = s["ci95"]["accuracy"]
        assert lo <= s["metrics"]["accuracy"] <= hi
    # bin 1: users c (0.0 on 4 queries) and d (1.0 on 1): every resample is 0, 1 or 0.2
    assert scores[1]["ci95"]["accuracy"] == [0.0, 1.0]
    flat = bin_scores(PER_USER["non_personalized"], bins, resamples=50, seed=0)
    assert all(s["ci95"]["accuracy"] == [0.5, 0.5] for s in flat)  # every user scored the same
    assert bin_scores(PER_USER["OPPU"], bins, resamples=200, seed=0) == scores  # seeded


def test_activity_table_markdown_and_plot_from_a_per_user_score_file(tmp_path):
    path = tmp_path / "per_user.json"
    path.write_text(json.dumps(PER_USER))
    table = activity_table(json.loads(path.read_text()), SIX, n_bins=3, min_users=1, resamples=100)
    assert [b["label"] for b in table["bins"]] == ["3 items", "4-5 items", "8 items"]
    assert list(table["rows"]) == ["OPPU", "non_personalized"]
    md = activity_markdown(table)
    assert md.splitlines()[0] == "| row | history | users | queries | accuracy ↑ [95% CI] | f1 ↑ [95% CI] |"
    assert "| non_personalized | 8 items | 2 | 5 | 0.500 [0.500, 0.500] | 0.200 [0.200, 0.200] |" in md
    png = plot_activity(table, tmp_path / "plots" / "activity.png", "demo")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 480)  # two metrics side by side, 5 x 4 inches each at 120 dpi


def test_paired_differences_within_each_bin():
    """OPPU − non_personalized on the bins' own users, by hand: bin 1 (a, b) accuracy 0.75 − 0.5;
    a resample draws {a, a} (+0.5), {a, b} (+0.25) or {b, b} (0), so the interval spans 0 to 0.5."""
    table = activity_table(PER_USER, SIX, n_bins=3, min_users=1, resamples=100)
    (paired,) = table["paired"]
    assert (paired["row"], paired["baseline"]) == ("OPPU", "non_personalized")
    acc = [b["metrics"]["accuracy"] for b in paired["bins"]]
    assert [d["difference"] for d in acc] == pytest.approx([0.25, -0.3, 0.3])
    assert [(d["gained"], d["lost"], d["tied"]) for d in acc] == [(1, 0, 1), (1, 1, 0), (1, 0, 1)]
    assert acc[0]["ci95"] == pytest.approx([0.0, 0.5])
    f1 = paired["bins"][0]["metrics"]["f1"]
    assert f1["difference"] == pytest.approx(0.425) and f1["ci95"] == pytest.approx([0.05, 0.8])
    md = activity_markdown(table)
    assert (
        "| OPPU − non_personalized | 3 items | 2 | +0.250 [+0.000, +0.500] (1/0/1) | +0.425 [+0.050, +0.800] (2/0/0) |"
        in md
    )
    assert activity_table(PER_USER, SIX, n_bins=3, min_users=1, resamples=10, pairs=[("OPPU", "RAG")])["paired"] == []


def test_activity_f1_is_pooled_over_each_bins_queries():
    """With each row's queries (as the study passes them), a bin's F1 is LaMP's macro-F1 on the
    bin's pooled queries, not the mean of its users' own (which, with a label or two per user,
    stays near 1/15 however good the row is)."""
    from eval import metrics
    from oppu import grid as G
    from oppu import studies as S
    from oppu.studies import pooled_f1
    from oppu.tasks import get_task

    news = get_task("news_categorize")
    golds = ["sports", "crime", "crime", "travel", "sports", "sports", "crime", "travel", "travel", "sports"]
    preds = ["sports", "crime", "sports", "travel", "sports", "crime", "crime", "travel", "sports", "sports"]
    users = list("abcdef")
    groups = [[0, 1], [2, 3], [4, 5, 6], [7], [8], [9]]
    ex = G.Examples(users, groups, golds, preds)
    base_preds = ["sports"] * len(golds)  # the baseline answers one label
    base = G.Examples(users, groups, golds, base_preds)
    per_user = {u: {"accuracy": 0.5, "f1": 0.1, "n": len(g)} for u, g in zip(users, groups)}
    rows = {"OPPU": per_user, "non_personalized": per_user}
    pooled = {"OPPU": pooled_f1(news, ex), "non_personalized": pooled_f1(news, base)}
    table = activity_table(rows, SIX, n_bins=3, min_users=1, resamples=50, pooled_by_row=pooled)
    first = [i for g in groups[:2] for i in g]  # bin "3 items": users a and b

    def f1(answers):
        return metrics.score_lists(news, [golds[i] for i in first], [answers[i] for i in first])["f1"]

    assert table["rows"]["OPPU"][0]["metrics"]["f1"] == pytest.approx(f1(preds)) != 0.1  # not the users' 0.1
    assert table["rows"]["OPPU"][0]["metrics"]["accuracy"] == 0.5  # the other metrics as before
    (paired,) = table["paired"]  # OPPU − non_personalized, per bin, on the pooled F1s
    assert paired["bins"][0]["metrics"]["f1"]["difference"] == pytest.approx(f1(preds) - f1(base_preds))
    # F1's interval is the grid's BCa one over the bin's users: the same as bootstrap_ci gives
    statistic = S.users_scorer(per_user, ["a", "b"], pooled["OPPU"])
    assert table["rows"]["OPPU"][0]["ci95"]["f1"] == G.bootstrap_ci([[0], [1]], statistic, 50, 0)["f1"]
    assert "F1 is LaMP's macro-F1 on the bin's pooled queries" in activity_markdown(table)


def test_side_by_side_puts_each_setting_in_its_own_column():
    def row(v):
        return {"metrics": {"accuracy": v}, "ci95": {"accuracy": [v - 0.1, v + 0.1]}}

    table = {"rows": {"RAG": row(0.5), "OPPU+RAG": row(0.7), "RAG[least]": row(0.3)}}
    md = side_by_side(table, [("most", ("RAG", "OPPU+RAG")), ("least", ("RAG[least]", "OPPU+RAG[least]"))])
    assert md.splitlines() == [
        "| method | accuracy (most) | accuracy (least) |",
        "|---|---|---|",
        "| RAG | 0.500 [0.400, 0.600] | 0.300 [0.200, 0.400] |",
        "| OPPU+RAG | 0.700 [0.600, 0.800] | — |",
    ]


@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_row_is_a_grid_row_whose_flags_the_stages_accept(name):
    study = STUDIES[name]
    for row_name in study.rows + tuple(r for pair in study.pairs for r in pair):
        row = G.ROWS[row_name]
        base = ["--task_name", "news_categorize", "--k", str(row.k), *row.flags]
        task_LoRA.parse_args(base)
        if row.stage == "OPPU":
            OPPU.parse_args([*base, "--task_lora", "x", *row.user_flags])


def test_rows_pick_a_subset_of_the_study_in_its_order_with_the_pairs_both_kept():
    shift = STUDIES["shift"]
    assert select_rows(shift, None) == shift and select_rows(shift, []) == shift
    part = select_rows(shift, ["RAG[least]", "RAG"])
    assert part.rows == ("RAG", "RAG[least]") and part.pairs == (("RAG[least]", "RAG"),)
    assert select_rows(STUDIES["activity"], ["OPPU", "non_personalized"]).pairs == ()
    with pytest.raises(UserError, match="--rows: OPPU\\[ia3\\] not in this study's rows"):
        select_rows(shift, ["RAG", "OPPU[ia3]"])


def test_script_splits_its_own_flags_from_the_stage_flags():
    args, stage = script.parse_args(["activity", "--task_name", "LaMP_2N", "--work_dir", "W", "--", "--max_users", "3"])
    assert (args.study, args.task_name, args.work_dir, args.n_bins) == ("activity", "LaMP_2N", "W", 3)
    assert stage == ["--max_users", "3"]


def test_adapter_sizes_come_from_each_rows_manifest(tmp_path):
    from oppu.runs import oppu_dir
    from oppu.studies import adapter_sizes, sizes_markdown
    from oppu.tasks import get_task

    grid = G.Grid(get_task("news_categorize"), tmp_path / "data", tmp_path / "W")
    ckpt, _ = G.run_dirs(grid, G.ROWS["OPPU[ia3]"].user_flags)
    run = oppu_dir(ckpt, grid.task, 0, grid.settings.model_name, False)
    run.mkdir(parents=True)
    lines = [
        {"user_id": u, "trainable_params": 57600, "adapter_bytes": 2048 * 60, "seconds": s}
        for u, s in (("a", 3), ("b", 4))
    ]
    (run / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    sizes = adapter_sizes(grid, ["non_personalized", "OPPU", "OPPU[ia3]"])  # OPPU has no run: left out
    assert sizes == {"OPPU[ia3]": {"trainable_params": 57600, "adapter_bytes": 122880, "mean_seconds_per_user": 3.5}}
    assert sizes_markdown(sizes).splitlines()[-1] == "| OPPU[ia3] | 57,600 | 120.0 KiB | 3.5 |"
    # a run folder shared with a call on other users: only the rows' users count
    assert adapter_sizes(grid, ["OPPU[ia3]"], {"b"})["OPPU[ia3]"]["mean_seconds_per_user"] == 4.0
