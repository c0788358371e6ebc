"""Personal PEFT types (LoRA, IA3, prompt tuning) on tiny random Llamas: defaults, training, the loss
and decoding with virtual tokens, save and reload, and a base model left bit-identical per user."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import OPPU
from oppu import cli
from oppu.adapters import ADAPTER_WEIGHTS, PROMPT_INIT_TEXT, add_user_adapter, remove_adapter, save_adapter
from oppu.generation import generate
from oppu.runs import user_result_dir
from oppu.tasks import get_task
from oppu.training import collate, encode_prompt, tokenize_and_mask, train
from prompts import render_query_input
from utils import UserError

TYPES = ("lora", "ia3", "prompt_tuning")
TOY = [
    ("a bank robbery", " crime"),
    ("the final match", " sports"),
    ("a cheap flight", " travel"),
    ("the new senate", " politics"),
    ("a merger deal", " business"),
    ("the old temple", " religion"),
]
QUERIES = ["Short one.\nAnswer:", "A much longer prompt about the harbour, the storm and the town council.\nAnswer:"]
# The tiny model: 2 layers, hidden 32, 4 heads of 8 (2 key/value heads: k and v give 16), MLP 64.
TRAINABLE = {
    "lora": 2 * (8 * (32 + 32) + 8 * (32 + 16)),  # r=8 on q (32->32) and v (32->16)
    "ia3": 2 * (16 + 16 + 64),  # a scale per output of k and v, per input of down_proj
    "prompt_tuning": 20 * 32,  # 20 virtual tokens of width 32
}


def toy_examples(tokenizer):
    return [tokenize_and_mask(tokenizer, f"What is this about? {t}\nAnswer:", y, 256) for t, y in TOY]


def fresh(tiny_model, tokenizer, args):
    torch.manual_seed(0)  # LoRA's and random prompts' init, independent of the other tests
    return add_user_adapter(tiny_model(), tokenizer, args, cli.target_modules(args))


def fit(model, tokenizer, args, max_epoch=3):
    cfg, decode = cli.personal_configs(args, get_task("news_categorize"))
    return train(model, tokenizer, toy_examples(tokenizer), replace(cfg, batch_size=6, max_epoch=max_epoch)), decode


def test_defaults_follow_the_peft_type(make_args):
    lora, ia3, prompt = (make_args("--peft_type", t) for t in TYPES)
    assert lora.target_modules == "q_proj,v_proj"
    assert ia3.target_modules == "k_proj,v_proj,down_proj" and ia3.learning_rate == 3e-3
    assert prompt.target_modules == "" and prompt.learning_rate == 3e-2 and prompt.num_virtual_tokens == 20
    assert make_args("--peft_type", "ia3", "--learning_rate", "0.5").learning_rate == 0.5
    assert make_args("--peft_type", "ia3", "--target_modules", "v_proj").target_modules == "v_proj"
    with pytest.raises(UserError, match="target_modules"):
        make_args("--peft_type", "prompt_tuning", "--target_modules", "q_proj")


def test_prompt_tuning_shares_its_prefix_unless_told_not_to(make_args):
    task = get_task("news_categorize")
    train_cfg, decode = cli.personal_configs(make_args("--peft_type", "prompt_tuning"), task)
    assert train_cfg.shared_prefix and decode.shared_prefix and decode.use_cache and decode.batch_size == 8
    plain = make_args("--peft_type", "prompt_tuning", "--no_shared_prefix")
    train_cfg, decode = cli.personal_configs(plain, task)
    assert decode.batch_size == 1 and not (decode.shared_prefix or decode.use_cache or train_cfg.shared_prefix)
    assert cli.personal_configs(make_args(), task) == (
        cli.train_config(make_args()),
        cli.decode_config(make_args(), task),
    )


@pytest.mark.parametrize("peft_type", TYPES)
def test_each_type_adapts_only_its_own_parameters(tiny_model, tokenizer, make_args, peft_type):
    model = fresh(tiny_model, tokenizer, make_args("--peft_type", peft_type))
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(n for _, n in trainable) == TRAINABLE[peft_type]
    assert all(("lora_" in n) if peft_type == "lora" else ("ia3_" in n or "prompt_encoder" in n) for n, _ in trainable)


def test_prompt_starts_from_the_init_texts_embeddings(tiny_model, tokenizer, make_args):
    model = fresh(tiny_model, tokenizer, make_args("--peft_type", "prompt_tuning", "--num_virtual_tokens", "40"))
    ids = tokenizer(PROMPT_INIT_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) < 40  # so the text is repeated
    want = model.word_embeddings(torch.tensor((ids * 40)[:40]))
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, want)


@pytest.mark.parametrize("peft_type", TYPES)
def test_each_type_trains_saves_reloads_and_predicts_identically(tiny_model, tokenizer, make_args, tmp_path, peft_type):
    from peft import PeftModel

    args = make_args("--peft_type", peft_type, "--learning_rate", "0.05", "--lora_dropout", "0")
    model = fresh(tiny_model, tokenizer, args)
    base_logits = model(**collate(toy_examples(tokenizer)[:1], tokenizer.pad_token_id)).logits.detach()
    result, decode = fit(model, tokenizer, args)
    assert result.losses[-1] < result.losses[0], result.losses
    after_logits = model(**collate(toy_examples(tokenizer)[:1], tokenizer.pad_token_id)).logits.detach()
    assert not torch.allclose(base_logits, after_logits)  # training changed the model
    decode = replace(decode, max_new_tokens=5)
    trained_out = generate(model, tokenizer, QUERIES, decode, show=False)

    save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert {"adapter_config.json", ADAPTER_WEIGHTS} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], files
    reloaded = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "adapter"), use_safetensors=True)
    assert generate(reloaded, tokenizer, QUERIES, decode, show=False) == trained_out
    again = reloaded(**collate(toy_examples(tokenizer)[:1], tokenizer.pad_token_id)).logits
    assert torch.allclose(after_logits, again, atol=1e-6)


def test_prompt_tuning_loss_counts_only_the_real_target_tokens(tiny_model, tokenizer, make_args):
    """The training loss keeps logits from the first target position on (logits_to_keep): with
    virtual tokens prepended it must still equal peft's own loss, which pads labels for them."""
    args = make_args("--peft_type", "prompt_tuning", "--learning_rate", "1e-9")
    model = fresh(tiny_model, tokenizer, args)
    examples = toy_examples(tokenizer)
    want = model(**collate(examples, tokenizer.pad_token_id)).loss.item()
    result, _ = fit(model, tokenizer, args, max_epoch=1)
    assert result.steps == 1 and result.losses[0] == pytest.approx(want, rel=1e-5)


def test_prompt_tuning_generation_returns_exactly_the_new_tokens(tiny_model, tokenizer, make_args):
    args = make_args("--peft_type", "prompt_tuning", "--prompt_init", "random")
    model = fresh(tiny_model, tokenizer, args)
    _, decode = cli.personal_configs(args, get_task("news_categorize"))
    decode = replace(decode, max_new_tokens=6)
    for prompt in QUERIES:
        ids = encode_prompt(tokenizer, prompt)
        new = []
        with torch.no_grad():
            for _ in range(decode.max_new_tokens):  # greedy by hand, full forward each time
                token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
        assert generate(model, tokenizer, [prompt], decode, show=False) == [tokenizer.decode(new)]


def news_user(user_id: str, word: str) -> dict:
    task = get_task("news_categorize")
    items = [
        {"id": f"{user_id}-h{j}", "title": f"{word} {j}", "category": c, "text": f"The {word} story {j}."}
        for j, c in enumerate(["sports", "travel", "crime"])
    ]
    query = {"id": f"{user_id}-q0", "input": render_query_input(task, text=f"Another {word} report."), "gold": "sports"}
    return {"user_id": user_id, "profile": items, "query": [query]}


@pytest.mark.parametrize("peft_type", TYPES)
def test_base_is_bit_identical_after_every_user(tiny_model, tokenizer, make_args, tmp_path, peft_type):
    task = get_task("news_categorize")
    args = make_args(
        "--peft_type",
        peft_type,
        "--k",
        "1",
        "--max_epoch",
        "1",
        "--batch_size",
        "2",
        "--max_new_tokens",
        "3",
        "--cut_off",
        "256",
        "--learning_rate",
        "1e-2",
    )
    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    attributes = set(vars(base))
    model, saved = base, []
    for user in (news_user("u-zebra", "zebra"), news_user("u-quokka", "quokka")):
        model, result = OPPU.train_user(model, tokenizer, task, user, None, args, tmp_path / "run")
        assert model is base and set(vars(model)) == attributes and not hasattr(model, "peft_config")
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert not [n for n, _ in model.named_modules() if "lora" in n or "ia3" in n or "prompt" in n]
        weights = user_result_dir(tmp_path / "run", user["user_id"]) / "adapter" / ADAPTER_WEIGHTS
        assert result["peft_type"] == peft_type and result["trainable_params"] == TRAINABLE[peft_type]
        assert result["adapter_bytes"] == weights.stat().st_size > 0
        saved.append(weights.read_bytes())
    assert saved[0] != saved[1]  # each user got an adapter of their own


@pytest.mark.parametrize("peft_type", TYPES)
def test_a_saved_peft_answers_as_it_did_after_training_and_leaves_the_base_as_it_was(
    tiny_model, tokenizer, make_args, tmp_path, peft_type
):
    """--reuse_adapters: each type's saved PEFT, loaded onto the base, gives the answers training
    gave, keeps the training figures, and is taken out again without a trace."""
    task = get_task("news_categorize")
    args = make_args("--peft_type", peft_type, "--max_epoch", "1", "--batch_size", "2", "--max_new_tokens", "3")
    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    user = news_user("u-zebra", "zebra")
    model, trained = OPPU.train_user(base, tokenizer, task, user, None, args, tmp_path / "trained")
    model, again = OPPU.answer_with_saved(
        model, tokenizer, task, user, None, args, tmp_path / "reused", "fp", tmp_path / "trained", trained
    )
    assert again["raw_generations"] == trained["raw_generations"] and again["predictions"] == trained["predictions"]
    assert again["steps"] == trained["steps"] and again["adapter_from"] == str(tmp_path / "trained")
    assert model is base and not hasattr(model, "peft_config")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    copied = user_result_dir(tmp_path / "reused", "u-zebra") / "adapter" / ADAPTER_WEIGHTS
    assert (
        copied.read_bytes()
        == (user_result_dir(tmp_path / "trained", "u-zebra") / "adapter" / ADAPTER_WEIGHTS).read_bytes()
    )


def test_removing_a_prompt_returns_the_model_it_was_given(tiny_model, tokenizer, make_args):
    base = tiny_model()
    args = make_args("--peft_type", "prompt_tuning", "--no_shared_prefix")  # through peft's own generate
    model = add_user_adapter(base, tokenizer, args, ())
    generate(model, tokenizer, QUERIES[:1], cli.personal_configs(args, get_task("news_categorize"))[1], show=False)
    assert "prepare_inputs_for_generation" in vars(base)  # what peft's generate leaves behind
    assert remove_adapter(model) is base and "prepare_inputs_for_generation" not in vars(base)


# --- prompt tuning's virtual tokens in the shared prefix ------------------------------------------

SHARED = "Which category does this article relate to among the following categories? Just answer with the category name. article: "


def trained_prompt(tiny_model, tokenizer, make_args):
    """A prompt-tuning adapter whose virtual tokens are random (not word embeddings), so a
    path that dropped or doubled them would answer differently."""
    model = fresh(tiny_model, tokenizer, make_args("--peft_type", "prompt_tuning", "--prompt_init", "random"))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(std=1.0)
    return model


def test_a_packed_pass_under_prompt_tuning_runs_the_virtual_tokens_then_one_sequence(tiny_model, tokenizer, make_args):
    """The virtual tokens run first (no text), then one pass: the shared text and every row less
    its last token, or, with no text shared, every row less its last token. The packing rule sees
    the virtual tokens as positions every token attends to and none computes."""
    from oppu.cost import Shape, packing_pays
    from oppu.training import _summed_loss, common_prefix_length, packs

    examples = [tokenize_and_mask(tokenizer, f"{SHARED}{t}\nAnswer:", y, 256) for t, y in TOY]
    common = common_prefix_length([e.input_ids for e in examples])
    model = trained_prompt(tiny_model, tokenizer, make_args).train()
    batch = collate(examples, tokenizer.pad_token_id)
    own = [len(e.input_ids) - common for e in examples]
    shapes = []
    model.get_base_model().get_input_embeddings().register_forward_hook(
        lambda m, args, out: shapes.append(tuple(args[0].shape))
    )
    _summed_loss(model, batch, common, pack=True)
    assert shapes == [(1, 0), (1, common + sum(n - 1 for n in own))]
    shapes.clear()
    _summed_loss(model, batch, 0, pack=True)
    assert shapes == [(1, 0), (1, sum(len(e.input_ids) - 1 for e in examples))]
    virtual = model.active_peft_config.num_virtual_tokens
    shape = Shape.from_config(model.config)
    assert packs(model, batch["attention_mask"], common) == packing_pays(shape, own, common, cached=virtual)


def test_virtual_tokens_in_the_shared_prefix_give_peft_s_loss_and_gradient(tiny_model, tokenizer, make_args):
    from oppu.training import MIN_SHARED_PREFIX, _summed_loss, common_prefix_length

    examples = [tokenize_and_mask(tokenizer, f"{SHARED}{t}\nAnswer:", y, 256) for t, y in TOY]
    common = common_prefix_length([e.input_ids for e in examples])
    assert common >= MIN_SHARED_PREFIX
    model = trained_prompt(tiny_model, tokenizer, make_args).train()
    batch = collate(examples, tokenizer.pad_token_id)
    runs = {}
    # peft's own forward; the virtual tokens run once with the shared text; with no text at all;
    # the rows behind them packed into one or padded
    for prefix, pack in ((None, None), (common, True), (common, False), (0, True), (0, False)):
        model.zero_grad(set_to_none=True)
        loss, used, _ = _summed_loss(model, batch, prefix, pack=pack)
        loss.backward()
        runs[prefix, pack] = (loss.item(), used, model.prompt_encoder["default"].embedding.weight.grad.clone())
    plain_loss, plain_used, plain_grad = runs[None, None]
    assert plain_used == 0 and plain_grad.abs().sum() > 0
    for (prefix, pack), (loss, used, grad) in runs.items():
        assert used == (prefix or 0) and loss == pytest.approx(plain_loss, rel=1e-5)
        assert ((grad - plain_grad).norm() / plain_grad.norm()) <= 1e-5, (prefix, pack)


def test_prompt_tuning_decodes_in_batches_as_peft_does_one_prompt_at_a_time(tiny_model, tokenizer, make_args):
    model = trained_prompt(tiny_model, tokenizer, make_args).eval()
    task = get_task("news_categorize")
    _, peft_path = cli.personal_configs(make_args("--peft_type", "prompt_tuning", "--no_shared_prefix"), task)
    _, batched = cli.personal_configs(make_args("--peft_type", "prompt_tuning"), task)
    prompts = [f"{SHARED}{t}\nAnswer:" for t, _ in TOY] + QUERIES
    want = generate(model, tokenizer, prompts, replace(peft_path, max_new_tokens=6), show=False)
    assert len(set(want)) > 1  # the answers depend on the prompt, so the comparison means something
    # in batches behind the shared text; one prompt alone shares no text, only the virtual tokens
    assert generate(model, tokenizer, prompts, replace(batched, max_new_tokens=6), show=False) == want
    alone = [generate(model, tokenizer, [p], replace(batched, max_new_tokens=6), show=False)[0] for p in prompts]
    assert alone == want
    assert generate(model, tokenizer, [], batched, show=False) == []  # a user with no queries


def test_prompt_tuning_decodes_as_peft_does_under_a_repetition_penalty(tiny_model, tokenizer, make_args):
    """The virtual tokens' placeholder ids must not add a token a presence-based penalty sees."""
    model = trained_prompt(tiny_model, tokenizer, make_args).eval()
    task = get_task("news_categorize")
    _, peft_path = cli.personal_configs(make_args("--peft_type", "prompt_tuning", "--no_shared_prefix"), task)
    _, batched = cli.personal_configs(make_args("--peft_type", "prompt_tuning"), task)
    prompts = [f"{SHARED}{t}\nAnswer:" for t, _ in TOY]
    assert not any(0 in encode_prompt(tokenizer, p) for p in prompts)
    with torch.no_grad():  # token 0, in no prompt, becomes the likeliest next token (the head is tied)
        words = model.get_base_model().get_input_embeddings().weight
        ids = torch.tensor([encode_prompt(tokenizer, prompts[0])])
        inputs = torch.cat([model.get_prompt(batch_size=1), words[ids]], dim=1)
        last = model.get_base_model().model(inputs_embeds=inputs).last_hidden_state[0, -1]
        words[0] = 50 * last / last.norm()
    plain = generate(model, tokenizer, prompts, replace(batched, max_new_tokens=6), show=False)
    config = model.get_base_model().generation_config
    config.repetition_penalty = 100.0
    try:
        want = generate(model, tokenizer, prompts, replace(peft_path, max_new_tokens=6), show=False)
        assert want != plain  # the penalty changes the answers, so the comparison means something
        assert generate(model, tokenizer, prompts, replace(batched, max_new_tokens=6), show=False) == want
    finally:
        config.repetition_penalty = 1.0


def test_prompt_tuning_scores_answers_as_peft_s_full_forward(tiny_model, tokenizer, make_args):
    from oppu.answers import answer_log_likelihoods, answer_rows, packed_log_likelihoods, score_answers
    from oppu.training import MIN_SHARED_PREFIX, common_prefix_length, run_prefix
    from prompts import format_target

    model = trained_prompt(tiny_model, tokenizer, make_args).eval()
    prompt, answers = f"{SHARED}a bank robbery\nAnswer:", ["crime", "sports", "travel"]
    got = answer_log_likelihoods(model, tokenizer, prompt, answers)
    for text, score in zip(answers, got):
        enc = tokenize_and_mask(tokenizer, prompt, format_target(text), 256)
        with torch.no_grad():  # peft prepends the virtual tokens; the last len(ids) logits are the text's
            logp = torch.log_softmax(
                model(input_ids=torch.tensor([enc.input_ids])).logits[0, -len(enc.input_ids) :], -1
            )
        want = sum(float(logp[j - 1, enc.input_ids[j]]) for j, y in enumerate(enc.labels) if y != -100)
        assert score == pytest.approx(want, abs=1e-4)
    assert len({round(g, 3) for g in got}) == len(got)
    # several prompts: the virtual tokens and the prompts' shared text run once for the call, and
    # each prompt's likelihoods on top of them equal those of its whole prompt
    prompts = [f"{SHARED}{text}\nAnswer:" for text in ("a bank robbery", "the cup final", "a week in Lisbon")]
    rows = [answer_rows(tokenizer, p, answers) for p in prompts]
    shared = common_prefix_length([ids for ids, _ in rows])
    assert shared >= MIN_SHARED_PREFIX
    with torch.no_grad():
        base = run_prefix(model, torch.tensor([rows[0][0][:shared]]))
        assert base.virtual == 20
        packed = packed_log_likelihoods(model, base, [(ids[shared:], tails) for ids, tails in rows])
        for prompt, got in zip(prompts, packed):
            assert got == pytest.approx(answer_log_likelihoods(model, tokenizer, prompt, answers), abs=1e-4)
    assert score_answers(model, tokenizer, prompts, answers, show=False) == score_answers(
        model, tokenizer, prompts, answers, show=False, shared_prefix=False
    )
    # greedy decoding kept to the answers: the virtual tokens run once too, and the answers are
    # those of stepping through peft's own forward (which prepends them every time)
    from test_defaults import stepwise_constrained

    from oppu.answers import constrained_answers

    want = [stepwise_constrained(model, tokenizer, p, answers) for p in prompts]
    for shared_prefix in (True, False):
        assert constrained_answers(model, tokenizer, prompts, answers, show=False, shared_prefix=shared_prefix) == want
