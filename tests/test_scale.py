"""Scale-out and crash safety, on a tiny random Llama saved as a local model folder:
2 accelerate processes = 1 process; SIGKILL then rerun = uninterrupted; config and lock guards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import OPPU
import prepare_data
from oppu.modeling import ModelSpec, load_tokenizer
from utils import UserError

REPO = Path(__file__).resolve().parents[1]
TASK = "product_rating"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the embedded model's tokenizer, as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(ModelSpec())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir) -> dict:
    """Demo data of 3 test users and a task adapter trained on the tiny model."""
    import task_LoRA

    root = tmp_path_factory.mktemp("scale")
    data = root / "data"
    prepare_data.main(
        [
            "demo",
            "--tasks",
            TASK,
            "--output_dir",
            str(data),
            "--num_test_users",
            "3",
            "--num_other_users",
            "2",
            "--history_len",
            "4",
            "--queries_per_user",
            "2",
        ]
    )
    common = [
        "--task_name",
        TASK,
        "--data_dir",
        str(data),
        "--model_name",
        str(tiny_model_dir),
        "--max_step",
        "2",
        "--batch_size",
        "2",
        "--max_new_tokens",
        "6",
    ]
    out = task_LoRA.main(common + ["--ckpt_dir", str(root / "ckpt"), "--output_dir", str(root / "output")])
    return {"root": root, "common": common + ["--task_lora", str(out["adapter"])]}


def oppu_cmd(setup: dict, name: str, launcher: list[str] | None = None) -> list[str]:
    root = setup["root"] / name
    script = launcher + ["OPPU.py"] if launcher else [sys.executable, "OPPU.py"]
    return script + setup["common"] + ["--ckpt_dir", str(root / "ckpt"), "--output_dir", str(root / "output")]


def predictions(setup: dict, name: str) -> list[dict]:
    (path,) = (setup["root"] / name / "output" / TASK).glob("*-OPPU.json")
    return json.loads(path.read_text())["golds"]


# accelerate starts several CPU processes (gloo) only this way; `--cpu --num_processes 2` runs one.
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
CPU_ENV = os.environ | {"ACCELERATE_USE_CPU": "1"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=CPU_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def single(setup) -> list[dict]:
    """The reference: one uninterrupted single-process run."""
    run(oppu_cmd(setup, "single"))
    return predictions(setup, "single")


def test_task_adapter_trains_data_parallel_on_two_processes(setup):
    root = setup["root"] / "ddp"
    common = setup["common"][: setup["common"].index("--task_lora")]
    # 4 examples in steps of 3: the second step has 1 example, so process 1 gets none (and must not hang);
    # gradient checkpointing must be switched on before the model is wrapped for DDP
    dirs = [
        "--ckpt_dir",
        str(root / "ckpt"),
        "--output_dir",
        str(root / "output"),
        "--batch_size",
        "3",
        "--gradient_checkpointing",
    ]
    done = run(LAUNCH + ["task_LoRA.py", *common, *dirs])
    assert done.stdout.count("task adapter: 2 steps on 4 examples") == 1  # the main process reports (and saves) once
    (adapter,) = (root / "ckpt" / TASK).glob("*-task_LoRA_ckpt")
    assert (adapter / "adapter_model.safetensors").is_file()
    (preds,) = (root / "output" / TASK).glob("*-task_LoRA.json")
    assert len(json.loads(preds.read_text())["golds"]) == 6


def test_two_accelerate_processes_match_one(setup, single):
    done = run(oppu_cmd(setup, "double", LAUNCH))
    trained = [int(n) for n in re.findall(r"process \d: trained (\d+) users", done.stdout)]
    assert sorted(trained) == [1, 2]  # every user once, split by their histories' cost
    assert predictions(setup, "double") == single
    manifest = (setup["root"] / "double" / "ckpt" / TASK).glob("*-OPPU/manifest.jsonl")
    assert len(next(manifest).read_text().splitlines()) == 3
    # --overwrite: the processes wait for this launch's results, not the finished ones of the last
    run(oppu_cmd(setup, "double", LAUNCH) + ["--overwrite"])
    assert predictions(setup, "double") == single
    results = (setup["root"] / "double" / "ckpt" / TASK).glob("*-OPPU/users/*/result.json")
    launches = {json.loads(path.read_text()).get("launch") for path in results}
    assert len(launches) == 1 and None not in launches  # one launch id, the main process's, on every user


def test_sigkill_then_rerun_matches_uninterrupted_run(setup, single):
    cmd = oppu_cmd(setup, "killed")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    users = setup["root"] / "killed" / "ckpt" / TASK
    deadline = time.time() + 300
    while time.time() < deadline and not list(users.glob("*-OPPU/users/*/result.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(users.glob("*-OPPU/users/*/result.json")))
    assert 1 <= finished <= 3
    rerun = run(cmd)
    assert f"trained {3 - finished} users, skipped {finished} finished ones" in rerun.stdout
    assert predictions(setup, "killed") == single


def test_rerun_with_another_config_is_refused(setup, single):
    argv = oppu_cmd(setup, "single")[2:] + ["--learning_rate", "5e-4"]
    with pytest.raises(UserError, match="another config.*learning_rate"):
        OPPU.main(argv)


def test_second_run_into_a_locked_folder_is_refused(setup, single):
    (run_dir,) = (setup["root"] / "single" / "ckpt" / TASK).glob("*-OPPU")
    (run_dir / ".lock").write_text(str(os.getpid()))  # a live process holds it
    try:
        with pytest.raises(UserError, match="another run is writing into this folder"):
            OPPU.main(oppu_cmd(setup, "single")[2:])
    finally:
        (run_dir / ".lock").unlink()


def test_the_grid_on_two_processes_writes_one_table_and_a_single_process_rerun_reuses_it(setup, tiny_model_dir):
    """run_grid.py under accelerate: the stages split their work, the main process writes the
    profiles (the other waits for the files), the records and the table."""
    data, work = setup["root"] / "data", setup["root"] / "grid"
    rows = "user_majority,non_personalized,PAG,OPPU"
    own = ["--task_name", TASK, "--data_dir", str(data), "--work_dir", str(work), "--resamples", "20"]
    own += ["--rows", rows, "--profile_flags", "--max_new_tokens 4 --num_history 2"]
    stage = ["--", "--model_name", str(tiny_model_dir), "--max_step", "2", "--batch_size", "2", "--max_new_tokens", "6"]
    done = run(LAUNCH + ["run_grid.py", *own, *stage])
    assert done.stdout.count("wrote " + str(work / "results" / TASK / "table.md")) == 1
    trained = [int(n) for n in re.findall(r"process \d: trained (\d+) users", done.stdout)]
    assert sorted(trained) == [1, 2]  # every user once, split by their histories' cost
    table = json.loads((work / "results" / TASK / "table.json").read_text())
    assert list(table["rows"]) == rows.split(",")
    assert all(r["n_users"] == 3 and r["n_queries"] == 6 for r in table["rows"].values())
    for name in ("profile_user_100.json", "profile_user_others.json"):
        assert all(p["output"] for p in json.loads((data / TASK / name).read_text()))
    again = run([sys.executable, "run_grid.py", *own, *stage])
    assert again.stdout.count("finished earlier with the same config") == 4
    assert json.loads((work / "results" / TASK / "table.json").read_text())["rows"] == table["rows"]
    # a study on two processes reuses the rows, and the main process writes its table
    study = ["studies.py", "activity", *own[: own.index("--resamples")], "--rows", "non_personalized,OPPU", *stage]
    done = run(LAUNCH + study)
    assert done.stdout.count("finished earlier with the same config") == 4  # 2 rows x 2 processes
    assert done.stdout.count("table_md: ") == 1
    studied = json.loads((work / "studies" / "activity" / TASK / "table.json").read_text())
    assert studied["grid"]["rows"]["OPPU"]["metrics"] == table["rows"]["OPPU"]["metrics"]
