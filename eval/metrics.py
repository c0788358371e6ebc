"""The official LaMP metrics, computed offline: accuracy/F1, MAE/RMSE, ROUGE-1/ROUGE-L."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score

from oppu.tasks import Task

RATINGS = (1.0, 5.0)  # the LaMP-3 scale ends
LOWER_IS_BETTER = frozenset({"MAE", "RMSE"})  # errors; every other metric is better higher


def label_index(labels: Sequence[str], text: str) -> int:
    """Index of the stripped text in the official label list, or -1 (always a wrong class)."""
    text = text.strip()
    return labels.index(text) if text in labels else -1


def classification_metrics(labels: Sequence[str], golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """LaMP-1/2N/2M: accuracy and macro F1 over every label index (never over -1)."""
    labels = list(labels)
    gold_idx = [label_index(labels, g) for g in golds]
    pred_idx = [label_index(labels, p) for p in preds]
    # zero_division=0 gives the same numbers as the official default ("warn": 0 plus a
    # warning) for labels absent from both golds and predictions; it only drops the warning.
    f1 = f1_score(gold_idx, pred_idx, labels=list(range(len(labels))), average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(gold_idx, pred_idx)), "f1": float(f1)}


def parse_rating(pred: str, gold: float) -> float:
    """A prediction that parses as a number is used as is; otherwise the rating farthest from gold.

    Non-finite numbers ("nan", "inf") count as unparseable: the official scorer crashes on them.
    """
    try:
        value = float(pred.strip())
    except ValueError:
        value = math.nan
    if math.isfinite(value):
        return value
    low, high = RATINGS
    return low if abs(low - gold) > abs(high - gold) else high


def rating_metrics(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """LaMP-3: mean absolute error and root mean squared error (golds must parse as numbers)."""
    gold_values = [float(g.strip()) for g in golds]
    errors = [parse_rating(p, g) - g for p, g in zip(preds, gold_values, strict=True)]
    mae = sum(abs(e) for e in errors) / len(errors)
    rmse = math.sqrt(sum(e * e for e in errors) / len(errors))
    return {"MAE": mae, "RMSE": rmse}


def rouge_per_example(golds: Sequence[str], preds: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-1 and ROUGE-L F-measure of each prediction (default tokenizer, no stemming)."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [scorer.score(g.strip(), p.strip()) for g, p in zip(golds, preds, strict=True)]
    return [{"rouge-1": s["rouge1"].fmeasure, "rouge-L": s["rougeL"].fmeasure} for s in scores]


def generation_metrics(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """LaMP-4/5/7: mean per-example ROUGE F-measures (the official bootstrap's point estimate)."""
    per_example = rouge_per_example(golds, preds)
    return {key: sum(s[key] for s in per_example) / len(per_example) for key in ("rouge-1", "rouge-L")}


def score_lists(task: Task, golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """The task's official metrics on aligned, non-empty lists of gold and predicted outputs."""
    if len(golds) != len(preds) or not golds:
        counts = f"{len(golds)} golds and {len(preds)} predictions"
        raise ValueError(f"need equal, non-zero numbers of golds and predictions, got {counts}")
    if task.kind == "classification":
        return classification_metrics(task.labels, golds, preds)
    if task.kind == "rating":
        return rating_metrics(golds, preds)
    if task.kind == "generation":
        return generation_metrics(golds, preds)
    raise ValueError(f"unknown task kind {task.kind!r}")


def score(task: Task, golds: Mapping[str, str], preds: Mapping[str, str]) -> dict[str, float]:
    """The task's official metrics; prediction ids must equal gold ids (the official rule)."""
    if set(golds) != set(preds):
        raise ValueError("prediction ids differ from gold ids")
    ids = sorted(golds)
    return score_lists(task, [golds[i] for i in ids], [preds[i] for i in ids])
