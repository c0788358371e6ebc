"""task_LoRA.main -> OPPU.main -> eval_task.main on the real embedded model, on a demo slice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import OPPU
import prepare_data
import task_LoRA
from eval import eval_task
from utils import UserError

TASK = "news_categorize"
# Tiny but real: the embedded SmolLM2 on 2 test users and 4 other users.
SIZES = ["--num_test_users", "2", "--num_other_users", "4", "--history_len", "4", "--queries_per_user", "2"]
QUICK = ["--max_step", "2", "--batch_size", "2", "--micro_batch_size", "2", "--max_new_tokens", "4"]
TOKEN = "hf_SECRET_token_never_written"


def stage_args(root: Path, data: Path) -> list[str]:
    return [
        "--task_name",
        TASK,
        "--data_dir",
        str(data),
        "--ckpt_dir",
        str(root / "ckpt"),
        "--output_dir",
        str(root / "output"),
        "--access_token",
        TOKEN,
    ] + QUICK


def read_preds(path: Path) -> dict[str, str]:
    return {g["id"]: g["output"] for g in json.loads(path.read_text())["golds"]}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    prepare_data.main(["demo", "--tasks", TASK, "--output_dir", str(data)] + SIZES)
    return data


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, demo_data) -> dict:
    root = tmp_path_factory.mktemp("run")
    stage1 = task_LoRA.main(stage_args(root, demo_data) + ["--predict_base"])
    stage2 = OPPU.main(stage_args(root, demo_data) + ["--task_lora", str(stage1["adapter"])])
    return {"root": root, "data": demo_data, **stage1, "oppu": stage2}


def test_pipeline_writes_scorable_predictions(pipeline):
    for preds in (pipeline["base_predictions"], pipeline["predictions"], pipeline["oppu"]["predictions"]):
        golds = preds.with_suffix(".golds.json")
        out = pipeline["root"] / f"{preds.stem}-scores.json"
        result = eval_task.main(
            [
                "--golds_json",
                str(golds),
                "--preds_json",
                str(preds),
                "--task_name",
                "LaMP_2N",
                "--output_file",
                str(out),
                "--per_user",
                str(pipeline["data"] / TASK / "user_top_100_history.json"),
            ]
        )
        assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["f1"] <= 1.0
        assert set(result["per_user"]) == {"demo-news-000", "demo-news-001"}
        assert json.loads(out.read_text())["accuracy"] == result["accuracy"]


def test_task_adapter_saved_as_safetensors_with_config(pipeline):
    adapter = pipeline["adapter"]
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.glob("*.bin")) and not list(adapter.glob("*.pt"))
    config = json.loads((adapter / "run_config.json").read_text())
    assert config["model_name"] == "SmolLM2-135M-Instruct" and config["task_name"] == TASK
    targets = set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_oppu_manifest_and_user_adapters(pipeline):
    run_dir = pipeline["oppu"]["run_dir"]
    lines = [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()]
    assert [m["user_id"] for m in lines] == ["demo-news-000", "demo-news-001"]
    for m in lines:
        assert m["history_items"] == 4 and m["train_examples"] == 4 and m["steps"] == 2
        assert m["train_tokens"] > 0 and m["seconds"] > 0 and m["final_loss"] > 0
        assert 0 < m["train_seconds"] and 0 < m["answer_seconds"]
        assert m["train_seconds"] + m["answer_seconds"] <= m["seconds"] + 0.02  # each rounded to 0.01 s
        assert len(m["losses"]) == 2 and m["losses"][-1] == round(m["final_loss"], 4)
    adapters = sorted(run_dir.glob("users/*/adapter/adapter_model.safetensors"))
    assert len(adapters) == 2 and adapters[0].read_bytes() != adapters[1].read_bytes()


def test_access_token_never_written(pipeline, capsys):
    written = [p for p in pipeline["root"].rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert written == []
    assert TOKEN not in capsys.readouterr().out


def test_rerun_resumes_and_reproduces(pipeline, capsys):
    """The same command again skips every finished user; a fresh run gives identical predictions."""
    args = stage_args(pipeline["root"], pipeline["data"]) + ["--task_lora", str(pipeline["adapter"])]
    before = read_preds(pipeline["oppu"]["predictions"])
    OPPU.main(args)
    assert "trained 0 users, skipped 2 finished ones" in capsys.readouterr().out
    fresh = pipeline["root"] / "fresh"
    again = OPPU.main(args + ["--ckpt_dir", str(fresh / "ckpt"), "--output_dir", str(fresh / "output")])
    assert read_preds(again["predictions"]) == before


def test_a_run_answering_another_way_does_not_replace_the_predictions(pipeline):
    """Prediction files are named by task, k, model and profile: a stage answering another way
    into the same --output_dir stops before any work, its files untouched (both stages, and the
    base model's predictions of --predict_base)."""
    root, data = pipeline["root"], pipeline["data"]
    files = sorted((root / "output").rglob("*.json"))
    before = {p: p.read_bytes() for p in files}
    other = stage_args(root, data) + ["--answer_mode", "score"]
    with pytest.raises(UserError, match="task_LoRA.json: holds the predictions of a run with another config"):
        task_LoRA.main(other)
    with pytest.raises(UserError, match="base.json: holds the predictions of a run with another config"):
        task_LoRA.main(other + ["--no_answer", "--predict_base"])
    with pytest.raises(UserError, match="OPPU.json: holds the predictions .*answer_mode: 'generate' -> 'score'"):
        OPPU.main(other + ["--task_lora", str(pipeline["adapter"])])
    assert sorted((root / "output").rglob("*.json")) == files and all(p.read_bytes() == b for p, b in before.items())
