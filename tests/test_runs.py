"""Run folders: names, saved configs, the lock, and atomic per-user results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from oppu.runs import (
    RunLock,
    check_or_save_config,
    check_predictions,
    clean_stale_staging,
    commit_user_result,
    config_differences,
    config_fingerprint,
    file_fingerprint,
    oppu_dir,
    predictions_path,
    read_user_result,
    reuse_mismatch,
    staging_dir,
    task_lora_dir,
    user_result_dir,
    wait_for_users,
)
from oppu.tasks import get_task
from utils import UserError

TASK = get_task("LaMP_2M")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folder_names_follow_the_paper():
    assert task_lora_dir("ckpt", TASK, 1, "meta-llama/Llama-2-7b-hf", True).as_posix() == (
        "ckpt/movie_tagging/k1-movie_tagging-Llama-2-7b-hf-profile-task_LoRA_ckpt"
    )
    assert (
        oppu_dir("ckpt", TASK, 0, "/models/tiny/", False).as_posix() == "ckpt/movie_tagging/k0-movie_tagging-tiny-OPPU"
    )
    assert predictions_path("out", TASK, 0, "SmolLM2-135M-Instruct", False, "OPPU").as_posix() == (
        "out/movie_tagging/k0-movie_tagging-SmolLM2-135M-Instruct-OPPU.json"
    )


def finished_user(run_dir, user_id="u1", qids=("q1", "q2")):
    staging = staging_dir(run_dir, user_id)
    (staging / "adapter").mkdir()
    (staging / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (staging / "adapter" / "adapter_config.json").write_text("{}")
    result = {"user_id": user_id, "predictions": {q: "comedy" for q in qids}}
    commit_user_result(run_dir, user_id, staging, result)
    return result


def test_complete_result_is_read_back_and_partial_ones_are_not(tmp_path):
    result = finished_user(tmp_path)
    assert read_user_result(tmp_path, "u1", ["q2", "q1"]) == result
    assert read_user_result(tmp_path, "u1", ["q1"]) is None  # the queries changed
    assert read_user_result(tmp_path, "u2", ["q1"]) is None  # never run
    folder = user_result_dir(tmp_path, "u1")
    (folder / "adapter" / "adapter_model.safetensors").unlink()
    assert read_user_result(tmp_path, "u1", ["q1", "q2"]) is None  # adapter missing
    finished_user(tmp_path)
    (folder / "adapter" / "adapter_config.json").unlink()
    assert read_user_result(tmp_path, "u1", ["q1", "q2"]) is None  # its config missing
    assert finished_user(tmp_path, qids=("q3",)) == read_user_result(tmp_path, "u1", ["q3"])  # replaced whole
    assert read_user_result(tmp_path, "u1", ["q1", "q2"]) is None
    finished_user(tmp_path)
    (folder / "result.json").write_text('{"user_id": "u1", "predictions": {"q1"')  # cut short
    assert read_user_result(tmp_path, "u1", ["q1", "q2"]) is None
    assert not list((tmp_path / "users").glob(".staging-*"))


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path):
    host = staging_dir(tmp_path, "u0").name.rsplit("-", 1)[-1].split(".")[0]
    stale = tmp_path / "users" / f".staging-u1-abc-{host}.{dead_pid()}"
    live = tmp_path / "users" / f".staging-u2-abc-{host}.{os.getpid()}"
    elsewhere = tmp_path / "users" / f".staging-u3-abc-otherhost.{dead_pid()}"  # not ours to judge
    stale.mkdir(parents=True), live.mkdir(parents=True), elsewhere.mkdir(parents=True)
    assert clean_stale_staging(tmp_path) == 1
    assert not stale.exists() and live.exists() and elsewhere.exists()


def test_config_is_saved_without_the_token_and_a_different_one_is_refused(tmp_path):
    config = {"task_name": "movie_tagging", "learning_rate": 1e-4, "access_token": "hf_secret", "max_users": 3}
    check_or_save_config(tmp_path, config, overwrite=False)
    saved = json.loads((tmp_path / "run_config.json").read_text())
    assert "access_token" not in saved and saved["learning_rate"] == 1e-4
    check_or_save_config(tmp_path, config | {"max_users": 10, "ckpt_dir": "elsewhere"}, overwrite=False)
    with pytest.raises(UserError, match=r"another config \(learning_rate: 0.0001 -> 0.001\)"):
        check_or_save_config(tmp_path, config | {"learning_rate": 1e-3}, overwrite=False)
    check_or_save_config(tmp_path, config | {"learning_rate": 1e-3}, overwrite=True)
    assert json.loads((tmp_path / "run_config.json").read_text())["learning_rate"] == 1e-3


def test_predictions_of_a_run_under_other_settings_are_not_replaced(tmp_path):
    """Prediction files are named by task, k, model and profile only: a run answering another
    way (or with another PEFT type) into the same --output_dir stops before any work."""
    pred = tmp_path / "k0-movie_tagging-m-OPPU.json"
    config = {"task_name": "movie_tagging", "answer_mode": "generate", "ckpt_dir": "ckpt", "max_users": 3}
    check_predictions(pred, config, overwrite=False)  # nothing there yet
    pred.with_suffix(".config.json").write_text(json.dumps(config | {"predictions": 9, "invalid_fraction": 0.1}))
    check_predictions(pred, config | {"ckpt_dir": "ckpt2", "max_users": 10}, overwrite=False)  # the same run
    with pytest.raises(UserError, match=r"another config \(answer_mode: 'generate' -> 'score'\).*own --output_dir"):
        check_predictions(pred, config | {"answer_mode": "score"}, overwrite=False)
    check_predictions(pred, config | {"answer_mode": "score"}, overwrite=True)


def test_batch_sizes_change_results_so_a_folder_holds_one_of_each(tmp_path):
    """Micro-batch (dropout masks, where the shared prefix runs) and decoding batch (padding) move
    results: a resumed run may not change them. Fingerprints stored before they counted stay valid
    (the folder's config holds one value), and a personal PEFT is reused under another decoding
    batch only."""
    config = {"task_name": "news_categorize", "learning_rate": 1e-3, "micro_batch_size": 8, "decode_batch_size": 8}
    check_or_save_config(tmp_path, config, overwrite=False)
    for key in ("micro_batch_size", "decode_batch_size"):
        with pytest.raises(UserError, match=rf"another config \({key}: 8 -> 4\)"):
            check_or_save_config(tmp_path, config | {key: 4}, overwrite=False)
        assert config_differences(config, config | {key: 4}) == [key]
        assert config_fingerprint(config | {key: 4}) == config_fingerprint(config)
    assert reuse_mismatch(config, config | {"micro_batch_size": 4}) == "micro_batch_size"
    assert reuse_mismatch(config, config | {"decode_batch_size": 4}) is None


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(UserError, match="another run is writing into this folder"):
            RunLock(tmp_path).__enter__()
        with RunLock(tmp_path, rank=1):  # other ranks of the same run hold their own lock
            pass
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text(str(dead_pid()))
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().split()[:2] == [str(os.getpid()), str(os.getppid())]


def test_other_ranks_refuse_a_main_lock_of_another_launch(tmp_path):
    host = socket.gethostname()
    (tmp_path / ".lock").write_text(f"{os.getpid()} {os.getppid()} {host}")  # our own launch's main process
    with RunLock(tmp_path, rank=1):
        pass
    (tmp_path / ".lock").write_text(f"{os.getpid()} 1 {host}")  # alive, but launched by another parent
    with pytest.raises(UserError, match="another run is writing into this folder"):
        RunLock(tmp_path, rank=1).__enter__()
    assert not (tmp_path / ".lock.1").exists()


def test_results_made_under_other_settings_are_not_reused(tmp_path):
    staging = staging_dir(tmp_path, "u1")
    (staging / "adapter").mkdir()
    (staging / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (staging / "adapter" / "adapter_config.json").write_text("{}")
    old = config_fingerprint({"learning_rate": 1e-4, "max_users": 1})
    commit_user_result(tmp_path, "u1", staging, {"user_id": "u1", "predictions": {"q": "x"}, "config": old})
    assert config_fingerprint({"learning_rate": 1e-4, "max_users": 5, "ckpt_dir": "b"}) == old  # neutral keys
    assert read_user_result(tmp_path, "u1", ["q"], old) is not None
    assert read_user_result(tmp_path, "u1", ["q"], config_fingerprint({"learning_rate": 5e-4})) is None


def test_file_fingerprint_follows_content(tmp_path):
    data = tmp_path / "users.json"
    data.write_text("[1]")
    before = file_fingerprint(data)
    data.write_text("[2]")
    assert file_fingerprint(data) != before and file_fingerprint(data) == file_fingerprint(data)


def test_processes_wait_for_every_users_result_on_disk_not_in_a_collective(tmp_path):
    users = [{"user_id": u, "query": [{"id": f"{u}q"}]} for u in ("u1", "u2", "u3")]

    def finish(user_id, config="fp", launch=None):
        staging = staging_dir(tmp_path, user_id)
        (staging / "adapter").mkdir()
        (staging / "adapter" / "adapter_model.safetensors").write_bytes(b"w")
        (staging / "adapter" / "adapter_config.json").write_text("{}")
        result = {"user_id": user_id, "predictions": {f"{user_id}q": "x"}, "config": config}
        commit_user_result(tmp_path, user_id, staging, result | ({"launch": launch} if launch else {}))

    finish("u1")
    finish("u2", config="another run's settings")  # does not count
    later = iter([lambda: finish("u3"), lambda: finish("u2")])
    sleeps = []

    def sleep(seconds):  # stands in for the other processes finishing their users
        sleeps.append(seconds)
        next(later)()

    wait_for_users(tmp_path, users, "fp", poll_seconds=7, sleep=sleep)
    assert sleeps == [7, 7]
    wait_for_users(tmp_path, users, "fp", sleep=lambda _: pytest.fail("all users are done: no wait"))
    # under --overwrite, results of an earlier launch (same settings) are not this launch's
    finish("u1", launch="this")
    later = iter([lambda: finish("u2", launch="this"), lambda: finish("u3", launch="this")])
    sleeps.clear()
    wait_for_users(tmp_path, users, "fp", poll_seconds=1, sleep=sleep, launch="this")
    assert sleeps == [1, 1]


def test_users_split_over_processes_balance_their_cost():
    """The costliest users go first, each to the least loaded process: one heavy user gets a
    process to itself; every user is in exactly one process; one process keeps them all."""
    from oppu.runs import split_users

    assert split_users([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [[0], list(range(1, 11))]
    costs = [9, 1, 8, 1, 7, 1]  # round robin: 9+8+7 = 24 against 3
    split = split_users(costs, 2)
    assert split == [[0, 1, 3, 5], [2, 4]]  # 12 against 15
    assert split_users(costs, 1) == [list(range(6))]
    assert split_users([1, 1], 3) == [[0], [1], []]  # a process may get none


def test_a_setting_added_later_at_its_old_value_keeps_finished_runs():
    """Runs made before --history_inputs existed used the items' own inputs: the same run."""
    old = {"learning_rate": 1e-3, "task_name": "news_categorize"}
    assert config_fingerprint(old | {"history_inputs": "item"}) == config_fingerprint(old)
    assert config_fingerprint(old | {"history_inputs": "task_model"}) != config_fingerprint(old)
    assert config_differences(old, old | {"history_inputs": "item"}) == []
    assert config_differences(old, old | {"history_inputs": "task_model"}) == ["history_inputs"]
    assert reuse_mismatch(old, old | {"history_inputs": "item"}) is None
    # the speed-comparison flags of the paper's release, added later, off in every earlier run
    for flag in ("all_logits", "reentrant_checkpointing"):
        assert config_fingerprint(old | {flag: False}) == config_fingerprint(old)
        assert config_differences(old, old | {flag: True}) == [flag]


def test_the_manifest_keeps_other_calls_users_of_this_config_only(tmp_path):
    """merge_outputs keeps the manifest lines of users another call answered (another
    --user_stride) when they were made under this run's settings, not an earlier config's."""
    import OPPU

    task = get_task("LaMP_2M")
    staging = staging_dir(tmp_path, "u1")
    (staging / "adapter").mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (staging / "adapter" / name).write_text("{}")
    commit_user_result(tmp_path, "u1", staging, {"user_id": "u1", "predictions": {"q1": "comedy"}, "config": "new"})
    lines = [{"user_id": "u2", "config": "new"}, {"user_id": "u3", "config": "old"}, {"user_id": "u1", "config": "old"}]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    users = [{"user_id": "u1", "query": [{"id": "q1"}]}]
    preds = OPPU.merge_outputs(tmp_path, task, users, tmp_path / "preds.json", "m", "new")
    kept = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert preds == {"q1": "comedy"} and kept == [
        {"user_id": "u2", "config": "new"},
        {"user_id": "u1", "config": "new"},
    ]
