"""Tweets: stage 1 trains a rewriter beside the task adapter; OPPU asks each history tweet's
personal pair with the rewriter's neutral input, never the tweet itself (tiny random model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import OPPU
import prepare_data
import task_LoRA
from oppu import rewriter
from oppu.data import TEST_USERS_FILE, load_users
from oppu.examples import history_pairs, rewrite_pairs
from oppu.generation import DecodeConfig, generate
from oppu.modeling import ModelSpec, load_model
from oppu.rewriter import REWRITER_DIR, rewrite_histories
from oppu.runs import user_result_dir
from oppu.tasks import get_task
from prompts import parse_prediction
from utils import UserError

TWEETS = get_task("tweet_paraphrase")
SIZES = ["--num_test_users", "2", "--num_other_users", "2", "--history_len", "3", "--queries_per_user", "2"]
QUICK = ["--max_step", "1", "--batch_size", "2", "--max_new_tokens", "6"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_model, tokenizer) -> dict:
    root = tmp_path_factory.mktemp("tweets")
    model_dir = root / "tiny-llama"
    tiny_model(0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prepare_data.main(["demo", "--tasks", TWEETS.name, "--output_dir", str(root / "data")] + SIZES)
    flags = ["--task_name", TWEETS.name, "--data_dir", str(root / "data"), "--model_name", str(model_dir), *QUICK]
    flags += ["--ckpt_dir", str(root / "ckpt"), "--output_dir", str(root / "output")]
    out = task_LoRA.main(flags + ["--no_answer"])
    return {"root": root, "flags": flags, "model_dir": model_dir, "adapter": out["adapter"]}


def test_stage1_trains_the_rewriter_on_the_queries_in_reverse(stage1, capsys):
    folder = stage1["adapter"] / REWRITER_DIR
    assert (folder / "adapter_model.safetensors").is_file()
    assert json.loads((folder / "run_config.json").read_text())["task_name"] == TWEETS.name
    users = load_users(TWEETS, stage1["root"] / "data" / TWEETS.name / "user_others.json", need_history=False)
    pairs = rewrite_pairs(TWEETS, users)
    assert len(pairs) == 4  # every query of the 2 other users
    for (prompt, target), query in zip(pairs, [q for u in users for q in u["query"]]):
        assert query["gold"] in prompt and prompt.startswith("Rewrite the following tweet")
        assert query["input"].endswith(target.strip())  # the query's neutral text, no instruction
    task_LoRA.main(stage1["flags"] + ["--no_answer"])
    assert "reusing the rewriter" in capsys.readouterr().out


@pytest.mark.parametrize("cut_off", [None, 16])
def test_rewrites_leave_the_base_as_it_was_and_are_the_rewriters_greedy_answers(stage1, tmp_path, cut_off):
    """Each prompt is cut as the rewriter's training examples were, at the cut_off in its saved
    config: 16 tokens less the 6 of the answer leaves 10, fewer than any of these prompts has."""
    from peft import PeftModel

    from oppu.generation import prompt_ids

    task_lora = stage1["adapter"]
    if cut_off:  # a task adapter (and rewriter) trained with --cut_off 16
        task_lora = tmp_path / "task-adapter"
        shutil.copytree(stage1["adapter"], task_lora)
        saved = task_lora / REWRITER_DIR / "run_config.json"
        saved.write_text(json.dumps(json.loads(saved.read_text()) | {"cut_off": cut_off}))
    model, tokenizer = load_model(ModelSpec(str(stage1["model_dir"])), device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    users = load_users(TWEETS, stage1["root"] / "data" / TWEETS.name / TEST_USERS_FILE)
    model, inputs = rewrite_histories(model, tokenizer, TWEETS, users, task_lora, max_new_tokens=6)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(model, "peft_config")
    peft = PeftModel.from_pretrained(model, str(stage1["adapter"] / REWRITER_DIR)).eval()
    for user in users:
        prompts = [
            "Rewrite the following tweet in plain, neutral words without any explanation before or after it: "
            f"{item['text']}\nAnswer:"
            for item in user["profile"]
        ]
        cfg = DecodeConfig(max_new_tokens=6, batch_size=1, cut_off=cut_off)
        greedy = generate(peft, tokenizer, prompts, cfg, show=False)
        if cut_off:
            uncut = DecodeConfig(max_new_tokens=6, batch_size=1)
            assert all(len(ids) > 10 for ids in prompt_ids(tokenizer, prompts, uncut, report=False))
            assert all(len(ids) == 10 for ids in prompt_ids(tokenizer, prompts, cfg, report=False))
            assert greedy != generate(peft, tokenizer, prompts, uncut, show=False)  # the cut changes the answers
        own = [item["text"] for item in user["profile"]]
        assert inputs[user["user_id"]] == [parse_prediction(TWEETS, g) or t for g, t in zip(greedy, own)]
    model = peft.unload()
    for user in users:  # a user's rewrites do not depend on the other users of the call
        model, alone = rewrite_histories(model, tokenizer, TWEETS, [user], task_lora, max_new_tokens=6)
        assert alone == {user["user_id"]: inputs[user["user_id"]]}


def test_oppu_trains_each_user_on_the_rewrites(stage1, monkeypatch):
    seen: list[tuple[str, str]] = []
    encode = OPPU.encode_pairs

    def recording(tok, pairs, cut_off):
        seen.extend(pairs)
        return encode(tok, pairs, cut_off)

    monkeypatch.setattr(OPPU, "encode_pairs", recording)
    budgets = []
    real = rewriter.generate
    monkeypatch.setattr(
        rewriter, "generate", lambda m, t, p, cfg, **kw: budgets.append(cfg) or real(m, t, p, cfg, **kw)
    )
    out = OPPU.main(stage1["flags"] + ["--task_lora", str(stage1["adapter"])])
    config = json.loads((out["run_dir"] / "run_config.json").read_text())
    # the rewrites are decoded on their own budget, not with the queries' --max_new_tokens 6, and
    # their prompts cut at the rewriter's --cut_off, as its training examples were
    trained = json.loads((stage1["adapter"] / REWRITER_DIR / "run_config.json").read_text())["cut_off"]
    users = load_users(TWEETS, stage1["root"] / "data" / TWEETS.name / TEST_USERS_FILE)
    # one call per user: a user's rewrites do not depend on who else is rewritten in the run
    assert [(c.max_new_tokens, c.batch_size, c.do_sample, c.cut_off) for c in budgets] == [
        (rewriter.REWRITE_TOKENS, 8, False, trained)
    ] * len(users)
    expected = []
    for user in users:
        result = json.loads((user_result_dir(out["run_dir"], user["user_id"]) / "result.json").read_text())
        assert len(result["history_inputs"]) == len(user["profile"])
        expected += history_pairs(TWEETS, user, inputs=result["history_inputs"])
    assert seen == expected
    assert [t for _, t in seen] == [" " + it["text"] for u in users for it in u["profile"]]  # targets: the tweets
    assert config["history_inputs"] == "rewriter" and len(config["rewriter_sha256"]) == 64


def test_other_settings_copy_the_same_rewriter_and_other_training_retrains_it(stage1, tmp_path, capsys):
    """The k=1 and profile task adapters' rewriters are the k=0 one's weights (their prompts hold
    no k or profile), copied, not trained again; another seed trains its own."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(stage1["root"] / "ckpt", ckpt)
    flags = stage1["flags"] + ["--ckpt_dir", str(ckpt), "--no_answer"]
    first = (stage1["adapter"] / REWRITER_DIR / "adapter_model.safetensors").read_bytes()
    out = task_LoRA.main(flags + ["--k", "1"])
    assert "copied the rewriter of" in capsys.readouterr().out
    assert (out["adapter"] / REWRITER_DIR / "adapter_model.safetensors").read_bytes() == first
    task_LoRA.main(flags + ["--k", "1"])
    assert "reusing the rewriter" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"trained with other settings \(seed: \d+ -> 1\)"):
        task_LoRA.main(flags + ["--k", "1", "--seed", "1"])  # the finished k=1 adapter is not replaced
    other = tmp_path / "ckpt_seed1"  # only the k=0 adapter (seed 0): no twin for seed 1
    shutil.copytree(stage1["root"] / "ckpt", other)
    capsys.readouterr()
    out = task_LoRA.main(stage1["flags"] + ["--ckpt_dir", str(other), "--no_answer", "--k", "1", "--seed", "1"])
    printed = capsys.readouterr().out
    assert "copied" not in printed and "rewriter: 1 steps," in printed
    saved = json.loads((out["adapter"] / REWRITER_DIR / "run_config.json").read_text())
    assert saved["seed"] == 1 and "k" not in saved


def test_a_task_adapter_without_rewriter_is_refused_unless_items_are_asked_as_they_are(stage1, tmp_path):
    bare = tmp_path / "bare-task-adapter"
    shutil.copytree(stage1["adapter"], bare, ignore=shutil.ignore_patterns(REWRITER_DIR))
    flags = stage1["flags"] + ["--task_lora", str(bare), "--ckpt_dir", str(tmp_path / "ckpt")]
    flags += ["--output_dir", str(tmp_path / "output")]  # predictions of other settings: a folder of their own
    with pytest.raises(UserError, match="no rewriter here"):
        OPPU.main(flags)
    out = OPPU.main(flags + ["--history_inputs", "item"])
    assert Path(out["predictions"]).is_file()


def test_the_rewriters_decoding_leaves_a_prompt_under_a_small_cut_off():
    from oppu.rewriter import rewrite_decoding

    assert rewrite_decoding(None) == DecodeConfig(max_new_tokens=rewriter.REWRITE_TOKENS, batch_size=8)
    assert rewrite_decoding(2048).max_new_tokens == rewriter.REWRITE_TOKENS
    small = rewrite_decoding(64)
    assert (small.max_new_tokens, small.cut_off, small.prompt_budget(small.max_new_tokens)) == (32, 64, 32)
    assert rewrite_decoding(1).max_new_tokens == 1


def test_history_inputs_rewriter_is_refused_where_items_have_inputs(make_args):
    assert make_args().history_inputs == "item"  # news items have their article
    assert make_args("--task_name", "tweet_paraphrase").history_inputs == "rewriter"
    with pytest.raises(UserError, match="news_categorize's history items have inputs"):
        make_args("--history_inputs", "rewriter")


def test_the_rewriter_and_the_task_adapter_depend_on_the_seed_alone(stage1, tmp_path):
    """Whatever used the random state before (the task adapter's training, or the base model
    sampling its answers), the rewriter and the task adapter start from the seed's weights."""
    from safetensors.torch import load_file

    from oppu import cli
    from oppu.rewriter import train_rewriter

    args = task_LoRA.parse_args(stage1["flags"])
    cli.validate(args)  # the size defaults, as the stage resolves them
    users = load_users(TWEETS, stage1["root"] / "data" / TWEETS.name / TEST_USERS_FILE)
    weights = []
    for noise in (1, 2):
        torch.manual_seed(noise)
        model, tokenizer = load_model(ModelSpec(str(stage1["model_dir"])))
        peft, _ = train_rewriter(model, tokenizer, TWEETS, users, args)
        weights.append({k: v.clone() for k, v in peft.state_dict().items() if "lora_" in k})
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    sampled = stage1["flags"] + ["--no_answer", "--predict_base", "--do_sample", "--overwrite"]
    sampled = [f if f != str(stage1["root"] / "ckpt") else str(tmp_path / "ckpt") for f in sampled]
    adapter = task_LoRA.main(sampled)["adapter"]
    same = load_file(adapter / "adapter_model.safetensors")
    first = load_file(stage1["adapter"] / "adapter_model.safetensors")
    assert same.keys() == first.keys() and all(torch.equal(same[k], first[k]) for k in first)
