"""The official LaMP metrics on small cases computed by hand."""

from __future__ import annotations

import math
import warnings

import pytest

from eval.metrics import (
    classification_metrics,
    generation_metrics,
    parse_rating,
    rating_metrics,
    rouge_per_example,
    score,
)
from oppu.tasks import get_task

MOVIE = get_task("LaMP_2M")


def test_classification_strips_and_maps_unknown_predictions_to_a_wrong_class():
    golds = ["comedy", " action ", "sci-fi", "comedy"]  # indices 2, 3, 0, 2
    preds = [" comedy\n", "horror", "sci-fi", "action"]  # indices 2, -1, 0, 3
    result = classification_metrics(MOVIE.labels, golds, preds)
    assert result["accuracy"] == pytest.approx(2 / 4)
    # Per-label F1: sci-fi 1; comedy P=1 R=1/2 -> 2/3; action 0; the 12 labels absent from
    # golds and predictions score 0 (sklearn's zero_division), and the macro mean is over all 15.
    assert result["f1"] == pytest.approx((1 + 2 / 3) / 15)


def test_citation_labels():
    golds = ["[1]", "[2]", "[1]"]  # indices 0, 1, 0
    preds = ["[1]", "2", " [2] "]  # indices 0, -1, 1
    result = classification_metrics(get_task("citation").labels, golds, preds)
    assert result["accuracy"] == pytest.approx(1 / 3)
    # [1]: P=1 R=1/2 -> 2/3; [2]: no true positive -> 0.
    assert result["f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_two_outside_labels_match_for_accuracy_but_not_f1():
    # The official evaluator maps both to -1, which accuracy_score counts as a match.
    result = classification_metrics(MOVIE.labels, ["not a tag"], ["horror"])
    assert result == {"accuracy": 1.0, "f1": 0.0}


def test_labels_absent_everywhere_raise_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        classification_metrics(MOVIE.labels, ["comedy"], ["comedy"])


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        (" 4.5 ", 2.0, 4.5),
        ("1e0", 5.0, 1.0),
        ("n/a", 2.0, 5.0),  # |1-2| > |5-2| is false -> 5
        ("four", 4.0, 1.0),  # |1-4| > |5-4| -> 1
        ("", 3.0, 5.0),  # a tie -> 5
        ("nan", 4.0, 1.0),  # non-finite counts as unparseable
    ],
)
def test_parse_rating(pred: str, gold: float, expected: float):
    assert parse_rating(pred, gold) == expected


def test_rating_metrics():
    golds = ["2", "4", "3", " 5"]
    preds = ["n/a", "four", "", "4.5"]  # used as 5, 1, 5, 4.5 -> errors 3, -3, 2, -0.5
    result = rating_metrics(golds, preds)
    assert result["MAE"] == pytest.approx((3 + 3 + 2 + 0.5) / 4)
    assert result["RMSE"] == pytest.approx(math.sqrt((9 + 9 + 4 + 0.25) / 4))


def test_rouge_per_example():
    golds = ["the cat", "the cat", "the cat"]
    preds = ["the cat sat", " Cat, the! ", ""]
    scores = rouge_per_example(golds, preds)
    # "the cat sat" vs "the cat": P=2/3 R=1 -> F=0.8 for unigrams and for the LCS "the cat".
    assert scores[0] == pytest.approx({"rouge-1": 0.8, "rouge-L": 0.8})
    # Lowercased, punctuation dropped: same unigrams (F=1), LCS of length 1 (P=R=1/2).
    assert scores[1] == pytest.approx({"rouge-1": 1.0, "rouge-L": 0.5})
    assert scores[2] == {"rouge-1": 0.0, "rouge-L": 0.0}
    assert generation_metrics(golds, preds) == pytest.approx(
        {"rouge-1": (0.8 + 1 + 0) / 3, "rouge-L": (0.8 + 0.5 + 0) / 3}
    )


def test_score_aligns_by_id_and_dispatches_by_kind():
    golds = {"b": "3", "a": "1"}
    preds = {"a": "2", "b": "3"}
    assert score(get_task("LaMP_3"), golds, preds) == {"MAE": 0.5, "RMSE": math.sqrt(0.5)}
    assert score(MOVIE, {"a": "comedy"}, {"a": "comedy"})["accuracy"] == 1.0
    assert score(get_task("LaMP_4"), {"a": "x y"}, {"a": "x y"}) == {"rouge-1": 1.0, "rouge-L": 1.0}


def test_score_rejects_different_ids():
    with pytest.raises(ValueError, match="ids"):
        score(MOVIE, {"a": "comedy"}, {"b": "comedy"})
