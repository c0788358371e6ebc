"""The paper's further studies on top of the grid (oppu/grid.py): PEFT types, activity levels,
behaviour shift and history formats. Each is a set of grid rows (run and reused like the grid's),
a table and, for activity levels, a plot."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from oppu import grid as G
from oppu.runs import oppu_dir
from oppu.tasks import Task
from utils import UserError, write_json


@dataclass(frozen=True)
class Study:
    about: str
    rows: tuple[str, ...]  # grid rows (oppu/grid.py ROWS)
    pairs: tuple[tuple[str, str], ...] = ()  # (row, baseline): paired differences on the same users


STUDIES: dict[str, Study] = {
    "peft_types": Study(
        "the personal adapter as LoRA, IA3 or prompt tuning (the task adapter stays LoRA)",
        ("non_personalized", "OPPU", "OPPU[ia3]", "OPPU[prompt_tuning]"),
        (("OPPU[ia3]", "OPPU"), ("OPPU[prompt_tuning]", "OPPU")),
    ),
    "activity": Study(
        "users grouped by history length; each method's score per group",
        ("non_personalized", "RAG", "OPPU", "OPPU+RAG"),
    ),
    "shift": Study(
        "behaviour shift: the k=1 retrieved item is the least relevant instead of the most relevant",
        ("RAG", "OPPU+RAG", "RAG[least]", "OPPU+RAG[least]"),
        (("RAG[least]", "RAG"), ("OPPU+RAG[least]", "OPPU+RAG"), ("OPPU+RAG[least]", "RAG[least]")),
    ),
    "formats": Study(
        "personal training on history items in the query prompt or as plain 'input -> output' lines",
        ("non_personalized", "OPPU", "OPPU[plain]"),
        (("OPPU[plain]", "OPPU"),),
    ),
}
# Activity bins: equal-count groups by history length (terciles: light, medium and heavy users),
# so that every bin has about a third of the users whatever the data's length distribution; a
# bin left with fewer than MIN_BIN_USERS users is merged into its neighbour, since an interval
# from a handful of users means little.
N_BINS = 3
MIN_BIN_USERS = 10
PLOT_FILE = "activity.png"


def select_rows(study: Study, names: Sequence[str] | None) -> Study:
    """The study restricted to ``names`` (a subset of its rows, in the study's order), with the
    paired differences whose two rows are both kept; ``None`` or empty keeps every row."""
    if not names:
        return study
    unknown = [n for n in names if n not in study.rows]
    if unknown:
        raise UserError(f"--rows: {', '.join(unknown)} not in this study's rows ({', '.join(study.rows)})")
    rows = tuple(r for r in study.rows if r in names)
    return replace(study, rows=rows, pairs=tuple(p for p in study.pairs if set(p) <= set(rows)))


def study_dir(work_dir: Path, study: str, task_name: str) -> Path:
    return Path(work_dir) / "studies" / study / task_name


# ---- activity levels ----


@dataclass(frozen=True)
class ActivityBin:
    low: int  # shortest history in the bin
    high: int  # longest history in the bin
    users: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.low} items" if self.low == self.high else f"{self.low}-{self.high} items"


def activity_bins(
    lengths: Mapping[str, int], n_bins: int = N_BINS, min_users: int = MIN_BIN_USERS
) -> list[ActivityBin]:
    """Users grouped by history length into ``n_bins`` groups of about equal size, shortest first.
    Users with the same length always share a bin: the bin of their middle rank, so a long run of
    ties (e.g. every user at a history cap) fills the bin it mostly lies in and does not empty
    the next one. A bin of fewer than ``min_users`` users joins its neighbour."""
    order = sorted(lengths, key=lambda u: (lengths[u], u))
    ranks: dict[int, list[int]] = {}
    for rank, user in enumerate(order):
        ranks.setdefault(lengths[user], []).append(rank)
    groups: list[list[str]] = [[] for _ in range(n_bins)]
    for user in order:
        tied = ranks[lengths[user]]
        groups[(tied[0] + tied[-1]) * n_bins // (2 * len(order))].append(user)
    merged: list[list[str]] = []
    for group in (g for g in groups if g):
        if merged and (len(merged[-1]) < min_users or len(group) < min_users):
            merged[-1] += group
        else:
            merged.append(group)
    return [ActivityBin(lengths[g[0]], lengths[g[-1]], tuple(g)) for g in merged]


Pooled = Callable[[Sequence[str]], dict]  # users (a user drawn twice counts twice) -> pooled metrics


def users_scorer(
    per_user: Mapping[str, Mapping[str, float]], users: Sequence[str], pooled: Pooled | None = None
) -> Callable[[Sequence[int]], dict]:
    """A statistic over indices into ``users``: each metric averaged over those users weighted by
    their queries ("n"). That is the pooled value for accuracy, MAE and ROUGE, and for RMSE when
    combined through its square; not for macro-F1, which ``pooled`` (the row's metrics on the
    given users' pooled queries, as the grid scores a row) gives where it is passed: without it,
    F1 is the users' own macro-F1 averaged weighted by their queries."""
    names = [m for m in per_user[users[0]] if m != "n"]

    def statistic(idx: Sequence[int]) -> dict[str, float]:
        rows = [per_user[users[i]] for i in idx]
        total = sum(r["n"] for r in rows)
        out = {}
        for m in names:
            if m == "RMSE":
                out[m] = math.sqrt(sum(r["n"] * r[m] ** 2 for r in rows) / total)
            else:
                out[m] = sum(r["n"] * r[m] for r in rows) / total
        if pooled is not None:
            out |= pooled([users[i] for i in idx])
        return out

    return statistic


def pooled_f1(task: Task, ex: G.Examples) -> Pooled:
    """A row's macro-F1 on the pooled queries of any users (``ex``: the row's queries, from
    ``G.row_examples``), as LaMP and the grid compute it; nothing for tasks without F1."""
    statistic = G.pooled_scorer(task, ex.golds, ex.preds)
    queries = dict(zip(ex.users, ex.groups))

    def pooled(users: Sequence[str]) -> dict[str, float]:
        scores = statistic([i for u in users for i in queries[u]])
        return {m: scores[m] for m in G.BIASED_METRICS if m in scores}

    return pooled


def bin_scores(
    per_user: Mapping[str, Mapping[str, float]],
    bins: Sequence[ActivityBin],
    resamples: int = 1000,
    seed: int = 0,
    pooled: Pooled | None = None,
) -> list[dict[str, Any]]:
    """Each bin's metrics with a 95% bootstrap interval over its users (the grid's bootstrap;
    with ``pooled``, F1 pooled over the bin's queries, with the grid's BCa interval)."""
    out = []
    for b in bins:
        statistic = users_scorer(per_user, b.users, pooled)
        groups = [[i] for i in range(len(b.users))]
        values = statistic(range(len(b.users)))
        intervals = G.bootstrap_ci(groups, statistic, resamples, seed, corrected=G.BIASED_METRICS if pooled else ())
        out.append(
            {
                "bin": b.label,
                "n_users": len(b.users),
                "n_queries": sum(per_user[u]["n"] for u in b.users),
                "metrics": values,
                "ci95": intervals,
            }
        )
    return out


def bin_differences(
    per_user_a: Mapping[str, Mapping[str, float]],
    per_user_b: Mapping[str, Mapping[str, float]],
    bins: Sequence[ActivityBin],
    resamples: int = 1000,
    seed: int = 0,
    pooled_a: Pooled | None = None,
    pooled_b: Pooled | None = None,
) -> list[dict[str, Any]]:
    """Row a minus row b within each bin, on the bin's users: each metric's difference (the
    bins' statistic), its 95% bootstrap interval (the same resampled users for both rows), and
    the users gained, lost and tied. Overlapping per-row intervals say nothing about a paired
    difference; this does."""
    out = []
    pooled = pooled_a is not None and pooled_b is not None
    for b in bins:
        stat_a, stat_b = users_scorer(per_user_a, b.users, pooled_a), users_scorer(per_user_b, b.users, pooled_b)

        def diff(idx: Sequence[int], stat_a=stat_a, stat_b=stat_b) -> dict[str, float]:
            sa, sb = stat_a(idx), stat_b(idx)
            return {m: sa[m] - sb[m] for m in sa}

        groups = [[i] for i in range(len(b.users))]
        intervals = G.bootstrap_ci(groups, diff, resamples, seed, corrected=G.BIASED_METRICS if pooled else ())
        metrics = {
            m: {"difference": value, "ci95": intervals[m]} | G.user_wins(m, per_user_a, per_user_b, b.users)
            for m, value in diff(range(len(b.users))).items()
        }
        out.append({"bin": b.label, "n_users": len(b.users), "metrics": metrics})
    return out


def activity_table(
    per_user_by_row: Mapping[str, Mapping[str, Mapping[str, float]]],
    lengths: Mapping[str, int],
    n_bins: int = N_BINS,
    min_users: int = MIN_BIN_USERS,
    resamples: int = 1000,
    seed: int = 0,
    pairs: Sequence[tuple[str, str]] = G.PAIRS,
    pooled_by_row: Mapping[str, Pooled] | None = None,
) -> dict[str, Any]:
    """table.json's content: the bins (with their users), every row's scores per bin, and per bin
    the paired differences of ``pairs`` (row, baseline) whose rows are both there. With
    ``pooled_by_row`` (``pooled_f1`` per row), F1 is pooled over each bin's queries."""
    bins = activity_bins(lengths, n_bins, min_users)
    rows = per_user_by_row  # name -> user -> scores
    pooled = pooled_by_row or {}
    return {
        "bins": [{"label": b.label, "low": b.low, "high": b.high, "users": list(b.users)} for b in bins],
        "binning": {"n_bins": n_bins, "min_users": min_users, "by": "history items, equal-count bins"},
        "f1": "pooled over the bin's queries (BCa intervals)" if pooled else "users' own macro-F1, averaged",
        "rows": {
            name: bin_scores(per_user, bins, resamples, seed, pooled.get(name)) for name, per_user in rows.items()
        },
        "paired": [
            {
                "row": a,
                "baseline": b,
                "bins": bin_differences(rows[a], rows[b], bins, resamples, seed, pooled.get(a), pooled.get(b)),
            }
            for a, b in pairs
            if a in rows and b in rows
        ],
    }


def activity_markdown(table: Mapping[str, Any]) -> str:
    """One line per (row, bin): each metric with its interval."""
    first = next(iter(table["rows"].values()))
    names = list(first[0]["metrics"])
    arrows = {m: "↓" if m in G.LOWER_IS_BETTER else "↑" for m in names}
    lines = [
        "| row | history | users | queries | " + " | ".join(f"{m} {arrows[m]} [95% CI]" for m in names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for row, scores in table["rows"].items():
        for s in scores:
            cells = [f"{s['metrics'][m]:.3f} [{s['ci95'][m][0]:.3f}, {s['ci95'][m][1]:.3f}]" for m in names]
            lines.append(f"| {row} | {s['bin']} | {s['n_users']} | {s['n_queries']} | " + " | ".join(cells) + " |")
    pooled = table.get("f1", "").startswith("pooled")
    note = "Per bin: users' scores averaged weighted by their queries" + (
        (
            "; F1 is LaMP's macro-F1 on the bin's pooled queries (BCa intervals)."
            if pooled
            else " (for F1: the users' macro-F1 averaged weighted by their queries, not a pooled F1)."
        )
        if "f1" in names
        else "."
    )
    text = "\n".join(lines) + f"\n\n{note}\n"
    if table.get("paired"):
        lines = [
            "| paired (same users) | history | users | "
            + " | ".join(f"{m} {arrows[m]} difference [95% CI] (gained/lost/tied)" for m in names)
            + " |",
            "|---|---|---|" + "---|" * len(names),
        ]
        for p in table["paired"]:
            for s in p["bins"]:
                cells = [
                    f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] ({d['gained']}/{d['lost']}/{d['tied']})"
                    for d in (s["metrics"][m] for m in names)
                ]
                lines.append(
                    f"| {p['row']} − {p['baseline']} | {s['bin']} | {s['n_users']} | " + " | ".join(cells) + " |"
                )
        text += "\n" + "\n".join(lines) + "\n"
    return text


# Rows differ by marker, line style, shade and marker fill, so the plot reads in grey scale.
STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1))), ("P", (0, (3, 1, 1, 1, 1, 1)))]
GREYS = ["0.0", "0.35", "0.55", "0.2", "0.45", "0.65"]


def _draw_row(ax, i: int, n_rows: int, row: str, scores: Sequence[Mapping[str, Any]], metric: str) -> None:
    """Row ``i``'s line over the bins with its 95% intervals, shifted a little sideways so that
    the rows' intervals do not hide each other."""
    marker, line = STYLES[i % len(STYLES)]
    grey = GREYS[i % len(GREYS)]
    shift = (i - (n_rows - 1) / 2) * 0.06
    y = [s["metrics"][metric] for s in scores]
    low = [v - s["ci95"][metric][0] for v, s in zip(y, scores)]
    high = [s["ci95"][metric][1] - v for v, s in zip(y, scores)]
    ax.errorbar(
        [j + shift for j in range(len(y))],
        y,
        yerr=[low, high],
        marker=marker,
        linestyle=line,
        color=grey,
        capsize=3,
        markerfacecolor="white" if i % 2 else grey,
        label=row,
    )


def plot_activity(table: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """A line plot per metric: score by activity bin, one line per row, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    metrics = list(next(iter(rows.values()))[0]["metrics"])
    labels = [f"{b['label']}\n({len(b['users'])} users)" for b in table["bins"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, (row, scores) in enumerate(rows.items()):
            _draw_row(ax, i, len(rows), row, scores, metric)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)  # a bin's points stay together even with a single bin
        ax.set_xlabel("user activity (history length)")
        ax.set_ylabel(f"{metric} ({'lower' if metric in G.LOWER_IS_BETTER else 'higher'} is better)")
        ax.grid(axis="y", color="0.9")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(rows), frameon=False)  # below: never over the data
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- side-by-side tables of the other studies ----


def side_by_side(table: Mapping[str, Any], columns: Sequence[tuple[str, Sequence[str]]]) -> str:
    """A compact table: one line per method, one column per setting (``columns``: (heading, the
    row of each method in that setting)), each metric's value and interval."""
    names = G.metric_names(table)
    methods = columns[0][1]
    head = [f"{m} ({h})" for m in names for h, _ in columns]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for i, method in enumerate(methods):
        cells = []
        for m in names:
            for _, rows in columns:
                r = table["rows"].get(rows[i])
                cells.append(
                    "—" if r is None else f"{r['metrics'][m]:.3f} [{r['ci95'][m][0]:.3f}, {r['ci95'][m][1]:.3f}]"
                )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def adapter_sizes(
    grid: G.Grid, names: Sequence[str], users: Collection[str] | None = None
) -> dict[str, dict[str, float]]:
    """For OPPU rows: trainable parameters and adapter bytes on disk per user, from the run's
    manifest; only the lines of ``users`` (the rows' users) when given, as a run folder may also
    hold users that other calls (another --user_stride) trained."""
    sizes = {}
    for name in names:
        row = G.ROWS[name]
        if row.stage != "OPPU":
            continue
        ckpt, _ = G.run_dirs(grid, row.flags + row.user_flags)
        manifest = oppu_dir(ckpt, grid.task, row.k, grid.settings.model_name, row.profile) / "manifest.jsonl"
        if not manifest.is_file():
            continue
        lines = [m for uid, m in G.analysis.read_manifest(manifest).items() if users is None or uid in users]
        if not lines:
            continue
        sizes[name] = {
            "trainable_params": max(m.get("trainable_params", 0) for m in lines),
            "adapter_bytes": max(m.get("adapter_bytes", 0) for m in lines),
            "mean_seconds_per_user": round(sum(m["seconds"] for m in lines) / len(lines), 1),
        }
    return sizes


def sizes_markdown(sizes: Mapping[str, Mapping[str, float]]) -> str:
    lines = [
        "| row | trainable parameters per user | adapter on disk per user | seconds per user |",
        "|---|---|---|---|",
    ]
    for name, s in sizes.items():
        size = f"{s['adapter_bytes'] / 1024:,.1f} KiB"
        lines.append(f"| {name} | {s['trainable_params']:,} | {size} | {s['mean_seconds_per_user']} |")
    return "\n".join(lines) + "\n"


# ---- running a study ----


def study_table(grid: G.Grid, study: Study, records: Mapping[str, Mapping]) -> dict[str, Any]:
    """Score the study's finished rows as the grid does, adding the study's own paired
    differences to the grid's."""
    table = G.score_grid(grid, records, {})
    users = G.test_users(grid)
    for a, b in study.pairs:
        ex_a, ex_b = (G.row_examples(grid.task, users, Path(table["rows"][n]["predictions"])) for n in (a, b))
        per_user_a, per_user_b = table["rows"][a]["per_user"], table["rows"][b]["per_user"]
        diff = G.paired_difference(grid.task, ex_a, ex_b, per_user_a, per_user_b, grid.resamples, grid.bootstrap_seed)
        table["paired"].append({"row": a, "baseline": b, "metrics": diff})
    return table


def activity_section(
    grid: G.Grid, table: Mapping[str, Any], study: Study, out_dir: Path, n_bins: int, min_users: int
) -> tuple[dict[str, Any], str]:
    """The activity study's table (scores per history-length bin) and its markdown; draws the plot."""
    users = G.test_users(grid)
    lengths = {u["user_id"]: len(u["profile"]) for u in users}
    per_user = {row: table["rows"][row]["per_user"] for row in study.rows}
    pooled = {
        row: pooled_f1(grid.task, G.row_examples(grid.task, users, Path(table["rows"][row]["predictions"])))
        for row in study.rows
    }
    activity = activity_table(
        per_user, lengths, n_bins, min_users, grid.resamples, grid.bootstrap_seed, pooled_by_row=pooled
    )
    plot_activity(activity, out_dir / PLOT_FILE, f"{grid.task.name}: score by user activity")
    text = f"\n## By activity level\n\n{activity_markdown(activity)}\n![score by activity level]({PLOT_FILE})\n"
    return activity, text


SIDE_BY_SIDE = {
    "shift": [("most relevant", ("RAG", "OPPU+RAG")), ("least relevant", ("RAG[least]", "OPPU+RAG[least]"))],
    "formats": [("query prompt", ("OPPU",)), ("plain", ("OPPU[plain]",))],
}


def run_study(
    name: str,
    grid: G.Grid,
    n_bins: int = N_BINS,
    min_users: int = MIN_BIN_USERS,
    rows: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Run (or reuse) the study's grid rows (``rows``: a subset of them), then write
    ``<work>/studies/<study>/<task>/``: table.md, table.json and, for activity levels, activity.png."""
    study = select_rows(STUDIES[name], rows)
    records = G.run_rows(grid, list(study.rows))
    if not G.processes().is_main_process:  # under `accelerate launch`, the main process scores
        return {}
    table = study_table(grid, study, records)
    out_dir = study_dir(grid.work_dir, name, grid.task.name)
    result: dict[str, Any] = {"study": name, "about": study.about, "task": grid.task.name, "grid": table}
    parts = [f"# {name}: {study.about} ({grid.task.name})\n", G.markdown_table(table)]
    if name == "activity":
        result["activity"], text = activity_section(grid, table, study, out_dir, n_bins, min_users)
        parts.append(text)
    if name in SIDE_BY_SIDE:
        parts.append("\n## Side by side\n\n" + side_by_side(table, SIDE_BY_SIDE[name]))
    if name == "peft_types":
        users = {u for row in table["rows"].values() for u in row["per_user"]}
        result["adapter_sizes"] = adapter_sizes(grid, study.rows, users)
        parts.append("\n## Size of a personal adapter\n\n" + sizes_markdown(result["adapter_sizes"]))
    write_json(out_dir / "table.json", result)
    (out_dir / "table.md").write_text("\n".join(parts), encoding="utf-8")
    written = {"table_json": out_dir / "table.json", "table_md": out_dir / "table.md"}
    return written | ({"plot": out_dir / PLOT_FILE} if name == "activity" else {})
