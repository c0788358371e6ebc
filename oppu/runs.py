"""Where outputs go and how a run folder is kept safe: names, saved configs, the lock, and
per-user results written atomically so that a killed run resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oppu.adapters import ADAPTER_WEIGHTS
from oppu.modeling import short_name
from oppu.tasks import Task
from utils import UserError, read_json, wait_until, write_json

CONFIG_FILE = "run_config.json"
# Settings that change only how queries are answered, never what an adapter learns: a task
# adapter trained under other values of these is reused.
ANSWER_ONLY = {
    "answer_mode",
    "retrieval",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "decode_batch_size",  # which queries share a padded batch can move a float, then a greedy token
}
# The answer-only settings that also leave a personal PEFT as it is. Retrieval is not one of them:
# OPPU+RAG trains each user's PEFT on history items with retrieved items in their prompts.
PERSONAL_ANSWER_ONLY = ANSWER_ONLY - {"retrieval"}
# Settings of personal training only: the task stage accepts them (flags go to both stages) but
# neither uses nor records them, so they never make it retrain a task adapter.
PERSONAL_ONLY = {"min_steps"}
LOCK_FILE = ".lock"
# Settings that may differ between a run and its resumption without changing any result.
RESUME_NEUTRAL = {
    "overwrite",
    "debug",
    "max_users",
    "user_stride",
    "access_token",
    "ckpt_dir",
    "output_dir",
    "predict_base",
    "no_answer",
    "reuse_adapters",
}
# Settings a user's stored fingerprint leaves out although they change results: they counted as
# memory knobs when those results were made. The micro-batch changes the dropout masks and where a
# shared prefix runs, the decoding batch the padding; a run folder's saved config
# (check_or_save_config) holds one value of each, so a folder's users never mix two.
FINGERPRINT_NEUTRAL = RESUME_NEUTRAL | {"micro_batch_size", "decode_batch_size"}
# Settings added after runs were made, at the value that reproduces what runs did before them: a
# config holding that value is the same run as one without the key (fingerprints and comparisons
# leave it out), so adding a flag does not invalidate every finished run.
ADDED_SETTINGS = {"history_inputs": "item", "all_logits": False, "reentrant_checkpointing": False}


def _settled(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}


def run_name(task: Task, k: int, model_name: str, add_profile: bool) -> str:
    """``k<k>-<task>-<model short name>[-profile]``: the stem of every folder and file of a run."""
    return f"k{k}-{task.name}-{short_name(model_name)}" + ("-profile" if add_profile else "")


def task_lora_dir(ckpt_dir: str | Path, task: Task, k: int, model_name: str, add_profile: bool) -> Path:
    return Path(ckpt_dir) / task.name / f"{run_name(task, k, model_name, add_profile)}-task_LoRA_ckpt"


def oppu_dir(ckpt_dir: str | Path, task: Task, k: int, model_name: str, add_profile: bool) -> Path:
    return Path(ckpt_dir) / task.name / f"{run_name(task, k, model_name, add_profile)}-OPPU"


def predictions_path(
    output_dir: str | Path, task: Task, k: int, model_name: str, add_profile: bool, method: str
) -> Path:
    """``<output_dir>/<task>/<run name>-<method>.json`` for method base, task_LoRA or OPPU."""
    return Path(output_dir) / task.name / f"{run_name(task, k, model_name, add_profile)}-{method}.json"


def safe_dirname(user_id: str) -> str:
    """A folder name for a user id that can never leave its parent folder: only letters,
    digits, '.', '_' and '-', no leading dot, plus a hash so that distinct ids stay distinct."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", user_id).lstrip(".")[:60] or "user"
    return f"{clean}-{hashlib.sha256(user_id.encode('utf-8')).hexdigest()[:10]}"


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as saved: secrets dropped, paths and values as given."""
    return {k: v for k, v in config.items() if k not in {"access_token", "debug"}}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Settings whose change would change results (outputs' locations and how many users run
    do not; micro-batch and decoding batch sizes do)."""
    old, new = _settled(old), _settled(new)
    return sorted(k for k in set(old) | set(new) if k not in RESUME_NEUTRAL and old.get(k) != new.get(k))


def config_fingerprint(config: dict[str, Any]) -> str:
    """A short hash of the settings that determine results, stored with every user's result so
    that a resumed run never keeps results made under other settings."""
    relevant = {k: v for k, v in _settled(public_config(config)).items() if k not in FINGERPRINT_NEUTRAL}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reuse_mismatch(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """The first setting, other than how queries are answered (PERSONAL_ANSWER_ONLY) and the
    resume-neutral ones, in which two OPPU runs' configs differ; None when one run's personal
    PEFTs are the other's."""
    # the task adapter and the data are compared by their contents' hashes, not their paths
    skip = PERSONAL_ANSWER_ONLY | RESUME_NEUTRAL | {"task_lora", "data_dir"}
    ours, theirs = _settled(ours), _settled(theirs)
    return next((k for k in sorted(set(ours) | set(theirs)) if k not in skip and ours.get(k) != theirs.get(k)), None)


def file_fingerprint(*paths: Path) -> str:
    """A hash of input files' bytes, so that reusing work notices changed data, not just flags."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:16]


def check_or_save_config(folder: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Save the run's config; if the folder already holds a different one, refuse to mix."""
    path = folder / CONFIG_FILE
    new = public_config(config)
    if path.exists() and not overwrite:
        old = read_json(path)
        diff = config_differences(old, new)
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
            raise UserError(
                f"{path}: this folder holds a run with another config ({shown}); use --overwrite or another --ckpt_dir"
            )
    write_json(path, new)


PREDICTION_STATS = ("predictions", "invalid_fraction")  # what a stage adds to the config it saves beside them


def check_predictions(pred_file: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse, before any work, to replace predictions that a run under other settings wrote.
    Their file is named by task, k, model and profile only (``predictions_path``), so a run with
    another PEFT type, answer mode or retrieval into the same --output_dir would take its place;
    the config saved beside it (``<file>.config.json``) tells. --overwrite replaces them."""
    path = pred_file.with_suffix(".config.json")
    if overwrite or not path.is_file():
        return
    old = {k: v for k, v in read_json(path).items() if k not in PREDICTION_STATS}
    diff = config_differences(old, public_config(config))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff[:4])
        raise UserError(
            f"{pred_file}: holds the predictions of a run with another config ({shown}); "
            "give this run its own --output_dir, or use --overwrite"
        )


class RunLock:
    """An exclusive lock file in the run folder: a second run into the same folder stops
    with a clear error. A lock left by a killed run (its process is gone) is taken over.

    Each process rank holds its own file; a rank > 0 also refuses to start while the main lock
    is held by a live process of another launch on this machine (another parent process), so a
    run with more processes cannot slip in beside a running one.
    """

    def __init__(self, folder: Path, rank: int = 0) -> None:
        self.main = folder / LOCK_FILE
        self.path = self.main if rank == 0 else folder / f"{LOCK_FILE}.{rank}"

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _lock_alive(self.path):
                    raise self._busy(self.path) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {os.getppid()} {socket.gethostname()}")
            if self.path != self.main and _lock_alive(self.main, other_launch=True):
                self.path.unlink(missing_ok=True)
                raise self._busy(self.main)
            return self
        raise UserError(f"{self.path}: could not take the run lock")

    @staticmethod
    def _busy(path: Path) -> UserError:
        pid = _lock_holder(path)[0]
        return UserError(
            f"{path}: another run is writing into this folder (pid {pid}); wait for it or use another --ckpt_dir"
        )

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _lock_holder(path: Path) -> tuple[int, int, str]:
    """(pid, parent pid, host) written in a lock file; zeros when unreadable."""
    try:
        parts = path.read_text().split()
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0, parts[2] if len(parts) > 2 else ""
    except (OSError, ValueError, IndexError):
        return 0, 0, ""


def _lock_alive(path: Path, other_launch: bool = False) -> bool:
    """Whether a live process holds ``path`` (only provable on this machine; with ``other_launch``,
    one that is not a sibling of this process)."""
    pid, ppid, host = _lock_holder(path)
    if host and host != socket.gethostname():
        return not other_launch  # another machine's lock: respect it, but it is no sibling to judge
    if other_launch and ppid == os.getppid():
        return False
    return _pid_alive(pid)


def user_result_dir(run_dir: Path, user_id: str) -> Path:
    return run_dir / "users" / safe_dirname(user_id)


def read_user_result(run_dir: Path, user_id: str, query_ids: list[str], fingerprint: str | None = None) -> dict | None:
    """A finished user's manifest line with its predictions, or None when the user must be
    (re)computed: no folder, a missing file, predictions that do not cover the queries, or a
    result made under other settings (``fingerprint``, from config_fingerprint)."""
    folder = user_result_dir(run_dir, user_id)
    try:
        result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        if not all((folder / "adapter" / name).is_file() for name in (ADAPTER_WEIGHTS, "adapter_config.json")):
            return None
    except (OSError, ValueError):
        return None
    if result.get("user_id") != user_id or sorted(result.get("predictions", {})) != sorted(query_ids):
        return None
    if fingerprint is not None and result.get("config") != fingerprint:
        return None
    return result


def split_users(costs: Sequence[float], world: int) -> list[list[int]]:
    """Each process's users (indices, ascending) so that the most loaded process has as little
    work as greedy can give it: the costliest user first, each to the least loaded process (the
    lowest rank on ties). Every process computes the same split from the same costs. Users'
    histories are heavy-tailed (HuffPost: 15 to 438 items), which a round-robin split leaves
    unbalanced."""
    loads, split = [0.0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += costs[i]
        split[rank].append(i)
    return [sorted(s) for s in split]


def wait_for_users(
    run_dir: Path,
    users: Sequence[dict],
    fingerprint: str,
    poll_seconds: float = 2.0,
    sleep=time.sleep,
    launch: str | None = None,
) -> None:
    """Block until every user's result is on disk (made with ``fingerprint``; with ``launch``, by
    this launch: under --overwrite an earlier launch's results have the same fingerprint):
    processes that split the users wait for each other this way before the merge
    (utils.wait_until says why)."""
    missing = list(users)

    def waiting(user: dict) -> bool:
        result = read_user_result(run_dir, user["user_id"], [q["id"] for q in user["query"]], fingerprint)
        return result is None or (launch is not None and result.get("launch") != launch)

    def done() -> bool:
        missing[:] = [u for u in missing if waiting(u)]
        return not missing

    wait_until(done, poll_seconds, sleep)


def commit_user_result(run_dir: Path, user_id: str, staging: Path, result: dict) -> None:
    """Move a user's finished folder (adapter already saved in ``staging/adapter``) into place
    by renames only, so that a kill leaves either no result or a complete one (an old result of
    the user, under --overwrite, is moved aside before and removed after)."""
    write_json(staging / "result.json", result)
    final = user_result_dir(run_dir, user_id)
    if final.exists():  # the old result moves aside whole first (as a stale staging folder, which
        old = run_dir / "users" / f".staging-old-{final.name}-{_staging_tag()}"  # a later run removes)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_tag() -> str:
    """This process's mark on its staging folders: host (sanitised) and pid, so that on a
    ckpt folder shared by several machines each judges only its own processes."""
    return f"{re.sub(r'[^A-Za-z0-9]', '', socket.gethostname())[:30]}.{os.getpid()}"


def clean_stale_staging(run_dir: Path) -> int:
    """Remove half-written user folders left by killed runs on this machine (process gone)."""
    removed = 0
    host = _staging_tag().split(".")[0]
    for folder in (run_dir / "users").glob(".staging-*"):
        their_host, _, pid = folder.name.rsplit("-", 1)[-1].partition(".")
        if their_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def staging_dir(run_dir: Path, user_id: str) -> Path:
    folder = run_dir / "users" / f".staging-{safe_dirname(user_id)}-{_staging_tag()}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def training_config(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that determine a trained adapter (``config`` without the answer-only ones)."""
    return {k: v for k, v in config.items() if k not in ANSWER_ONLY}
