"""Own your PEFT: export, generate.py, --user_file, --update and the merged base, on a tiny
random Llama saved as a local model folder (the scripts take model paths)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import export_user
import generate
import OPPU
import prepare_data
import task_LoRA
from oppu.adapters import ADAPTER_WEIGHTS, merge_adapter
from oppu.generation import DecodeConfig
from oppu.generation import generate as decode
from oppu.modeling import ModelSpec, load_model
from oppu.ownership import IDENTITY_FILE, MERGED_FILE, load_user_file, update_plan
from oppu.runs import ADDED_SETTINGS, CONFIG_FILE, user_result_dir
from oppu.tasks import get_task
from prompts import render_query_input
from utils import UserError, read_json, write_json

TASK = "news_categorize"
SIZES = ["--num_test_users", "2", "--num_other_users", "2", "--history_len", "6", "--queries_per_user", "3"]
TRAIN = [
    "--batch_size",
    "4",
    "--micro_batch_size",
    "4",
    "--max_epoch",
    "1",
    "--min_steps",
    "0",
    "--learning_rate",
    "1e-2",
    "--max_new_tokens",
    "4",
]
USER = "demo-news-000"


def save_tiny(tiny_model, tokenizer, folder: Path, seed: int = 0) -> Path:
    tiny_model(seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def preds_of(path: Path) -> dict[str, str]:
    return {g["id"]: g["output"] for g in read_json(path)["golds"]}


def write_inputs(path: Path, user: dict) -> Path:
    path.write_text("".join(json.dumps({"id": q["id"], "input": q["input"]}) + "\n" for q in user["query"]))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, tokenizer) -> dict:
    """task_LoRA.py then OPPU.py on demo data with a tiny random base saved as a model folder."""
    root = tmp_path_factory.mktemp("own")
    base = save_tiny(tiny_model, tokenizer, root / "tiny-base")
    data = root / "data"
    prepare_data.main(["demo", "--tasks", TASK, "--output_dir", str(data)] + SIZES)
    common = [
        "--task_name",
        TASK,
        "--data_dir",
        str(data),
        "--ckpt_dir",
        str(root / "ckpt"),
        "--output_dir",
        str(root / "output"),
        "--model_name",
        str(base),
    ] + TRAIN
    stage1 = task_LoRA.main(common + ["--max_step", "2"])
    stage2 = OPPU.main(common + ["--task_lora", str(stage1["adapter"])])
    users = json.loads((data / TASK / "user_top_100_history.json").read_text())
    return {
        "root": root,
        "base": base,
        "data": data,
        "common": common,
        "task_lora": stage1["adapter"],
        **stage2,
        "users": {u["user_id"]: u for u in users},
    }


@pytest.fixture(scope="module")
def exported(run) -> Path:
    out = run["root"] / "exports" / "alice"
    export_user.main(["--oppu_dir", str(run["run_dir"]), "--user_id", USER, "--output_dir", str(out)])
    return out


def test_export_folder_is_self_contained(run, exported):
    names = {p.name for p in exported.iterdir()}
    assert names == {"adapter_model.safetensors", "adapter_config.json", IDENTITY_FILE, "history.json", "README.md"}
    identity = read_json(exported / IDENTITY_FILE)
    sha = hashlib.sha256((run["task_lora"] / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    assert identity["task_adapter"]["sha256"] == sha and identity["base_model"] == str(run["base"])
    assert (identity["user_id"], identity["task_name"], identity["k"], identity["add_profile"]) == (
        USER,
        TASK,
        0,
        False,
    )
    history = run["users"][USER]["profile"]
    assert identity["trained_item_ids"] == [str(it["id"]) for it in history]
    assert identity["training"]["steps"] == 2 and identity["updates"] == []
    trained = user_result_dir(run["run_dir"], USER) / "adapter" / ADAPTER_WEIGHTS
    assert (exported / ADAPTER_WEIGHTS).read_bytes() == trained.read_bytes()
    assert load_user_file(get_task(TASK), exported / "history.json")["profile"] == history
    card = (exported / "README.md").read_text()
    assert USER in card and sha in card and "generate.py --peft" in card
    with pytest.raises(UserError, match="already exists; use --overwrite"):
        export_user.main(["--oppu_dir", str(run["run_dir"]), "--user_id", USER, "--output_dir", str(exported)])


def test_export_refuses_a_result_made_under_other_settings(run, tmp_path):
    """An interrupted `OPPU.py --overwrite` with new settings leaves the old users' results beside
    the new run_config.json: exporting one would label the PEFT with settings it never saw."""
    stale = tmp_path / "run"
    shutil.copytree(run["run_dir"], stale)
    config = read_json(stale / CONFIG_FILE)
    write_json(stale / CONFIG_FILE, config | {"learning_rate": config["learning_rate"] * 10})
    with pytest.raises(UserError, match=f"user '{USER}' has no finished result in this run under its settings"):
        export_user.main(["--oppu_dir", str(stale), "--user_id", USER, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_generate_serves_a_peft_exported_before_the_latest_settings(run, exported, tmp_path):
    """An export's settings lack the flags added after it was made (runs.ADDED_SETTINGS): it is
    served as the run that made it ran."""
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    identity = read_json(old / IDENTITY_FILE)
    assert set(ADDED_SETTINGS) <= set(identity["settings"])
    for key in ADDED_SETTINGS:
        del identity["settings"][key]
    write_json(old / IDENTITY_FILE, identity)
    query = run["users"][USER]["query"][0]
    want = generate.main(["--peft", str(exported), "--input", query["input"]])["predictions"]
    assert generate.main(["--peft", str(old), "--input", query["input"]])["predictions"] == want


def test_export_default_folder_is_sanitised(run, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no user with user_id"):
        export_user.main(["--oppu_dir", str(run["run_dir"]), "--user_id", "../../etc"])
    assert not (tmp_path / "exports").exists() or all(".." not in p.name for p in (tmp_path / "exports").iterdir())
    out = export_user.main(["--oppu_dir", str(run["run_dir"]), "--user_id", USER])["peft"]
    assert out.parent == Path("exports") and re.fullmatch(r"[A-Za-z0-9._-]+", out.name)


def test_generate_with_export_equals_training_run(run, exported, tmp_path, capsys):
    user = run["users"][USER]
    out = tmp_path / "preds.json"
    generate.main(
        ["--peft", str(exported), "--inputs", str(write_inputs(tmp_path / "q.jsonl", user)), "--output_file", str(out)]
    )
    run_preds = preds_of(run["predictions"])
    assert preds_of(out) == {q["id"]: run_preds[q["id"]] for q in user["query"]}
    assert (tmp_path / "preds.config.json").is_file()
    query = user["query"][0]
    answer = generate.main(["--peft", str(exported), "--input", query["input"]])
    assert answer["predictions"] == {"input": run_preds[query["id"]]}
    assert capsys.readouterr().out.splitlines()[-1] == run_preds[query["id"]]


def test_wrong_base_or_task_adapter_is_refused(run, exported, tmp_path, tiny_model, tokenizer):
    query = ["--peft", str(exported), "--input", "x"]
    other = save_tiny(tiny_model, tokenizer, tmp_path / "other-base", seed=1)
    with pytest.raises(UserError, match="trained on base model") as err:
        generate.main(query + ["--model_name", str(other)])
    assert "\n" not in str(err.value)
    bigger = tmp_path / "b" / run["base"].name  # same name, another shape
    bigger.mkdir(parents=True)
    shutil.copy(run["base"] / "config.json", bigger / "config.json")
    config = read_json(bigger / "config.json")
    write_json(bigger / "config.json", config | {"num_hidden_layers": 3})
    with pytest.raises(UserError, match="another shape"):
        generate.main(query + ["--model_name", str(bigger)])
    fake = tmp_path / "fake_task_lora"
    shutil.copytree(run["task_lora"], fake)
    (fake / ADAPTER_WEIGHTS).write_bytes((fake / ADAPTER_WEIGHTS).read_bytes() + b" ")
    with pytest.raises(UserError, match="is not the one this PEFT was trained on") as err:
        generate.main(query + ["--task_lora", str(fake)])
    assert "\n" not in str(err.value)


def test_user_file_training_equals_full_run(run, tmp_path):
    user = run["users"][USER]
    path = tmp_path / "my_history.json"
    write_json(path, {k: user[k] for k in ("user_id", "profile", "query")})
    peft_dir = tmp_path / "mine"
    args = run["common"] + ["--task_lora", str(run["task_lora"]), "--user_file", str(path), "--peft_dir", str(peft_dir)]
    out = OPPU.main(args)
    trained = load_file(user_result_dir(run["run_dir"], USER) / "adapter" / ADAPTER_WEIGHTS)
    mine = load_file(peft_dir / ADAPTER_WEIGHTS)
    assert trained.keys() == mine.keys() and all(torch.equal(trained[k], mine[k]) for k in trained)
    run_result = read_json(user_result_dir(run["run_dir"], USER) / "result.json")
    assert out["result"]["predictions"] == run_result["predictions"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".oppu-user-")]  # the work folder is gone
    with pytest.raises(UserError, match="already exists; use --overwrite"):
        OPPU.main(args)


def test_merged_base_reloads_with_equal_greedy_outputs(run, exported, tmp_path, tokenizer):
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()  # a folder in the way: refused before any model loads or the PEFT is written
    (merged_dir / "notes.txt").write_text("mine")
    argv = ["--oppu_dir", str(run["run_dir"]), "--user_id", USER, "--output_dir", str(tmp_path / "p")]
    with pytest.raises(UserError, match="holds another base or task adapter"):
        export_user.main([*argv, "--merged_base", str(merged_dir)])
    assert not (tmp_path / "p").exists() and (merged_dir / "notes.txt").read_text() == "mine"
    (merged_dir / "notes.txt").unlink()
    merged_dir.rmdir()
    export_user.main(
        [
            "--oppu_dir",
            str(run["run_dir"]),
            "--user_id",
            USER,
            "--output_dir",
            str(tmp_path / "p"),
            "--merged_base",
            str(merged_dir),
        ]
    )
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / MERGED_FILE).is_file()
    assert not list(merged_dir.glob("*.bin"))
    in_memory, tok = load_model(ModelSpec(str(run["base"])))
    in_memory = merge_adapter(in_memory, run["task_lora"])
    reloaded, tok2 = load_model(ModelSpec(str(merged_dir)))
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    prompts = [q["input"] for u in run["users"].values() for q in u["query"]]
    cfg = DecodeConfig(max_new_tokens=6)
    assert decode(reloaded, tok2, prompts, cfg, show=False) == decode(in_memory, tok, prompts, cfg, show=False)
    # generate.py takes the merged base in place of base + task adapter, with the same answers
    user = run["users"][USER]
    out = tmp_path / "preds.json"
    generate.main(
        [
            "--peft",
            str(exported),
            "--model_name",
            str(merged_dir),
            "--output_file",
            str(out),
            "--inputs",
            str(write_inputs(tmp_path / "q.jsonl", user)),
        ]
    )
    run_preds = preds_of(run["predictions"])
    assert preds_of(out) == {q["id"]: run_preds[q["id"]] for q in user["query"]}
    # a task adapter named beside a merged base would be ignored: refused instead
    with pytest.raises(UserError, match="is a merged base that holds its task adapter; leave --task_lora out"):
        generate.main(
            [
                "--peft",
                str(exported),
                "--model_name",
                str(merged_dir),
                "--task_lora",
                str(run["task_lora"]),
                "--input",
                "x",
            ]
        )
    # training merges the task adapter itself: on a merged base it would be applied twice
    history = tmp_path / "my_history.json"
    write_json(history, {k: user[k] for k in ("user_id", "profile", "query")})
    argv = run["common"] + ["--model_name", str(merged_dir), "--task_lora", str(run["task_lora"])]
    with pytest.raises(UserError, match="a merged base .base . task adapter. is for serving"):
        OPPU.main(argv + ["--user_file", str(history), "--peft_dir", str(tmp_path / "mine")])


# --- the adapter files as vLLM's LoRA loader reads them (vllm/lora/peft_helper.py, lora_model.py) ---
# Llama modules vLLM can put a LoRA on (its packed qkv_proj / gate_up_proj unpacked to their parts).
VLLM_LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}  # --max-lora-rank choices (default 16)
VLLM_TENSOR = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w+_proj)\.lora_([AB])\.weight")


def test_adapter_files_fit_vllm_lora_loader(exported):
    config = read_json(exported / "adapter_config.json")
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert isinstance(config["r"], int) and config["r"] in VLLM_RANKS and config["r"] <= 16
    assert isinstance(config["lora_alpha"], int)
    assert set(config["target_modules"]) <= VLLM_LLAMA_LORA_MODULES
    assert not config.get("modules_to_save") and not config.get("use_dora") and not config.get("use_rslora")
    assert not config.get("layers_to_transform") and not config.get("rank_pattern") and not config.get("alpha_pattern")
    with safe_open(exported / ADAPTER_WEIGHTS, framework="pt") as f:
        names = list(f.keys())
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
    layers, pairs = set(), {}
    for name in names:
        match = VLLM_TENSOR.fullmatch(name)
        assert match, f"{name}: not a name vLLM's parse_fine_tuned_lora_name maps to a module"
        assert "embed" not in name and "lm_head" not in name
        layers.add(int(match[1]))
        assert match[2] in config["target_modules"]
        pairs.setdefault((match[1], match[2]), {})[match[3]] = shapes[name]
    assert layers == {0, 1}
    for (_, _), ab in pairs.items():  # lora_A is (r, in), lora_B is (out, r)
        assert set(ab) == {"A", "B"} and ab["A"][0] == config["r"] and ab["B"][1] == config["r"]


# --- update: a user's taste changes ---------------------------------------------------------------
TOPICS = [
    "a stadium opening",
    "a new bus line",
    "a school board meeting",
    "a museum night",
    "a harbour festival",
    "a bakery award",
    "a city budget",
    "a river cleanup",
]


def taste_user(old: int, new: int, queries: int = 4) -> dict:
    """A user who labelled every ambiguous article 'travel' and now labels them 'crime' (labels
    of one token each: the tiny model learns them in a few steps)."""
    task = get_task(TASK)
    items = [
        {
            "id": f"h{i}",
            "title": f"Story {i}",
            "text": f"{TOPICS[i % len(TOPICS)]} number {i}",
            "category": "travel" if i < old else "crime",
        }
        for i in range(old + new)
    ]
    qs = [
        {"id": f"q{j}", "input": render_query_input(task, text=f"{TOPICS[(j * 3) % len(TOPICS)]} number {100 + j}")}
        for j in range(queries)
    ]
    return {"user_id": "taste", "profile": items, "query": qs}


def test_update_plan_takes_new_items_and_a_seeded_replay():
    user = taste_user(10, 4)
    identity = {"trained_item_ids": [f"h{i}" for i in range(10)]}
    new, replay = update_plan(identity, user, 0.5, seed=7)
    assert new == [10, 11, 12, 13] and len(replay) == 2 and set(replay) <= set(range(10))
    assert update_plan(identity, user, 0.5, seed=7) == (new, replay)
    assert update_plan(identity, user, 0.0, seed=7)[1] == [] and len(update_plan(identity, user, 9, 7)[1]) == 10


def test_update_moves_predictions_to_the_new_taste(run, tmp_path, capsys):
    # Answers scored among the labels: a 2-layer random model learns which label a user prefers
    # long before it learns to spell it out. On q and v alone its LoRA hardly moves the output in
    # 18 steps (loss 10.4 -> 6.7); with o_proj and down_proj it writes into the residual stream.
    taste = [
        "--batch_size",
        "4",
        "--micro_batch_size",
        "4",
        "--max_epoch",
        "3",
        "--min_steps",
        "0",
        "--learning_rate",
        "1e-1",
        "--answer_mode",
        "score",
        "--target_modules",
        "q_proj,v_proj,o_proj,down_proj",
    ]
    common = run["common"][: run["common"].index("--batch_size")] + taste + ["--task_lora", str(run["task_lora"])]
    old_file, full_file = tmp_path / "old.json", tmp_path / "full.json"
    write_json(old_file, taste_user(24, 0))
    write_json(full_file, taste_user(24, 8))
    peft_dir = tmp_path / "taste"
    OPPU.main(common + ["--user_file", str(old_file), "--peft_dir", str(peft_dir)])
    queries = tmp_path / "q.jsonl"
    write_inputs(queries, taste_user(0, 0))
    before = generate.main(["--peft", str(peft_dir), "--inputs", str(queries)])["predictions"]
    assert set(before.values()) == {"travel"}

    start = time.time()
    update = OPPU.main(common + ["--user_file", str(full_file), "--peft_dir", str(peft_dir), "--update"])["update"]
    update_seconds = time.time() - start
    after = generate.main(["--peft", str(peft_dir), "--inputs", str(queries)])["predictions"]
    assert set(after.values()) == {"crime"}
    assert update["new_item_ids"] == [f"h{i}" for i in range(24, 32)] and len(update["replayed_item_ids"]) == 4
    identity = read_json(peft_dir / IDENTITY_FILE)
    assert identity["trained_item_ids"] == [f"h{i}" for i in range(32)] and identity["updates"] == [update]
    with pytest.raises(UserError, match="no history items since"):
        OPPU.main(common + ["--user_file", str(full_file), "--peft_dir", str(peft_dir), "--update"])
    reused = taste_user(24, 9)
    reused["profile"][-1]["id"] = reused["profile"][0]["id"]  # a new item under a trained item's id
    write_json(tmp_path / "reused.json", reused)
    write_json(tmp_path / "only_new.json", taste_user(24, 9) | {"profile": taste_user(24, 9)["profile"][32:]})
    with pytest.raises(
        UserError, match="only_new.json: 32 of the 32 history items this PEFT was trained on are missing"
    ):
        OPPU.main(common + ["--user_file", str(tmp_path / "only_new.json"), "--peft_dir", str(peft_dir), "--update"])
    with pytest.raises(UserError, match="reused.json: history item id 'h0' appears twice"):
        OPPU.main(common + ["--user_file", str(tmp_path / "reused.json"), "--peft_dir", str(peft_dir), "--update"])

    start = time.time()
    retrain = OPPU.main(common + ["--user_file", str(full_file), "--peft_dir", str(tmp_path / "again")])["result"]
    retrain_seconds = time.time() - start
    assert update["steps"] * 2 < retrain["steps"]  # 12 examples against 32, at the same batch and epochs
    with capsys.disabled():
        print(
            f"\nupdate: {update['train_examples']} examples, {update['steps']} steps, {update_seconds:.1f} s "
            f"(train {update['seconds']} s); retraining: {retrain['train_examples']} examples, "
            f"{retrain['steps']} steps, {retrain_seconds:.1f} s (train {retrain['seconds']} s); "
            f"retrained predictions {sorted(set(retrain['predictions'].values()))}"
        )


def test_generate_serves_several_users_in_one_batch_as_their_run_did(run, exported, tmp_path):
    second = tmp_path / "bob"
    export_user.main(["--oppu_dir", str(run["run_dir"]), "--user_id", "demo-news-001", "--output_dir", str(second)])
    lines = [
        {"id": q["id"], "input": q["input"], "peft": str(folder)}
        for folder, user in ((exported, run["users"][USER]), (second, run["users"]["demo-news-001"]))
        for q in user["query"]
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_preds = preds_of(run["predictions"])
    for bound in ("2", "1"):  # both users in mixed batches; one user at a time
        out = generate.main(["--inputs", str(requests), "--max_loaded_adapters", bound, "--decode_batch_size", "4"])
        assert out["predictions"] == run_preds and out["peak_loaded"] == int(bound) and out["loads"] == 2
    for bad, says in (
        (["--max_new_tokens", "0"], "max_new_tokens must be >= 1"),
        (["--do_sample", "--temperature", "0"], "temperature must be > 0"),
    ):
        with pytest.raises(UserError, match=says):  # before any model loads
            generate.main(["--inputs", str(requests), *bad])


def test_the_model_card_names_the_peft_type():
    from oppu.ownership import model_card

    identity = {
        "user_id": "u",
        "task_name": "news_categorize",
        "base_model": "m",
        "k": 0,
        "add_profile": False,
        "training": {"steps": 2},
        "task_adapter": {"path": "t", "sha256": "0"},
        "updates": [],
    }
    lora = {"peft_type": "lora", "lora_r": 8, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": "q_proj,v_proj"}
    assert "A LoRA trained by OPPU" in model_card(identity | {"settings": lora}, "p")
    assert "LoRA r=8, alpha=8" in model_card(identity | {"settings": lora}, "p")
    ia3 = model_card(identity | {"settings": {"peft_type": "ia3", "target_modules": "k_proj,v_proj,down_proj"}}, "p")
    assert "An IA3 adapter trained by OPPU" in ia3 and "LoRA" not in ia3
    tuned = model_card(identity | {"settings": {"peft_type": "prompt_tuning", "num_virtual_tokens": 20}}, "p")
    assert "prompt tuning, 20 virtual tokens" in tuned and "LoRA" not in tuned
