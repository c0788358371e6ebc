"""The paper's results table for one task: method rows as data, the stage calls that make them,
bootstrap intervals over users, paired differences, and the table files.

A row is (stage, k, profile, which output, extra flags); adding a method is one line in ROWS:

    "OPPU[ia3]": Row("OPPU", user_flags=("--peft_type", "ia3")),
    "RAG[least]": Row("task_LoRA", k=1, flags=("--retrieval", "least")),

Rows with extra flags run in their own folders (``<work>/variants/<flags>/``), so they never mix
with the plain rows' runs, and a call's stage flags (after ``--``) give its predictions a folder
of their own (``run_dirs``); an OPPU row's task adapter is the one of its ``flags`` (not of its
``user_flags``), so ``OPPU[ia3]`` reuses the plain task adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import gen_profile
import OPPU
import task_LoRA
from eval import eval_task, metrics, trivial_baselines
from oppu import analysis, cli
from oppu.data import (
    OTHER_PROFILES_FILE,
    OTHER_USERS_FILE,
    TEST_PROFILES_FILE,
    TEST_USERS_FILE,
    User,
    load_users,
)
from oppu.profiles import read_aligned
from oppu.runs import (
    ANSWER_ONLY,
    CONFIG_FILE,
    PERSONAL_ANSWER_ONLY,
    PERSONAL_ONLY,
    file_fingerprint,
    oppu_dir,
    safe_dirname,
)
from oppu.tasks import Task
from utils import UserError, read_json, wait_until, write_json


@dataclass(frozen=True)
class Row:
    stage: str  # "trivial", "task_LoRA" or "OPPU"
    k: int = 0  # retrieved history items per prompt
    profile: bool = False  # --add_profile
    method: str = ""  # the stage's output: base / task_LoRA / OPPU, or majority / user_majority (trivial)
    flags: tuple[str, ...] = ()  # extra flags for both stages of this row
    user_flags: tuple[str, ...] = ()  # extra flags for OPPU.py only

    def output(self) -> str:
        return self.method or self.stage


# The paper's rows, in its table's order. base and the task adapter rows come from task_LoRA.py
# (base with --predict_base); each OPPU row uses the task adapter of its own (k, profile).
ROWS: dict[str, Row] = {
    "base": Row("task_LoRA", method="base"),
    "global_majority": Row("trivial", method="majority"),
    "user_majority": Row("trivial", method="user_majority"),
    "non_personalized": Row("task_LoRA"),
    "RAG": Row("task_LoRA", k=1),
    "PAG": Row("task_LoRA", k=1, profile=True),
    "OPPU": Row("OPPU"),
    "OPPU+RAG": Row("OPPU", k=1),
    "OPPU+PAG": Row("OPPU", k=1, profile=True),
    # The further studies' rows (studies.py): other personal PEFT types, the behaviour shift (the
    # least relevant item retrieved, for the test users only) and plain-form personal training.
    "OPPU[ia3]": Row("OPPU", user_flags=("--peft_type", "ia3")),
    "OPPU[prompt_tuning]": Row("OPPU", user_flags=("--peft_type", "prompt_tuning")),
    "RAG[least]": Row("task_LoRA", k=1, flags=("--retrieval", "least")),
    "OPPU+RAG[least]": Row("OPPU", k=1, flags=("--retrieval", "least")),
    "OPPU[plain]": Row("OPPU", user_flags=("--history_format", "plain")),
    # answers by scoring the task's labels or ratings (--answer_mode score) instead of generating
    "non_personalized[score]": Row("task_LoRA", flags=("--answer_mode", "score")),
    "OPPU[score]": Row("OPPU", flags=("--answer_mode", "score")),
    # greedy decoding kept to the labels or ratings (--answer_mode constrained)
    "non_personalized[constrained]": Row("task_LoRA", flags=("--answer_mode", "constrained")),
    "OPPU[constrained]": Row("OPPU", flags=("--answer_mode", "constrained")),
}
# The paper's main table: run_grid.py's default rows.
PAPER_ROWS = (
    "base",
    "global_majority",
    "user_majority",
    "non_personalized",
    "RAG",
    "PAG",
    "OPPU",
    "OPPU+RAG",
    "OPPU+PAG",
)
# (row, baseline): the paper's claims (one PEFT per user beats the shared adapter and
# retrieval- and profile-based prompting; a profile adds to retrieval), as paired differences
# over the same users
PAIRS = (
    ("OPPU", "non_personalized"),
    ("OPPU+RAG", "RAG"),
    ("OPPU+PAG", "PAG"),
    ("OPPU", "RAG"),
    ("RAG", "non_personalized"),
    ("PAG", "RAG"),
)
LOWER_IS_BETTER = metrics.LOWER_IS_BETTER
# Flags that define rows of their own (OPPU[ia3], RAG[least], OPPU[plain], ...): given to every
# stage they would change rows under another row's name. --answer_mode may be given to the whole
# grid (every row answering by scoring); its [score] rows are for a table with both.
ROW_FLAGS = frozenset({"--peft_type", "--retrieval", "--history_format"})
# Flags the grid sets itself for every stage call.
GRID_FLAGS = frozenset(
    {
        "--task_name",
        "--data_dir",
        "--ckpt_dir",
        "--output_dir",
        "--k",
        "--add_profile",
        "--task_lora",
        "--predict_base",
        "--no_answer",
    }
)


@dataclass(frozen=True)
class Grid:
    """One task's grid: where data and work go, and the flags given to each stage."""

    task: Task
    data_dir: Path
    work_dir: Path
    stage_flags: tuple[str, ...] = ()  # to both stages (e.g. --max_users 3 --max_step 2)
    task_lora_flags: tuple[str, ...] = ()  # to task_LoRA.py only
    oppu_flags: tuple[str, ...] = ()  # to OPPU.py only
    profile_flags: tuple[str, ...] = ()  # to gen_profile.py
    resamples: int = 1000
    bootstrap_seed: int = 0
    settings: argparse.Namespace = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for flag in self.stage_flags + self.task_lora_flags + self.oppu_flags:
            name = flag.split("=")[0]
            if name in GRID_FLAGS:
                raise UserError(f"{flag}: the grid sets this flag itself for each row; leave it out")
            if name in ROW_FLAGS:  # it would turn e.g. the RAG row into RAG[least] under RAG's name
                rows = ", ".join(n for n, r in ROWS.items() if name in r.flags + r.user_flags)
                raise UserError(f"{flag}: rows set this flag themselves ({rows}); ask for those rows with --rows")
        object.__setattr__(self, "settings", task_LoRA.parse_args(["--task_name", self.task.name, *self.stage_flags]))

    @property
    def results_dir(self) -> Path:
        return self.work_dir / "results" / self.task.name

    def data_file(self, name: str) -> Path:
        return self.data_dir / self.task.name / name


def applicable(task: Task, name: str) -> str | None:
    """Why row ``name`` cannot run on ``task`` (None when it can)."""
    if name not in ROWS:
        raise UserError(f"--rows: unknown row {name!r}; known rows: {', '.join(ROWS)}")
    if ROWS[name].stage == "trivial" and task.name not in trivial_baselines.SUPPORTED:
        return f"no trivial predictor for {task.name} (its history items carry no label)"
    return None


def run_dirs(grid: Grid, flags: Sequence[str]) -> tuple[Path, Path]:
    """(ckpt_dir, output_dir) of runs with these extra flags: the plain ones, or their own folder.
    Predictions of a call with stage flags (after ``--``) go to a folder of their own under the
    output folder, so that calls under other stage flags (a study on every other user, say) never
    answer into another call's files; checkpoints are shared, where the stages check them."""
    root = grid.work_dir
    if flags:
        root = root / "variants" / safe_dirname(" ".join(flags))
    output = root / "output"
    if grid.stage_flags:
        output = output / stage_dirname(grid.stage_flags)
    return root / "ckpt", output


def stage_dirname(stage_flags: Sequence[str]) -> str:
    """The folder name of a call's stage flags: the flags that tell calls apart first (the
    model's path is in the predictions' file names), a hash of them all, and never a token."""
    flags = public_flags(stage_flags)
    shown = [f for i, f in enumerate(flags) if f != "--model_name" and (i == 0 or flags[i - 1] != "--model_name")]
    name = safe_dirname("stage " + " ".join(shown))
    return f"{name}-{hashlib.sha256(' '.join(flags).encode()).hexdigest()[:10]}"


def public_flags(flags: Sequence[str]) -> list[str]:
    """``flags`` without --access_token and its value (also as --access_token=value)."""
    out: list[str] = []
    skip = False
    for f in flags:
        if skip:
            skip = False
        elif f == "--access_token":
            skip = True
        elif not f.startswith("--access_token="):
            out.append(f)
    return out


def row_inputs(grid: Grid, row: Row) -> list[Path]:
    """The data files a row's result depends on."""
    files = [TEST_USERS_FILE, OTHER_USERS_FILE] + ([TEST_PROFILES_FILE, OTHER_PROFILES_FILE] if row.profile else [])
    return [grid.data_file(name) for name in files]


def row_config(grid: Grid, name: str) -> dict[str, Any]:
    """Everything a row's result depends on: its spec, the flags of its stages, the model, the seed
    and the data files' hashes; its ``fingerprint`` decides whether a finished row is reused."""
    row = ROWS[name]
    config = {
        "row": name,
        **asdict(row),
        "model_name": grid.settings.model_name,
        "seed": grid.settings.seed,
        "stage_flags": public_flags(grid.stage_flags),
        "task_lora_flags": list(grid.task_lora_flags) if row.stage != "trivial" else [],
        "oppu_flags": list(grid.oppu_flags) if row.stage == "OPPU" else [],
        "data_sha256": {p.name: file_fingerprint(p) for p in row_inputs(grid, row)},
    }
    if row.profile and grid.profile_flags:  # how the profiles were written (left out when default,
        config["profile_flags"] = list(grid.profile_flags)  # so records written before it still match)
    if row.stage == "trivial":  # no model: only the data and which users matter
        users = {"max_users": grid.settings.max_users}
        if grid.settings.user_stride != 1:  # left out at 1, so records written before the flag still match
            users["user_stride"] = grid.settings.user_stride
        config |= {"model_name": None, "seed": None, "stage_flags": [], **users}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return config | {"fingerprint": digest}


def record_path(grid: Grid, name: str) -> Path:
    """Where a row's record under this grid's config is kept: one record per row and config, so
    a call under other flags leaves the others' records."""
    return grid.results_dir / "rows" / f"{safe_dirname(name)}-{row_config(grid, name)['fingerprint']}.json"


def legacy_record_path(grid: Grid, name: str) -> Path:
    """The one record per row that work folders from before 2026-11-30 hold."""
    return grid.results_dir / "rows" / f"{safe_dirname(name)}.json"


def finished_record(grid: Grid, name: str) -> dict | None:
    """A row's record from an earlier run with the same config whose predictions still exist as
    they were written: a later call under other flags may have answered into the same file (a
    record written before the hash was kept is taken on its config alone)."""
    path = record_path(grid, name)
    path = path if path.is_file() else legacy_record_path(grid, name)
    if not path.is_file():
        return None
    record = read_json(path)
    same = record.get("config", {}).get("fingerprint") == row_config(grid, name)["fingerprint"]
    predictions = Path(record.get("predictions", ""))
    if not same or not predictions.is_file():
        return None
    kept = record.get("predictions_sha256")
    return record if kept is None or kept == file_fingerprint(predictions) else None


def processes():
    """The launch's processes (accelerate's shared state): one, or several under `accelerate launch`."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # as the stages' Accelerator() starts it: on CPU when the launch says so (ACCELERATE_USE_CPU)
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def save_record(grid: Grid, name: str, predictions: Path, seconds: float) -> dict:
    record = {
        "row": name,
        "predictions": str(predictions),
        "seconds": round(seconds, 1),
        "config": row_config(grid, name),
    }
    if processes().is_main_process:  # the main process wrote the predictions; the others may not see them yet
        record["predictions_sha256"] = file_fingerprint(Path(predictions))
        write_json(record_path(grid, name), record)
    return record


def as_flags(**values: object) -> list[str]:
    """``--name value`` pairs, in order (keyword names are the flag names without dashes)."""
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def flags_within(flags: Sequence[str], names: set[str]) -> bool:
    """Whether every ``--name`` (or ``--name=value``) in ``flags`` is one of ``names``."""
    return all(f[2:].split("=")[0] in names for f in flags if f.startswith("--"))


def answer_only(flags: Sequence[str]) -> bool:
    """Whether ``flags`` leave the task adapter as it is: they change only how queries are
    answered (runs.ANSWER_ONLY) or personal training (runs.PERSONAL_ONLY), so that a task adapter
    trained without them serves."""
    return flags_within(flags, ANSWER_ONLY | PERSONAL_ONLY)


def stage_argv(
    grid: Grid, row: Row, flags: Sequence[str], stage_only: Sequence[str], share_adapter: bool = False
) -> list[str]:
    """A stage's command line; with ``share_adapter`` (task stage, answer-only flags) checkpoints go
    to the plain folder, where task_LoRA.py reuses the adapter trained without the flags."""
    ckpt, output = run_dirs(grid, flags)
    if share_adapter and answer_only(flags):
        ckpt = run_dirs(grid, ())[0]
    argv = as_flags(task_name=grid.task.name, data_dir=grid.data_dir, ckpt_dir=ckpt, output_dir=output, k=row.k)
    return argv + (["--add_profile"] if row.profile else []) + [*grid.stage_flags, *stage_only, *flags]


def ensure_profiles(grid: Grid) -> None:
    """Write the profile files the PAG rows need (gen_profile resumes; a no-op when complete).
    The stages' model writes them; their --seed is not passed, so that a grid rerun with another
    seed keeps the profiles (gen_profile refuses to extend files made under other settings)."""
    s = grid.settings
    argv = as_flags(task_name=grid.task.name, data_dir=grid.data_dir, model_name=s.model_name, dtype=s.dtype)
    argv += as_flags(access_token=s.access_token) if s.access_token else []
    argv += ["--trust_remote_code"] if s.trust_remote_code else []
    if processes().is_main_process:
        gen_profile.main(argv + list(grid.profile_flags))
    else:  # the main process writes them; waiting in a barrier could pass the backend's timeout
        wait_for_profiles(grid)


PROFILE_FILES = ((TEST_USERS_FILE, TEST_PROFILES_FILE), (OTHER_USERS_FILE, OTHER_PROFILES_FILE))


def profiles_complete(grid: Grid, users: Mapping[str, list]) -> bool:
    """Whether both profile files hold a profile for every user of their user file (``users``:
    the user files' contents by name)."""
    for users_file, profiles_file in PROFILE_FILES:
        try:
            if len(read_aligned(grid.data_file(profiles_file), users[users_file])) < len(users[users_file]):
                return False
        except (UserError, OSError, ValueError):  # not there yet
            return False
    return True


def wait_for_profiles(grid: Grid, poll_seconds: float = 2.0, sleep=time.sleep) -> None:
    users = {name: read_json(grid.data_file(name)) for name, _ in PROFILE_FILES}  # once: they can be large
    wait_until(lambda: profiles_complete(grid, users), poll_seconds, sleep)


def run_trivial(grid: Grid, names: Sequence[str]) -> dict[str, dict]:
    from accelerate.utils import broadcast_object_list

    start = time.time()
    argv = as_flags(task_name=grid.task.name, data_dir=grid.data_dir, output_dir=run_dirs(grid, ())[1])
    state = processes()
    written = [trivial_baselines.main(argv) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(written)  # the other processes need the files' paths, not their own copies
    return {n: save_record(grid, n, written[0][ROWS[n].method], time.time() - start) for n in names}


def run_task_lora(grid: Grid, names: Sequence[str], key: tuple) -> tuple[dict[str, dict], Path]:
    """One task_LoRA.py call for a (k, profile, flags) setting: its rows, and the task adapter."""
    rows = [ROWS[n] for n in names]
    k, profile, flags = key
    base = ["--predict_base"] if any(r.method == "base" for r in rows) else []
    # a call that serves only OPPU rows (or the base model's) needs the adapter, not its answers
    quiet = [] if any(r.stage == "task_LoRA" and r.method != "base" for r in rows) else ["--no_answer"]
    start = time.time()
    extra = [*grid.task_lora_flags, *base, *quiet]
    out = task_LoRA.main(stage_argv(grid, Row("task_LoRA", k, profile), flags, extra, share_adapter=True))
    seconds = time.time() - start
    files = {"base": out.get("base_predictions"), "task_LoRA": out.get("predictions")}
    records = {n: save_record(grid, n, files[ROWS[n].output()], seconds) for n in names if ROWS[n].stage == "task_LoRA"}
    return records, out["adapter"]


def reusable_oppu_run(grid: Grid, row: Row) -> Path | None:
    """For an OPPU row that changes only how queries are answered (e.g. OPPU[score]): the plain
    row's run folder, whose personal PEFTs it can answer with instead of training them again."""
    if not row.flags or row.user_flags or not flags_within(row.flags, PERSONAL_ANSWER_ONLY):
        return None
    plain = oppu_dir(run_dirs(grid, ())[0], grid.task, row.k, grid.settings.model_name, row.profile)
    return plain if (plain / CONFIG_FILE).is_file() else None


def run_oppu(grid: Grid, name: str, task_lora: Path) -> dict:
    row = ROWS[name]
    start = time.time()
    plain = reusable_oppu_run(grid, row)
    extra = [*grid.oppu_flags, "--task_lora", str(task_lora), *(["--reuse_adapters", str(plain)] if plain else [])]
    out = OPPU.main(stage_argv(grid, row, row.flags + row.user_flags, extra))
    return save_record(grid, name, out["predictions"], time.time() - start)


def run_rows(grid: Grid, names: Sequence[str]) -> dict[str, dict]:
    """Make every row in ``names`` (skipping finished ones); returns each row's record
    (predictions file, seconds, config). Stage calls are shared: one task_LoRA.py call per
    (k, profile, flags) setting serves its base and task adapter rows and its OPPU rows."""
    records: dict[str, dict] = {}
    todo = []
    for name in names:
        record = finished_record(grid, name)
        if record is None and ROWS[name].profile:
            ensure_profiles(grid)
            record = finished_record(grid, name)
        if record is not None:
            print(f"row {name}: finished earlier with the same config; reusing {record['predictions']}")
            records[name] = record
        else:
            todo.append(name)
    trivial = [n for n in todo if ROWS[n].stage == "trivial"]
    if trivial:
        records |= run_trivial(grid, trivial)
    calls: dict[tuple, list[str]] = {}
    for n in todo:
        if ROWS[n].stage != "trivial":
            calls.setdefault((ROWS[n].k, ROWS[n].profile, ROWS[n].flags), []).append(n)
    for key, group in calls.items():
        done, adapter = run_task_lora(grid, group, key)
        records |= done
        for n in group:
            if ROWS[n].stage == "OPPU":
                records[n] = run_oppu(grid, n, adapter)
    return {n: records[n] for n in names}


def table_records(grid: Grid, records: Mapping[str, dict]) -> dict[str, dict]:
    """The rows of the table: those just made (``records``) and every other row finished earlier
    in this work folder under the same config, so calls with different ``--rows`` add up to one
    table; in ROWS order."""
    merged = dict(records)
    for name in ROWS:
        if name not in merged and applicable(grid.task, name) is None:
            if (record := finished_record(grid, name)) is not None:
                merged[name] = record
    return {name: merged[name] for name in ROWS if name in merged}


# ---- scoring: per-user scores, bootstrap intervals, paired differences ----


@dataclass(frozen=True)
class Examples:
    """The scored queries of a row: golds and predictions in user order, and each user's indices."""

    users: list[str]
    groups: list[list[int]]
    golds: list[str]
    preds: list[str]


def test_users(grid: Grid) -> list[User]:
    """The users every row is scored on: the test users the stages keep (--user_stride,
    --max_users) that have queries."""
    users = load_users(grid.task, grid.data_file(TEST_USERS_FILE), need_gold=True, need_history=False)
    return [u for u in cli.select_users(users, grid.settings) if u["query"]]


def row_examples(task: Task, users: Sequence[User], predictions: Path) -> Examples:
    """Line a predictions file up with the users' queries (every query needs a prediction)."""
    preds = eval_task.load_outputs(predictions, task)
    golds, answers, groups = [], [], []
    for user in users:
        missing = [q["id"] for q in user["query"] if q["id"] not in preds]
        if missing:
            raise UserError(f"{predictions}: no prediction for user {user['user_id']!r} query ids {missing[:5]}")
        groups.append(list(range(len(golds), len(golds) + len(user["query"]))))
        golds += [q["gold"] for q in user["query"]]
        answers += [preds[q["id"]] for q in user["query"]]
    return Examples([u["user_id"] for u in users], groups, golds, answers)


def pooled_scorer(task: Task, golds: Sequence[str], preds: Sequence[str]) -> Callable[[Sequence[int]], dict]:
    """The task's metrics on any multiset of example indices (the pooled queries of resampled
    users). ROUGE is a mean of per-example scores, so those are computed once."""
    if task.kind == "generation":
        table = metrics.rouge_per_example(golds, preds)
        keys = list(table[0])
        return lambda idx: {k: float(np.mean([table[i][k] for i in idx])) for k in keys}
    return lambda idx: metrics.score_lists(task, [golds[i] for i in idx], [preds[i] for i in idx])


# Metrics whose bootstrap distribution sits below the sample's value: macro-F1 averages over every
# label, and a resample of users drops rare labels (0 for each), so almost every resample scores
# lower. Their interval is bias-corrected and accelerated (``bca_interval``); the rest percentile.
BIASED_METRICS = ("f1",)


def bootstrap_ci(
    groups: Sequence[Sequence[int]],
    statistic: Callable[[Sequence[int]], dict],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    corrected: Sequence[str] = BIASED_METRICS,
) -> dict[str, list[float]]:
    """Bootstrap over users: each resample draws len(groups) users with replacement
    (``numpy.random.default_rng(seed).integers``), pools their examples and recomputes
    ``statistic``; returns each metric's [lower, upper] percentile (numpy's linear method), or
    for the metrics in ``corrected`` the BCa interval (``bca_interval``, with the statistic on all
    users and on each leave-one-user-out sample)."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        picks = rng.integers(0, len(groups), size=len(groups))
        draws.append(statistic([i for p in picks for i in groups[p]]))
    tail = (1 - level) / 2 * 100
    out = {k: [float(v) for v in np.percentile([d[k] for d in draws], [tail, 100 - tail])] for k in draws[0]}
    keys = [k for k in draws[0] if k in corrected]
    if keys:
        point = statistic([i for g in groups for i in g])
        leave_one_out = range(len(groups)) if len(groups) > 1 else ()  # a single user has no jackknife
        jackknife = [statistic([i for j, g in enumerate(groups) if j != left for i in g]) for left in leave_one_out]
        for k in keys:
            out[k] = bca_interval([d[k] for d in draws], point[k], [j[k] for j in jackknife], level)
    return out


def bca_interval(draws: Sequence[float], point: float, jackknife: Sequence[float], level: float = 0.95) -> list[float]:
    """Efron's bias-corrected and accelerated bootstrap interval: the percentiles of ``draws``
    moved by the share of resamples below the sample's value ``point`` (bias) and by the skew of
    the leave-one-out values ``jackknife`` (acceleration; none with fewer than 2 of them)."""
    from statistics import NormalDist

    normal = NormalDist()
    values = np.asarray(draws, dtype=float)
    n = len(values)
    below = (np.sum(values < point) + 0.5 * np.sum(values == point)) / n
    z0 = normal.inv_cdf(min(max(below, 0.5 / n), 1 - 0.5 / n))  # every resample on one side: the extreme
    spread = np.mean(jackknife) - np.asarray(jackknife, dtype=float) if len(jackknife) > 1 else np.zeros(1)
    scale = 6 * float(np.sum(spread**2)) ** 1.5
    accel = float(np.sum(spread**3)) / scale if scale > 0 else 0.0
    z = normal.inv_cdf((1 - level) / 2)
    shares = [normal.cdf(z0 + (z0 + q) / (1 - accel * (z0 + q))) for q in (z, -z)]
    return [float(v) for v in np.percentile(values, [100 * s for s in shares])]


def user_scores(task: Task, users: Sequence[User], ex: Examples, users_path: Path) -> dict[str, dict[str, float]]:
    """Each user's metrics on their own queries (eval_task's --per_user; ``ex`` from row_examples)."""
    ids = [q["id"] for u in users for q in u["query"]]
    return eval_task.per_user_scores(task, dict(zip(ids, ex.golds)), dict(zip(ids, ex.preds)), users_path)


def user_seconds(grid: Grid, record: Mapping[str, Any]) -> float | None:
    """An OPPU row's every user's training and answering seconds, summed from its run's manifest
    (None for other rows). Unlike the call's wall time, a resumed run counts every user once."""
    if ROWS[record["row"]].stage != "OPPU":
        return None
    manifest = analysis.read_manifest(analysis.manifest_path(Path(record["predictions"]), grid.task.name))
    mine = [manifest[u["user_id"]] for u in test_users(grid) if u["user_id"] in manifest]  # the row's users only
    return round(sum(m["seconds"] for m in mine), 1) if mine else None


def score_predictions(
    task: Task, users: Sequence[User], users_path: Path, predictions: Path, resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """A predictions file's metrics on ``users``' queries, their 95% bootstrap intervals over the
    users, the numbers of users and queries, and each user's scores."""
    ex = row_examples(task, users, predictions)
    statistic = pooled_scorer(task, ex.golds, ex.preds)
    every = [i for g in ex.groups for i in g]
    return {
        "metrics": statistic(every),
        "ci95": bootstrap_ci(ex.groups, statistic, resamples, seed),
        "n_users": len(ex.users),
        "n_queries": len(ex.golds),
        "per_user": user_scores(task, users, ex, users_path),
    }


def score_row(grid: Grid, record: Mapping[str, Any]) -> dict[str, Any]:
    """A row's metrics on all its queries, their 95% intervals, sizes and per-user scores."""
    users_path, predictions = grid.data_file(TEST_USERS_FILE), Path(record["predictions"])
    scores = score_predictions(
        grid.task, test_users(grid), users_path, predictions, grid.resamples, grid.bootstrap_seed
    )
    per_user = scores.pop("per_user")
    return scores | {
        "seconds": record["seconds"],
        "user_seconds": user_seconds(grid, record),
        "predictions": record["predictions"],
        "predictions_sha256": record.get("predictions_sha256"),  # what was scored (compare_rows checks it)
        "config": record["config"],
        "per_user": per_user,
    }


def better(metric: str, a: float, b: float) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


def paired_difference(
    task: Task,
    a: Examples,
    b: Examples,
    per_user_a: Mapping[str, Mapping[str, float]],
    per_user_b: Mapping[str, Mapping[str, float]],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """Row a minus row b on the same users and queries: the difference of each metric, its
    bootstrap interval (the same resampled users for both rows), and the users for whom a is
    better (gained), worse (lost) or equal (tied) on that metric."""
    if a.users != b.users or a.golds != b.golds:
        raise ValueError("paired rows must be scored on the same users and queries")
    stat_a, stat_b = pooled_scorer(task, a.golds, a.preds), pooled_scorer(task, b.golds, b.preds)

    def diff(idx: Sequence[int]) -> dict[str, float]:
        sa, sb = stat_a(idx), stat_b(idx)
        return {k: sa[k] - sb[k] for k in sa}

    every = [i for g in a.groups for i in g]
    intervals = bootstrap_ci(a.groups, diff, resamples, seed)
    return {
        metric: {"difference": value, "ci95": intervals[metric]} | user_wins(metric, per_user_a, per_user_b, a.users)
        for metric, value in diff(every).items()
    }


def user_wins(
    metric: str, per_user_a: Mapping[str, Mapping[str, float]], per_user_b: Mapping[str, Mapping[str, float]], users
) -> dict[str, int]:
    """How many of ``users`` row a beats on ``metric`` (gained), loses to (lost) and ties."""
    pairs = [(per_user_a[u][metric], per_user_b[u][metric]) for u in users]
    return {
        "gained": sum(better(metric, x, y) for x, y in pairs),
        "lost": sum(better(metric, y, x) for x, y in pairs),
        "tied": sum(x == y for x, y in pairs),
    }


def paired_rows(
    task: Task,
    users: Sequence[User],
    row: Mapping[str, Any],
    baseline: Mapping[str, Any],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """paired_difference of two scored rows (score_row's dicts, from one grid or two grids on
    the same data) on ``users``' queries."""
    ex_a, ex_b = (row_examples(task, users, Path(r["predictions"])) for r in (row, baseline))
    return paired_difference(task, ex_a, ex_b, row["per_user"], baseline["per_user"], resamples, seed)


# ---- tables ----


def grid_config(grid: Grid) -> dict[str, Any]:
    s = grid.settings
    files = [TEST_USERS_FILE, OTHER_USERS_FILE, TEST_PROFILES_FILE, OTHER_PROFILES_FILE]
    return {
        "task_name": grid.task.name,
        "lamp_id": grid.task.lamp_id,
        "data_dir": str(grid.data_dir),
        "model_name": s.model_name,
        "seed": s.seed,
        "max_users": s.max_users,
        "user_stride": s.user_stride,
        "stage_flags": public_flags(grid.stage_flags),
        "task_lora_flags": list(grid.task_lora_flags),
        "oppu_flags": list(grid.oppu_flags),
        "profile_flags": list(grid.profile_flags),
        "data_sha256": {n: file_fingerprint(grid.data_file(n)) for n in files if grid.data_file(n).is_file()},
        "bootstrap": {
            "resamples": grid.resamples,
            "seed": grid.bootstrap_seed,
            "level": 0.95,
            "over": "users",
            "interval": {"BCa": list(BIASED_METRICS), "percentile": "the other metrics"},
        },
    }


def score_grid(grid: Grid, records: Mapping[str, Mapping], skipped: Mapping[str, str]) -> dict[str, Any]:
    """table.json's content: config, every row's scores, and the paired differences."""
    rows = {name: score_row(grid, record) for name, record in records.items()}
    users = test_users(grid)
    paired = [
        {
            "row": a,
            "baseline": b,
            "metrics": paired_rows(grid.task, users, rows[a], rows[b], grid.resamples, grid.bootstrap_seed),
        }
        for a, b in PAIRS
        if a in rows and b in rows
    ]
    return {"config": grid_config(grid), "rows": rows, "paired": paired, "skipped": dict(skipped)}


def metric_names(table: Mapping[str, Any]) -> list[str]:
    return list(next(iter(table["rows"].values()))["metrics"]) if table["rows"] else []


def row_seconds(row: Mapping[str, Any]) -> float:
    """table.md's seconds: an OPPU row's users' own seconds where known, else the call's wall time."""
    return row["user_seconds"] if row.get("user_seconds") is not None else row["seconds"]


def markdown_table(table: Mapping[str, Any]) -> str:
    """The rows with each metric's value and 95% interval (best value per metric in bold), then
    the paired differences."""
    names = metric_names(table)
    rows = table["rows"]
    best = {}
    for m in names:
        values = [r["metrics"][m] for r in rows.values()]
        best[m] = min(values) if m in LOWER_IS_BETTER else max(values)
    arrow = {m: "↓" if m in LOWER_IS_BETTER else "↑" for m in names}
    lines = [
        "| row | " + " | ".join(f"{m} {arrow[m]} [95% CI]" for m in names) + " | users | queries | seconds |",
        "|---|" + "---|" * (len(names) + 3),
    ]
    for name, r in rows.items():
        cells = []
        for m in names:
            value = f"{r['metrics'][m]:.3f}"
            value = f"**{value}**" if r["metrics"][m] == best[m] else value
            lo, hi = r["ci95"][m]
            cells.append(f"{value} [{lo:.3f}, {hi:.3f}]")
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {r['n_users']} | {r['n_queries']} | {row_seconds(r):.0f} |"
        )
    if table["paired"]:
        lines += [
            "",
            "| paired (same users) | metric | difference [95% CI] | users gained | lost | tied |",
            "|---|---|---|---|---|---|",
        ]
        for p in table["paired"]:
            for m, d in p["metrics"].items():
                lo, hi = d["ci95"]
                lines.append(
                    f"| {p['row']} − {p['baseline']} | {m} {arrow[m]} | {d['difference']:+.3f} "
                    f"[{lo:+.3f}, {hi:+.3f}] | {d['gained']} | {d['lost']} | {d['tied']} |"
                )
    if table.get("skipped"):
        lines += [""] + [f"{name}: left out ({why})" for name, why in table["skipped"].items()]
    return "\n".join(lines) + "\n"


def overview_markdown(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """Several tasks' grids in one table: a line per row (in ROWS order), a column per task with
    the task's first metric and its 95% interval (best per task in bold; "—" where a task has no
    such row)."""
    names = [n for n in ROWS if any(n in t["rows"] for t in tables.values())]
    heads, best = [], {}
    for task, table in tables.items():
        m = metric_names(table)[0]
        values = [r["metrics"][m] for r in table["rows"].values()]
        best[task] = (m, min(values) if m in LOWER_IS_BETTER else max(values))
        heads.append(f"{task} {m} {'↓' if m in LOWER_IS_BETTER else '↑'}")
    lines = ["| row | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for name in names:
        cells = []
        for task, table in tables.items():
            r = table["rows"].get(name)
            if r is None:
                cells.append("—")
                continue
            m, top = best[task]
            value = f"{r['metrics'][m]:.3f}"
            lo, hi = r["ci95"][m]
            cells.append(f"{f'**{value}**' if r['metrics'][m] == top else value} [{lo:.3f}, {hi:.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    users = ", ".join(f"{task} {next(iter(t['rows'].values()))['n_users']}" for task, t in tables.items())
    return "\n".join(lines) + f"\n\nTest users per task: {users}.\n"


def read_table(source: Path, task: Task, names: Sequence[str]) -> tuple[Path, dict[str, Any]]:
    """A finished grid's table (and its file), checked to hold the rows ``names``. ``source`` is
    a work folder (its grid's ``results/<task>/table.json``) or a table.json file: a grid's, or a
    study's (``studies/<study>/<task>/table.json``, whose grid part is returned)."""
    source = Path(source)
    table_file = source if source.suffix == ".json" else source / "results" / task.name / "table.json"
    if not table_file.is_file():
        run = "the grid or the study" if source.suffix == ".json" else "run_grid.py"
        raise UserError(f"{table_file}: no such table; run {run} first")
    table = read_json(table_file)
    if isinstance(table, dict) and isinstance(table.get("grid"), dict):
        table = table["grid"]  # a study's table.json holds its rows' grid table under "grid"
    if not isinstance(table, dict) or not isinstance(table.get("rows"), dict):
        raise UserError(f"{table_file}: not a grid's or a study's table.json (no rows)")
    config = table.get("config") if isinstance(table.get("config"), dict) else {}
    if config.get("task_name", task.name) != task.name:
        raise UserError(f"{table_file}: a table of task {config['task_name']!r}, not {task.name!r}")
    for name in names:
        if name not in table["rows"]:
            raise UserError(f"{table_file}: no row {name!r}; it has {', '.join(table['rows'])}")
    return table_file, table


def write_tables(grid: Grid, table: Mapping[str, Any]) -> tuple[Path, Path]:
    """``<work>/results/<task>/table.json`` and ``table.md``."""
    json_path, md_path = grid.results_dir / "table.json", grid.results_dir / "table.md"
    if json_path.is_file():
        before = read_json(json_path).get("config", {}).get("stage_flags")
        if before is not None and before != table["config"]["stage_flags"]:
            print(
                f"note: {json_path} held the table of a call with other stage flags ({' '.join(before) or 'none'}); "
                "its rows are kept: that call, run again, writes it again from them in seconds"
            )
    write_json(json_path, table)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown_table(table), encoding="utf-8")
    return json_path, md_path
