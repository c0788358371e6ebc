"""Why a personalized row wins or loses against its baseline, user by user (issue 9's "read the
result honestly"): each user's history length, optimiser steps and learning curve beside the two
rows' scores; for classification tasks, the queries split by whether their gold label is the
user's most frequent history label (where a personal adapter that learnt "this user's label"
should gain) or not (where it should lose); and two pictures: each user's gain against their
history length, and the users' learning curves."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scipy.stats import spearmanr

from eval.metrics import LOWER_IS_BETTER
from eval.trivial_baselines import most_common
from oppu.data import User
from oppu.tasks import Task


def manifest_path(predictions: Path, task_name: str) -> Path:
    """The manifest of the OPPU run that wrote a row's predictions file ``<output>/<task>/<run>.json``:
    ``<ckpt>/<task>/<run>/manifest.jsonl``, with ``<ckpt>`` the run's --ckpt_dir as its config
    beside the predictions records it (else the output folder's sibling ``ckpt``)."""
    predictions = Path(predictions)
    config = predictions.with_suffix(".config.json")
    ckpt = json.loads(config.read_text(encoding="utf-8")).get("ckpt_dir") if config.is_file() else None
    if not ckpt:  # <root>/output/<task>/, or <root>/output/<stage flags>/<task>/
        root = predictions.parent.parent.parent
        ckpt = (root.parent if root.name == "output" else root) / "ckpt"
    ckpt = Path(ckpt)
    return ckpt / task_name / predictions.stem / "manifest.jsonl"


def read_manifest(path: Path) -> dict[str, dict]:
    """Each user's training record (the last line for a user wins, as after a resumed run)."""
    if not Path(path).is_file():
        return {}
    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {m["user_id"]: m for m in lines}


def agreement_split(
    task: Task, users: Sequence[User], preds: Mapping[str, Mapping[str, str]]
) -> dict[str, dict[str, Any]]:
    """Classification only. Queries split by whether the gold label is the user's most frequent
    history label ("agrees") or not ("disagrees"); per split and per row (``preds``: row -> query
    id -> answer): queries, accuracy, and the fraction of answers that are the user's majority
    label (1.0 means the row answered that label whatever the query)."""
    field = task.target_field
    split: dict[str, dict[str, Any]] = {}
    for part in ("agrees", "disagrees"):
        split[part] = {"queries": 0} | {row: {"correct": 0, "majority_answers": 0} for row in preds}
    for user in users:
        majority = most_common([it[field] for it in user["profile"]])
        for q in user["query"]:
            part = split["agrees" if q["gold"] == majority else "disagrees"]
            part["queries"] += 1
            for row, answers in preds.items():
                part[row]["correct"] += answers[q["id"]] == q["gold"]
                part[row]["majority_answers"] += answers[q["id"]] == majority
    for part in split.values():
        n = part["queries"]
        for row in preds:
            c = part[row]
            part[row] = {"accuracy": c["correct"] / n if n else math.nan} | {
                "majority_answers": c["majority_answers"] / n if n else math.nan
            }
    return split


def per_user_rows(
    users: Sequence[User],
    scores: Mapping[str, Mapping[str, Mapping[str, float]]],
    row: str,
    baseline: str,
    metric: str,
    manifest: Mapping[str, dict],
) -> list[dict[str, Any]]:
    """One line per user: history items, steps and first/last training loss (from the row's
    manifest, if any), both rows' score on ``metric`` and the difference (row - baseline)."""
    out = []
    for user in users:
        uid = user["user_id"]
        m = manifest.get(uid, {})
        losses = m.get("losses") or []
        a, b = scores[row][uid][metric], scores[baseline][uid][metric]
        out.append(
            {
                "user_id": uid,
                "history": len(user["profile"]),
                "queries": len(user["query"]),
                "steps": m.get("steps"),
                "first_loss": losses[0] if losses else None,
                "final_loss": m.get("final_loss"),
                row: a,
                baseline: b,
                "difference": a - b,
            }
        )
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank); nan when either side is constant."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)


def _axes():
    """A headless matplotlib figure with one axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0))


def _save(fig, ax, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_gain(lines: Sequence[Mapping[str, Any]], path: Path, metric: str, title: str) -> Path:
    """Each user's difference (row - baseline) against their history length (grey-scale safe)."""
    fig, ax = _axes()
    ax.axhline(0.0, color="0.6", linewidth=1, linestyle="--")
    ax.scatter([u["history"] for u in lines], [u["difference"] for u in lines], color="0.1", s=22, alpha=0.7)
    ax.set_xlabel("history items used for personal training")
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    ax.set_ylabel(f"{metric}: personalized − baseline (per user; {better} is better)")
    return _save(fig, ax, path, title)


def plot_curves(manifest: Mapping[str, dict], path: Path, title: str) -> Path:
    """Every user's training loss per optimiser step (thin grey) and the median over users (black)
    for the steps that at least half of the users reached."""
    curves = [m["losses"] for m in manifest.values() if m.get("losses")]
    fig, ax = _axes()
    for c in curves:
        ax.plot(range(1, len(c) + 1), c, color="0.75", linewidth=0.7)
    longest = max((len(c) for c in curves), default=0)
    median = []
    for step in range(longest):
        at = [c[step] for c in curves if len(c) > step]
        if 2 * len(at) < len(curves):
            break
        median.append(statistics.median(at))
    if median:
        ax.plot(range(1, len(median) + 1), median, color="0.0", linewidth=2, label=f"median of {len(curves)} users")
        ax.legend()
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (nats per target token)")
    return _save(fig, ax, path, title)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(
    lines: Sequence[Mapping[str, Any]],
    row: str,
    baseline: str,
    metric: str,
    split: Mapping[str, Mapping[str, Any]] | None,
) -> str:
    """The summary (gained/lost/tied, rank correlation of the gain with history and with the final
    loss), the agreement split and the per-user table, as markdown."""
    diffs = [u["difference"] for u in lines]
    sign = -1 if metric in LOWER_IS_BETTER else 1  # an error (MAE, RMSE) that falls is a gain
    gained, lost = sum(sign * d > 0 for d in diffs), sum(sign * d < 0 for d in diffs)
    out = [
        f"**{row} − {baseline}, {metric} per user:** {gained} users gained, {lost} lost, "
        f"{len(diffs) - gained - lost} tied; mean difference {sum(diffs) / len(diffs):+.3f}.",
        f"Rank correlation (Spearman) of the difference with history length: "
        f"{spearman([u['history'] for u in lines], diffs):+.2f}",
    ]
    with_loss = [u for u in lines if u["final_loss"] is not None]
    if len(with_loss) > 2:
        rho = spearman([u["final_loss"] for u in with_loss], [u["difference"] for u in with_loss])
        out[-1] += f"; with the personal adapter's final training loss: {rho:+.2f}."
    if split:
        out += [
            "",
            "| queries | n | "
            + " | ".join(f"{r} accuracy | {r}: answers = user's majority" for r in (baseline, row))
            + " |",
            "|---|---|" + "---|---|" * 2,
        ]
        for part, label in (("agrees", "gold = user's majority label"), ("disagrees", "gold ≠ user's majority label")):
            s = split[part]
            cells = [f"{s[r]['accuracy']:.3f} | {s[r]['majority_answers']:.3f}" for r in (baseline, row)]
            out.append(f"| {label} | {s['queries']} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"| user | history | steps | first loss | final loss | {baseline} | {row} | difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for u in sorted(lines, key=lambda u: -u["history"]):
        cells = [u["user_id"], u["history"], u["steps"], u["first_loss"], u["final_loss"], u[baseline], u[row]]
        out.append("| " + " | ".join(_fmt(c) for c in cells) + f" | {u['difference']:+.3f} |")
    return "\n".join(out) + "\n"
