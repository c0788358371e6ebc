"""Speed-ups that must not change results: shared-prefix training and decoding, length-grouped batches."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from oppu.adapters import USER_TARGETS, add_adapter, lora_config
from oppu.cost import Shape
from oppu.generation import DecodeConfig, generate
from oppu.training import (
    MIN_SHARED_PREFIX,
    MIN_SHARED_PREFIX_ACCELERATOR,
    TrainConfig,
    _summed_loss,
    batch_plan,
    collate,
    common_prefix_length,
    encode_prompt,
    min_shared_prefix,
    tokenize_and_mask,
    train,
)

INSTRUCTION = "Which category does this article relate to among the following categories? Just answer with the category name. article: "
ARTICLES = [
    ("a bank robbery downtown", " crime"),
    ("the final match of the cup", " sports"),
    ("a cheap flight to Lisbon and a week of sun on the beaches", " travel"),
    ("the new senate", " politics"),
    ("a quantum chip beats the record", " science & technology"),
    ("a vegan bakery", " food & drink"),
]


def shared_examples(tokenizer):
    return [tokenize_and_mask(tokenizer, INSTRUCTION + a + "\nAnswer:", t, 256) for a, t in ARTICLES]


def lora_model(tiny_model, make_args):
    """A tiny Llama with a LoRA on q and v whose B is non-zero, so the prefix's keys and values
    depend on the trainable weights (at init B = 0 and their gradient would be trivially equal)."""
    torch.manual_seed(0)
    model = add_adapter(tiny_model(), lora_config(make_args("--lora_dropout", "0"), USER_TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    return model.train()


def loss_and_grads(model, batch, prefix, pack=None):
    model.zero_grad(set_to_none=True)
    loss, used, _ = _summed_loss(model, batch, prefix, pack=pack)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), used, grads


# --- shared-prefix training --------------------------------------------------------------------


def test_common_prefix_length_leaves_every_sequence_a_token_of_its_own():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter one keeps its last token
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 2], [1, 2]]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 0  # alone: nothing to share


@pytest.mark.parametrize("pack", [True, False], ids=["packed rows", "padded rows"])
def test_shared_prefix_loss_and_gradients_equal_the_plain_forward(tiny_model, tokenizer, make_args, pack):
    examples = shared_examples(tokenizer)
    common = common_prefix_length([e.input_ids for e in examples])
    assert common >= MIN_SHARED_PREFIX
    batch = collate(examples, tokenizer.pad_token_id)
    model = lora_model(tiny_model, make_args)
    plain_loss, plain_used, plain = loss_and_grads(model, batch, 0)
    shared_loss, shared_used, shared = loss_and_grads(model, batch, common, pack)
    assert plain_used == 0 and shared_used == common
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain.keys() == shared.keys() and len(plain) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    for name in plain:
        assert plain[name].abs().sum() > 0, name  # every LoRA weight, prefix included, gets a gradient
        error = (shared[name] - plain[name]).norm() / plain[name].norm()
        assert error <= 1e-5, (name, error.item())


def test_packed_rows_compute_no_padding(tiny_model, tokenizer, make_args):
    """The examples differ in length: the padded pass computes their padding, the packed none.
    The model sees the prefix (1 row) and then the rows padded to the longest, or one pass of the
    prefix followed by every row's own tokens but its last (which predicts nothing)."""
    examples = shared_examples(tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    common = common_prefix_length([e.input_ids for e in examples])
    model = lora_model(tiny_model, make_args)
    shapes = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    own = [len(e.input_ids) - common for e in examples]
    pads = int((batch["attention_mask"] == 0).sum())
    assert pads > 0
    assert _summed_loss(model, batch, common, pack=False)[2] == pads
    assert shapes == [(1, common), (len(examples), max(own))]
    shapes.clear()
    assert _summed_loss(model, batch, common, pack=True)[2] == 0
    assert shapes == [(1, common + sum(n - 1 for n in own))]
    assert _summed_loss(model, batch, None)[2] == pads  # the plain forward pads


def test_a_packed_pass_refuses_a_target_inside_the_prefix(tiny_model, tokenizer, make_args):
    from oppu.training import packed_shared_loss

    examples = shared_examples(tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    first = min(e.labels.index(next(x for x in e.labels if x != -100)) for e in examples)
    model = lora_model(tiny_model, make_args)
    packed_shared_loss(model, batch, first - 1)  # the prefix ends just before the first target
    with pytest.raises(ValueError, match="shared prefix must end before it"):
        packed_shared_loss(model, batch, first)


def test_packing_is_decided_on_cpu_for_models_whose_shape_is_known(tiny_model, tokenizer, make_args):
    """The padded pass on an accelerator and for a config the cost model cannot read; a prompt's
    virtual tokens count among the positions every row sees."""
    from types import SimpleNamespace

    from oppu.cost import packing_pays
    from oppu.training import packs

    examples = [shared_examples(tokenizer)[i] for i in (0, 2, 3)]  # rows of 15, 24 and 15 tokens
    batch = collate(examples, tokenizer.pad_token_id)
    common = common_prefix_length([e.input_ids for e in examples])
    model = lora_model(tiny_model, make_args)
    rows = [len(e.input_ids) - common for e in examples]
    assert packs(model, batch["attention_mask"], common) == packing_pays(Shape.from_config(model.config), rows, common)
    assert packs(model, batch["attention_mask"], common)  # these rows pack on the tiny model's shape
    assert not packs(model, batch["attention_mask"].to("meta"), common)
    gpt2_like = SimpleNamespace(config=SimpleNamespace(hidden_size=32, n_layer=2), active_peft_config=None)
    assert not packs(gpt2_like, batch["attention_mask"], common)


def test_packing_pays_where_padding_costs_more_than_the_longer_attention():
    """SmolLM2-135M's shape: a HuffPost batch (90 shared tokens, rows of 19 to 38 of their own)
    packs; rows of one length have no padding to save, rows of nearly one length too little;
    many long rows would attend over thousands of packed positions and stay padded."""
    from oppu.cost import packing_pays

    shape = Shape(hidden=576, layers=30, intermediate=1536, kv=192, vocab=49152, parameters=1.35e8)
    assert packing_pays(shape, [25, 29, 25, 19, 21, 38, 29, 31], held=90)
    assert not packing_pays(shape, [30] * 8, held=90)
    assert not packing_pays(shape, [47, 47, 47, 46, 44, 43, 41, 40], held=92)  # 4 % more FLOPs packed
    assert not packing_pays(shape, [700, 800] * 8, held=90)


def test_a_short_shared_prefix_falls_back_to_the_plain_forward(tiny_model, tokenizer, make_args):
    batch = collate(shared_examples(tokenizer), tokenizer.pad_token_id)
    _, used, _ = loss_and_grads(lora_model(tiny_model, make_args), batch, MIN_SHARED_PREFIX - 1)
    assert used == 0


def test_on_an_accelerator_only_a_long_prefix_is_shared():
    assert min_shared_prefix(torch.device("cpu")) == MIN_SHARED_PREFIX
    assert min_shared_prefix(torch.device("cuda")) == MIN_SHARED_PREFIX_ACCELERATOR > MIN_SHARED_PREFIX


def test_the_fewest_shared_tokens_can_be_set(tiny_model, tokenizer, make_args):
    """TrainConfig.min_shared_prefix overrides the device's threshold (gpu_bench forces sharing with it)."""
    batch = collate(shared_examples(tokenizer), tokenizer.pad_token_id)
    model = lora_model(tiny_model, make_args)
    common = common_prefix_length([row[row != tokenizer.pad_token_id].tolist() for row in batch["input_ids"]])
    assert _summed_loss(model, batch, common, min_prefix=common + 1)[1] == 0
    assert _summed_loss(model, batch, common, min_prefix=common)[1] > 0


def test_training_with_and_without_the_shared_prefix_takes_the_same_steps(tiny_model, tokenizer, make_args):
    examples = shared_examples(tokenizer)
    runs = []
    for shared in (False, True):
        model = lora_model(tiny_model, make_args)
        cfg = TrainConfig(learning_rate=1e-2, batch_size=6, micro_batch_size=3, max_epoch=2, shared_prefix=shared)
        fit = train(model, tokenizer, examples, cfg)
        runs.append((fit, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_w), (shared, shared_w) = runs
    assert plain.shared_prefix_tokens == 0 and shared.shared_prefix_tokens > 0
    assert shared.losses == pytest.approx(plain.losses, rel=1e-5)
    assert all(torch.allclose(shared_w[n], plain_w[n], atol=1e-6) for n in plain_w)


def test_all_logits_projects_every_position_and_leaves_the_loss_as_it_is(tiny_model, tokenizer, make_args):
    """The paper release's loss (--all_logits): the vocabulary projection at every position of the
    batch, where the default starts at the first target; the same loss and gradients, and no
    shared prefix."""
    examples = shared_examples(tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    model = lora_model(tiny_model, make_args)
    rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[:-1].numel()))
    try:
        results = []
        for every in (False, True):
            model.zero_grad(set_to_none=True)
            loss, used, _ = _summed_loss(model, batch, None, all_logits=every)
            loss.backward()
            results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        assert (
            _summed_loss(model, batch, common_prefix_length([e.input_ids for e in examples]), all_logits=True)[1] == 0
        )
    finally:
        hook.remove()
    first_target = min(e.labels.index(next(x for x in e.labels if x != -100)) for e in examples)
    width = batch["input_ids"].size(1)
    assert rows[:2] == [len(examples) * (width - first_target + 1), len(examples) * width]
    (loss, grads), (every_loss, every_grads) = results
    assert every_loss == pytest.approx(loss, rel=1e-5)
    for name in grads:
        assert (every_grads[name] - grads[name]).norm() <= 1e-5 * grads[name].norm(), name
    # train() passes it on: one pass of the 6 examples, every position projected, no prefix shared
    cfg = TrainConfig(learning_rate=1e-2, batch_size=6, micro_batch_size=6, max_epoch=1, all_logits=True)
    model = lora_model(tiny_model, make_args)
    rows.clear()
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[:-1].numel()))
    try:
        fit = train(model, tokenizer, examples, cfg)
    finally:
        hook.remove()
    assert fit.shared_prefix_tokens == 0 and rows == [len(examples) * width]
    from oppu.cli import train_config

    assert train_config(make_args("--all_logits")).all_logits and not train_config(make_args()).all_logits


@pytest.mark.parametrize("dropout", ["0", "0.05"])
def test_reentrant_checkpointing_trains_as_the_other_paths(tiny_model, tokenizer, make_args, monkeypatch, dropout):
    """--reentrant_checkpointing (the paper release's checkpoint): torch's reentrant checkpoint runs,
    and the losses and weights are those of training without checkpointing (dropout's masks too:
    the checkpoint replays the random state)."""
    import transformers.modeling_utils as modeling_utils

    calls = []
    original = modeling_utils.checkpoint  # what transformers' layers are checkpointed with

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", spy)
    examples = shared_examples(tokenizer)
    runs = {}
    for way, flags in {"none": {}, "plain": {"gradient_checkpointing": True}, "reentrant": {"gradient_checkpointing": True, "reentrant_checkpointing": True}}.items():  # fmt: skip
        calls.clear()
        torch.manual_seed(0)
        model = add_adapter(tiny_model(), lora_config(make_args("--lora_dropout", dropout), USER_TARGETS))
        cfg = TrainConfig(learning_rate=1e-2, batch_size=3, micro_batch_size=3, max_epoch=1, shared_prefix=False)
        torch.manual_seed(1)
        fit = train(model, tokenizer, examples, replace(cfg, **flags))
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[way] = (fit.losses, weights, set(calls))
        assert not model.base_model.model.is_activation_checkpointing  # off again after training
    assert runs["none"][2] == set() and runs["plain"][2] == {False} and runs["reentrant"][2] == {True}
    for way in ("plain", "reentrant"):
        assert runs[way][0] == pytest.approx(runs["none"][0], rel=1e-5), way
        for name, w in runs["none"][1].items():
            assert torch.allclose(runs[way][1][name], w, atol=1e-6), (way, name)
    assert make_args("--gradient_checkpointing", "--reentrant_checkpointing").reentrant_checkpointing


def test_the_flop_plan_shares_the_prefix_training_shares(tiny_model, tokenizer, make_args):
    """oppu.cost's plan of a training run (benchmarks: the floors) against train() itself: the
    same steps, and the same prefix tokens run once (TrainResult counts them per micro-batch)."""
    from oppu.cost import chunk_shared_prefix, packing_pays, plan_train_flops

    examples = shared_examples(tokenizer) + [tokenize_and_mask(tokenizer, "a short one", " crime", 256)]
    for micro in (3, 2):
        cfg = TrainConfig(learning_rate=1e-2, batch_size=4, micro_batch_size=micro, max_epoch=2, seed=5)
        fit = train(lora_model(tiny_model, make_args), tokenizer, examples, cfg)
        plan = batch_plan(len(examples), cfg, [len(e.input_ids) for e in examples])
        chunks = [[examples[i] for i in step[j : j + micro]] for step in plan for j in range(0, len(step), micro)]
        shared = sum(chunk_shared_prefix(c, MIN_SHARED_PREFIX) * (len(c) - 1) for c in chunks)
        assert shared == fit.shared_prefix_tokens > 0
        # and the same passes packed: training computes the padding of the others only
        shape = Shape.from_config(tiny_model().config)
        padded = every = 0
        for c in chunks:
            prefix, lengths = chunk_shared_prefix(c, MIN_SHARED_PREFIX), [len(e.input_ids) for e in c]
            every += len(c) * max(lengths) - sum(lengths)
            if not prefix or not packing_pays(shape, [n - prefix for n in lengths], prefix):
                padded += len(c) * max(lengths) - sum(lengths)
        assert padded == fit.padded_tokens < every  # some passes ran packed
        assert plan_train_flops(Shape.from_config(tiny_model().config), examples, cfg)[1] == fit.steps == len(plan)


# --- length-grouped batches --------------------------------------------------------------------


@pytest.mark.parametrize("n, batch_size", [(37, 4), (8, 8), (500, 3)])
def test_length_grouping_uses_every_example_once_per_epoch(n, batch_size):
    lengths = [(i * 7919) % 97 + 5 for i in range(n)]
    cfg = TrainConfig(batch_size=batch_size, max_epoch=3, seed=3)
    plan = batch_plan(n, cfg, lengths)
    per_epoch = math.ceil(n / batch_size)
    assert len(plan) == 3 * per_epoch
    for epoch in range(3):
        seen = [i for step in plan[epoch * per_epoch : (epoch + 1) * per_epoch] for i in step]
        assert sorted(seen) == list(range(n))
    assert batch_plan(n, cfg, lengths) == plan  # seeded
    assert batch_plan(n, TrainConfig(batch_size=batch_size, max_epoch=3, seed=4), lengths) != plan or n <= batch_size


def test_length_grouping_removes_most_padding_and_can_be_turned_off():
    n, batch_size = 200, 8
    lengths = [(i * 7919) % 97 + 20 for i in range(n)]

    def padding(plan):
        pads = sum(max(lengths[i] for i in s) * len(s) - sum(lengths[i] for i in s) for s in plan)
        return pads / (pads + sum(lengths[i] for s in plan for i in s))

    grouped = batch_plan(n, TrainConfig(batch_size=batch_size, max_epoch=2), lengths)
    plain_cfg = TrainConfig(batch_size=batch_size, max_epoch=2, group_by_length=False)
    plain = batch_plan(n, plain_cfg, lengths)
    assert plain == batch_plan(n, plain_cfg)  # the paper's shuffle, lengths ignored
    assert padding(grouped) <= 0.05 < padding(plain)
    assert grouped[: n // batch_size] != grouped[n // batch_size :]  # epochs differ


def test_length_grouping_does_not_favour_the_shortest_examples_or_fix_the_batches():
    """A history smaller than a mega-batch (the demo's 12 items at batch 8): the partial batch
    is random examples, not always the 4 shortest (each weighs twice in a step's token mean),
    and which examples share a batch changes between epochs."""
    lengths = [100 + 3 * i for i in range(12)]  # item i is the i-th shortest
    plan = batch_plan(12, TrainConfig(batch_size=8, max_epoch=24, seed=7), lengths)
    partial = [tuple(sorted(step)) for step in plan if len(step) == 4]
    assert len(partial) == 24 and len(set(partial)) > 10  # not the same 4 examples every epoch
    weight = [sum(1 / len(step) for step in plan if i in step) for i in range(12)]
    assert max(weight) / min(weight) < 1.5  # about even: (1/8 + 1/4 x 1/3 ...) per epoch for each
    full = [tuple(sorted(step)) for step in plan if len(step) == 8]
    assert len(set(full)) > 10
    lengths = [100 + (i * 37) % 41 for i in range(40)]  # 5 full batches an epoch
    plan = batch_plan(40, TrainConfig(batch_size=8, max_epoch=2, seed=3), lengths)
    assert {tuple(sorted(b)) for b in plan[:5]} != {tuple(sorted(b)) for b in plan[5:]}


# --- shared-prefix decoding --------------------------------------------------------------------


def test_shared_prefix_decoding_gives_the_same_greedy_answers(tiny_model, tokenizer, make_args):
    model = lora_model(tiny_model, make_args).eval()
    prompts = [INSTRUCTION + a + "\nAnswer:" for a, _ in ARTICLES]
    assert common_prefix_length([encode_prompt(tokenizer, p) for p in prompts]) >= MIN_SHARED_PREFIX
    for batch_size in (1, 4):
        cfg = DecodeConfig(max_new_tokens=6, batch_size=batch_size)
        plain_cfg = DecodeConfig(max_new_tokens=6, batch_size=batch_size, shared_prefix=False)
        plain = generate(model, tokenizer, prompts, plain_cfg, show=False)
        assert generate(model, tokenizer, prompts, cfg, show=False) == plain
    assert len(set(plain)) > 1  # the answers depend on the article, so the comparison means something


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_scoring_with_a_shared_prefix_gives_the_same_likelihoods_and_answers(
    tiny_model, tokenizer, make_args, attention
):
    """--answer_mode score packs several prompts and all their answers into one forward pass
    behind the prompts' common first tokens, run once per call: every answer's log-likelihood
    equals the one from running its whole prompt and answer, and so does the choice, however
    the prompts are split into passes."""
    from oppu.answers import answer_log_likelihoods, answer_rows, packed_log_likelihoods, score_answers
    from oppu.training import run_prefix
    from prompts import format_target

    base_model = tiny_model(0)
    base_model.set_attn_implementation(attention)  # eager adds the mask to the scores, sdpa reads it
    model = lora_model(lambda *_: base_model, make_args).eval()
    prompts = [INSTRUCTION + a + "\nAnswer:" for a, _ in ARTICLES]
    labels = [t.strip() for _, t in ARTICLES]
    assert score_answers(model, tokenizer, [], labels, show=False) == []  # a user with no queries
    rows = [answer_rows(tokenizer, p, labels) for p in prompts]
    shared = common_prefix_length([ids for ids, _ in rows])
    assert shared >= MIN_SHARED_PREFIX
    with torch.no_grad():
        base = run_prefix(model, torch.tensor([rows[0][0][:shared]]))
        packed = packed_log_likelihoods(model, base, [(ids[shared:], tails) for ids, tails in rows])
        assert base.kv[0][0].size(-2) == shared  # the shared keys and values were not extended in place
        for prompt, got in zip(prompts, packed):
            want = []
            for label in labels:  # the whole prompt and answer, one plain forward each
                enc = tokenize_and_mask(tokenizer, prompt, format_target(label), 4096)
                logp = torch.log_softmax(model(input_ids=torch.tensor([enc.input_ids])).logits[0].float(), -1)
                want.append(sum(float(logp[j - 1, enc.input_ids[j]]) for j, y in enumerate(enc.labels) if y != -100))
            assert got == pytest.approx(want, abs=1e-4)
            assert answer_log_likelihoods(model, tokenizer, prompt, labels) == pytest.approx(want, abs=1e-4)
    chosen = score_answers(model, tokenizer, prompts, labels, show=False)
    assert chosen == score_answers(model, tokenizer, prompts, labels, show=False, shared_prefix=False)
    assert chosen == score_answers(model, tokenizer, prompts, labels, show=False, max_tokens=1)  # a pass per prompt
    for got, label in zip(packed, chosen):
        assert label == labels[max(range(len(labels)), key=lambda i: (got[i], -i))]
    assert len(set(chosen)) > 1  # the choice depends on the article, so the comparison means something


def test_packed_answers_see_their_prompt_and_their_own_tokens_only():
    """The packed sequence's mask: a prompt's tokens see the cache and their own prompt causally;
    an answer's tokens see the cache, their prompt and their own earlier tokens, never another
    answer or another prompt; positions continue each prompt; each answer's last token is left out."""
    from oppu.training import packed_rows

    ids, positions, mask, where = packed_rows([([1, 2], [[7, 0], [8, 9, 0]]), ([3], [[7, 0]])], held=2)
    assert ids == [1, 2, 7, 8, 9, 3, 7]
    assert positions == [2, 3, 4, 4, 5, 2, 3]
    assert where == [[[1, 2], [1, 3, 4]], [[5, 6]]]
    assert mask.shape == (7, 9) and mask[:, :2].all()
    rows = [[int(x) for x in r] for r in mask[:, 2:]]
    assert rows == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 1],
    ]


# --- the bench's padding figure ----------------------------------------------------------------


def test_the_lm_head_gets_one_contiguous_matrix_of_the_kept_positions(tiny_model):
    """transformers slices the hidden states for ``logits_to_keep``; the folded head multiplies a
    contiguous copy (one product, not one per row) and its logits are those of the plain head."""
    from oppu.modeling import fold_lm_head

    model = tiny_model()
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(5, 500, (3, 12))
    with torch.no_grad():
        folded = model(input_ids=ids, logits_to_keep=4).logits
        full = model(input_ids=ids).logits[:, -4:]
    assert seen == [True, True]
    torch.testing.assert_close(folded, full, rtol=1e-5, atol=1e-5)
    fold_lm_head(model)  # a second call adds no second hook
    assert len(model.lm_head._forward_pre_hooks) == 1


@pytest.mark.parametrize("pack", [False, True], ids=["padded rows", "packed rows"])
def test_grouped_key_value_heads_give_the_stock_attentions_loss_gradients_and_answers(tiny_model, tokenizer, pack):
    """sdpa_grouped (the tiny model's 2 key/value heads for 4 query heads, on CPU) against
    transformers' sdpa, which copies the key/value heads: a batch behind a shared prefix (its rows
    padded, or packed into one under a 4D mask), its loss and LoRA gradients, and greedy answers
    from left-padded prompts."""
    from oppu.modeling import GROUPED_SDPA

    def run(model):
        torch.manual_seed(0)  # the LoRA's random initial weights
        peft = add_adapter(model, lora_config_for_test())
        peft.train()
        examples = shared_examples(tokenizer)
        batch = collate(examples, tokenizer.pad_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            loss, _, _ = _summed_loss(peft, batch, common_prefix_length([e.input_ids for e in examples]), pack=pack)
        loss.backward()
        grads = [p.grad.clone() for p in peft.parameters() if p.requires_grad]
        peft.eval()
        prompts = [INSTRUCTION + a + "\nAnswer:" for a, _ in ARTICLES]
        return loss.detach(), grads, generate(peft, tokenizer, prompts, DecodeConfig(max_new_tokens=6))

    grouped, stock = tiny_model(), tiny_model()
    stock.set_attn_implementation("sdpa")
    assert grouped.config._attn_implementation == GROUPED_SDPA
    loss, grads, answers = run(grouped)
    loss_ref, grads_ref, answers_ref = run(stock)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for g, ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    assert answers == answers_ref


def lora_config_for_test():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def test_the_bench_counts_the_lm_head_where_the_loss_is():
    """train_mfu's FLOPs: an example of 3 prompt tokens and 2 target tokens has the LM head at the
    2 positions that predict them (the last token predicts nothing)."""
    from benchmarks.bench import example_flops
    from oppu.cost import train_flops
    from oppu.training import IGNORE_INDEX, Encoded

    example = Encoded([5, 6, 7, 8, 9], [IGNORE_INDEX] * 3 + [8, 9], False)
    shape = Shape(hidden=4, layers=1, intermediate=8, kv=2, vocab=10, parameters=0)
    assert example_flops(shape, [example]) == train_flops(shape, 5, 2) != train_flops(shape, 5, 3)


def test_planned_padding_on_a_hand_made_case():
    from benchmarks.bench import planned_padding

    settings = {"batch_size": 2, "micro_batch_size": 2, "group_by_length": True}
    # one user, two examples of 3 and 5 tokens in one batch each epoch: 2 pads per 8 tokens
    assert planned_padding([[3, 5]], settings, epochs=2) == pytest.approx(2 / 10)
    # micro-batches of one pad nothing
    assert planned_padding([[3, 5]], settings | {"micro_batch_size": 1}) == 0.0


def test_the_release_configuration_groups_by_length_and_projects_every_position(make_args):
    """benchmarks/release_config.py: the bench's paper configuration as the issue described it, and
    the release's own settings (transformers' group_by_length, its loss over every position)."""
    from benchmarks.release_config import CONFIGURATIONS
    from oppu.cli import train_config

    cfg = {name: train_config(make_args(*flags)) for name, flags in CONFIGURATIONS.items()}
    for name in ("paper", "paper_all_logits", "release"):
        assert cfg[name].gradient_checkpointing and not cfg[name].shared_prefix, name
    assert not cfg["paper"].group_by_length and not cfg["paper"].all_logits
    assert not cfg["paper_all_logits"].group_by_length and cfg["paper_all_logits"].all_logits
    assert cfg["release"].group_by_length and cfg["release"].all_logits and cfg["release"].reentrant_checkpointing
    assert not cfg["paper"].reentrant_checkpointing and not cfg["ours"].gradient_checkpointing
    from benchmarks import release_config
    from utils import UserError

    for bad in ("paper", "paper,bogus,ours"):  # no base for the ratios, or a name it does not know
        with pytest.raises(UserError, match="--configurations"):
            release_config.main(["--configurations", bad])
    assert cfg["ours"].shared_prefix and cfg["ours"].group_by_length and not cfg["ours"].all_logits
    # the paper's batch, at ours' learning rate: the rate changes what is learnt (how long the
    # sampled answers run), not what a step costs
    assert {c.learning_rate for c in cfg.values()} == {1e-3}
    assert {cfg[name].batch_size for name in ("paper", "paper_all_logits", "release")} == {16}


def test_gpu_bench_runs_on_a_tiny_shape_on_cpu(tmp_path):
    """benchmarks/gpu_bench.py, prepared on CPU for a lent GPU: every figure, and both training
    paths take the same losses (the shared prefix changes the speed only)."""
    from benchmarks import gpu_bench

    out = tmp_path / "gpu.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--matmul_n", "128", "--examples", "8"]
    argv += ["--length", "24", "--prefix", "16", "--batch_size", "4", "--micro_batch_size", "4", "--users", "3"]
    argv += ["--profile", str(tmp_path / "prof")]
    r = gpu_bench.main(argv + ["--prompt_length", "8", "--new_tokens", "3", "--output", str(out)])
    assert json.loads(out.read_text())["shape"] == "tiny"
    for key in ("matmul_tflops", "train_mfu", "prefix_speedup", "mixed_vs_single_adapter", "mixed_vs_sequential"):
        assert r[key] > 0, key
    plain, shared, forced, paper = (r["train"][k] for k in ("plain", "shared_prefix", "shared_prefix_forced", "paper"))
    assert plain["steps"] == shared["steps"] == forced["steps"] == paper["steps"] == 2
    assert shared["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert forced["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert r["prefix_speedup_forced"] > 0
    assert set(r["profile"]["step_ms"]) == {"plain", "shared_prefix_forced"}
    assert "aten::" in (tmp_path / "prof" / "train_shared_prefix_forced.txt").read_text()
    assert paper["losses"] == pytest.approx(plain["losses"], rel=1e-5)  # recomputation, same sums
    assert r["train_speedup_vs_paper"] > 0
    assert set(r["decode"]["new_tokens_per_s"]) == {"mixed", "peft_adapter_names", "single_adapter", "sequential"}


def test_the_lean_mlp_keeps_less_and_changes_nothing(tiny_model, tokenizer, make_args):
    """oppu.modeling.lean_mlp: the same loss and LoRA gradients, bit for bit, as transformers' own
    MLP forward, with one tensor of the MLP's width per token and layer less kept for backward."""
    batch = collate(shared_examples(tokenizer), tokenizer.pad_token_id)
    model = lora_model(tiny_model, make_args)

    def run():
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size() if t.requires_grad or t.grad_fn is not None else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _, grads = loss_and_grads(model, batch, None)
        return loss, grads, sum(kept)

    lean_loss, lean_grads, lean_kept = run()
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    assert mlps and all(m._oppu_silu_mul is not None for m in mlps)
    for m in mlps:  # back to transformers' forward
        del m.forward
    loss, grads, kept = run()
    assert lean_loss == loss
    assert grads.keys() == lean_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], lean_grads[name]), name
    config = model.get_base_model().config
    rows, width = batch["input_ids"].shape
    assert kept - lean_kept == config.num_hidden_layers * rows * width * config.intermediate_size * 4


# --- decoding's small products split over the threads ------------------------------------------


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def bmm_spy(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = torch.bmm

    def spy(a, b):
        calls.append(tuple(b.shape))
        return real(a, b)

    monkeypatch.setattr(torch, "bmm", spy)
    return calls


def test_split_parts_are_two_per_thread_and_divide_the_weight():
    from oppu.modeling import split_parts

    assert split_parts(576, 2) == 4
    assert split_parts(192, 2) == 4
    assert split_parts(49152, 2) == 16  # the vocabulary projection: parts of 3,072 rows
    assert split_parts(576, 8) == 16
    assert split_parts(100, 8) == 10  # the most parts under 16 that divide 100
    assert split_parts(151936, 2) == 32  # Qwen's vocabulary: 49 parts do not divide it, 32 do
    assert split_parts(97, 2) == 1  # a prime: not split
    assert split_parts(64, 0) == 1


def test_a_small_product_without_gradients_is_split_and_equals_the_plain_one(monkeypatch, two_threads):
    from oppu.modeling import SMALL_PRODUCT_ROWS, split_small_products

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    split_small_products(layer)
    calls = bmm_spy(monkeypatch)
    for shape in ((64,), (1, 64), (2, 64), (3, 1, 64), (2, SMALL_PRODUCT_ROWS // 2, 64)):
        x = torch.randn(shape)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (*shape[:-1], 96)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
    # 4 parts of 24 output rows each time: one or two rows by the weight's parts (weight first),
    # more rows by the parts' transposes
    assert calls == [(4, 64, 1), (4, 64, 1), (4, 64, 2), (4, 64, 24), (4, 64, 24)]
    # more rows, gradients, one thread: nn.Linear's own product, bit for bit
    x = torch.randn(SMALL_PRODUCT_ROWS + 1, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    x = torch.randn(2, 64)
    y = layer(x)
    assert y.requires_grad and torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    torch.set_num_threads(1)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    torch.set_num_threads(2)
    layer.to("meta")  # moved off the CPU after it was prepared (a GPU's stand-in)
    with torch.no_grad():
        assert layer(x.to("meta")).shape == (2, 96)
    assert len(calls) == 5


def test_split_products_go_on_plain_linears_once(tiny_model):
    from oppu.modeling import split_small_products

    class Mine(torch.nn.Linear):
        pass

    model = tiny_model()  # prepare_model splits its products
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert linears and all("forward" in vars(m) for m in linears)
    before = [vars(m)["forward"] for m in linears]
    split_small_products(model)  # idempotent: the same bound methods, not new ones
    assert all(vars(m)["forward"] is b for m, b in zip(linears, before))
    other = torch.nn.Sequential(Mine(64, 64), torch.nn.Linear(64, 8))  # a subclass; a rank-sized factor
    split_small_products(other)
    assert not any("forward" in vars(m) for m in other)


def test_split_products_give_the_same_greedy_answers(tiny_model, tokenizer, make_args, monkeypatch, two_threads):
    """Decoding with the step's products split (the default) and with nn.Linear's own products,
    through a LoRA, left-padded prompts behind a shared prefix: the same answers."""
    import oppu.modeling

    model = lora_model(tiny_model, make_args)
    model.eval()
    prompts = [f"Which category is this article: {t}?" for t in ("a cat", "the stock market fell", "rain", "chess")]
    cfg = DecodeConfig(max_new_tokens=6, batch_size=3)
    calls = bmm_spy(monkeypatch)
    split = generate(model, tokenizer, prompts, cfg, show=False)
    assert (4, 32, 16) in calls  # the steps' products really were split: gate and up (64 x 32) in 4 parts
    assert (16, 32, 3) in calls  # the tied head's, weight first for a batch of 3 rows
    assert (16, 32, 1) in calls  # and for the fourth prompt alone
    monkeypatch.setattr(oppu.modeling, "SMALL_PRODUCT_ROWS", 0)
    calls.clear()
    plain = generate(model, tokenizer, prompts, cfg, show=False)
    assert not calls
    assert split == plain


def test_split_products_on_the_edges(monkeypatch, two_threads):
    """No bias, a weight that does not divide, a non-contiguous weight, inference mode, a wrong
    input width: each either split and equal to nn.Linear's product, or nn.Linear's own."""
    from oppu.modeling import split_small_products

    torch.manual_seed(0)
    plain = torch.nn.functional.linear
    no_bias, prime = torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(64, 97)
    odd = torch.nn.Linear(64, 96)
    odd.weight = torch.nn.Parameter(torch.randn(64, 96).t())  # a transposed view: not contiguous
    for layer in (no_bias, prime, odd):
        split_small_products(layer)
    calls = bmm_spy(monkeypatch)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(no_bias(x), plain(x, no_bias.weight), rtol=1e-5, atol=1e-6)
        assert calls == [(4, 64, 24)]
        assert torch.equal(prime(x), plain(x, prime.weight, prime.bias))
        assert torch.equal(odd(x), plain(x, odd.weight, odd.bias))
        assert len(calls) == 1
        with pytest.raises(RuntimeError):  # as nn.Linear: the input's width must be in_features
            no_bias(torch.randn(2, 32))


def test_bf16_weights_keep_the_plain_product(monkeypatch, two_threads):
    """Splitting was measured faster for fp32 weights only: bf16 ones keep nn.Linear's product."""
    from oppu.modeling import split_small_products

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96).to(torch.bfloat16)
    split_small_products(layer)
    calls = bmm_spy(monkeypatch)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert calls == []


def test_split_products_keep_autocasts_dtype(monkeypatch, two_threads):
    from oppu.modeling import split_small_products

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    split_small_products(layer)
    calls = bmm_spy(monkeypatch)
    x = torch.randn(2, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert calls and y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)


def test_the_vocabulary_projection_goes_weight_first_up_to_more_rows(tiny_model, monkeypatch, two_threads):
    """The output embeddings, and not another weight as wide, go weight first up to 8 rows."""
    from oppu.modeling import VOCABULARY_WEIGHT_FIRST_ROWS, WEIGHT_FIRST_ROWS, split_small_products

    assert (WEIGHT_FIRST_ROWS, VOCABULARY_WEIGHT_FIRST_ROWS) == (2, 8)
    head = tiny_model().lm_head  # 49,152 x 32, tied to the embeddings; prepare_model split it
    wide = torch.nn.Linear(32, head.out_features, bias=False)  # as wide, not the vocabulary's
    split_small_products(wide)
    calls = bmm_spy(monkeypatch)
    for layer in (head, wide):
        for rows in (3, 8, 9):
            x = torch.randn(rows, 32)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    parts = 16  # 49,152 // 3,072
    weight_first, transposed = [(parts, 32, 3), (parts, 32, 8)], [(parts, 32, 3072)]
    assert calls == weight_first + transposed + transposed * 3


# --- the bench's floors and ceilings -----------------------------------------------------------


def test_answer_floor_counts_each_prompt_token_once_and_every_new_token(tokenizer, tiny_model):
    from benchmarks.bench import answer_floor_gflop, forward_flops, new_tokens
    from oppu.training import encode_prompt

    config = tiny_model().config
    prompts = [
        "Which category is this? categories: [a, b, c] article: one",
        "Which category is this? categories: [a, b, c] article: two two",
    ]
    outputs = ["sports", "food & drink"]
    lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]
    shared = next(i for i, (x, y) in enumerate(zip(*(encode_prompt(tokenizer, p) for p in prompts))) if x != y)
    new = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) + 1 for o in outputs]  # each with its EOS
    assert new_tokens(tokenizer, outputs, 8) == sum(new)
    assert new_tokens(tokenizer, outputs, 2) == 4  # an answer that ran into the cap has no EOS
    flops = answer_floor_gflop(config, tokenizer, prompts, outputs, 8)
    assert flops == forward_flops(config, sum(lengths) - shared + sum(new) - 2, sum(new)) / 1e9
    alone = answer_floor_gflop(config, tokenizer, prompts, outputs, 8, shared_prefix=False)
    assert alone == forward_flops(config, sum(lengths) + sum(new) - 2, sum(new)) / 1e9 > flops


def test_ceilings_of_serving_and_end_to_end_against_the_runs_best_limit():
    from benchmarks.bench import apply_limit, headline

    r = {
        "matmul_samples": [50.0, 100.0],
        "serve": {
            "queries_per_s": {"mixed": 4.0, "single": 4.0, "sequential": 2.0},
            "seconds": {"mixed": [2.0, 2.5], "single": [2.0], "sequential": [4.5, 4.0], "prompt_pass": [1.5]},
            "floor_gflop": 100.0,
        },
        "e2e": {
            "ours": {"seconds_per_user": 5.0, "peak_rss_gb": 1.0, "peft_mb": 1.8, "floor_gflop": 200.0},
            "paper": {"seconds_per_user": 16.0},
        },
    }
    apply_limit(r)
    assert (
        r["matmul_gflops"] == 100.0 and r["serve"]["floor_seconds"] == 1.0 and r["e2e"]["ours"]["floor_seconds"] == 2.0
    )
    out = headline(r)
    assert out["mixed_vs_sequential"] == 2.0
    assert out["mixed_vs_sequential_ceiling"] == 4.0  # user after user's best 4.0 s over the 1.0 s floor
    assert out["e2e_speedup_vs_paper"] == 3.2 and out["e2e_ceiling_vs_paper"] == 8.0


def test_e2e_floor_reads_a_finished_run(tmp_path, tokenizer, tiny_model, make_args):
    """The floor of an OPPU.py run from its folder: the user's training as its settings plan it,
    and the answers it wrote; here one finished user of 3 items in one batch per epoch, so each of
    the 2 epochs is one pass over all 3 examples (a second user without a result is left out)."""
    import prepare_data
    from benchmarks.bench import answer_floor_gflop, e2e_floor_gflop
    from oppu.cost import Shape, chunk_train_flops
    from oppu.data import TEST_USERS_FILE
    from oppu.examples import history_pairs, query_prompts
    from oppu.runs import user_result_dir
    from oppu.tasks import get_task
    from oppu.training import encode_pairs
    from utils import write_json

    data = tmp_path / "data"
    prepare_data.main(["demo", "--tasks", "news_categorize", "--output_dir", str(data)])
    task = get_task("news_categorize")
    users_file = data / task.name / TEST_USERS_FILE
    user, unfinished = json.loads(users_file.read_text())[:2]
    user["profile"], user["query"] = user["profile"][:3], user["query"][:2]
    write_json(users_file, [user, unfinished])  # the second has no result: not in the floor
    args = make_args("--data_dir", str(data), "--batch_size", "8", "--micro_batch_size", "8", "--max_epoch", "2")
    args.min_steps = 0
    run_dir = tmp_path / "run"
    write_json(run_dir / "run_config.json", vars(args) | {"task_name": task.name, "stage": "OPPU"})
    answers = {user["query"][0]["id"]: "sports", user["query"][1]["id"]: "women"}
    write_json(user_result_dir(run_dir, user["user_id"]) / "result.json", {"raw_generations": answers})

    config = tiny_model().config
    encoded = encode_pairs(tokenizer, history_pairs(task, user), args.cut_off)
    train = 2 * chunk_train_flops(Shape.from_config(config), encoded) / 1e9
    answer = answer_floor_gflop(
        config, tokenizer, query_prompts(task, user), list(answers.values()), task.max_new_tokens
    )
    floor = e2e_floor_gflop(config, tokenizer, run_dir)
    assert floor["train"] == pytest.approx(train) and floor["answer"] == pytest.approx(answer)
    assert floor["total"] == pytest.approx(train + answer)
    write_json(run_dir / "run_config.json", vars(args) | {"task_name": task.name, "answer_mode": "constrained"})
    with pytest.raises(ValueError, match="generated answers only"):
        e2e_floor_gflop(config, tokenizer, run_dir)


def test_the_table_shows_the_new_floors():
    from benchmarks.bench import table

    r = {
        "serve": {
            "queries_per_s": {"mixed": 4.0, "single": 4.0, "sequential": 2.0},
            "seconds": {"mixed": [2.0, 2.5], "single": [2.0], "sequential": [4.5, 4.0], "prompt_pass": [1.5, 1.6]},
            "floor_seconds": 1.0,
        },
        "e2e": {
            "ours": {"seconds_per_user": 5.0, "floor_seconds": 2.0},
            "paper": {"seconds_per_user": 16.0},
        },
        "headline": {"e2e_ceiling_vs_paper": 8.0},
    }
    text = table(r)
    assert "| 4.00 / 2.00 / 1.50 / 1.00 |" in text  # user after user, mixed, its prompt pass, its floor
    assert "ours' floor per user (its training and answers at the limit), s | | | 2.00 |" in text
    assert "- e2e_ceiling_vs_paper: 8.000" in text


# --- where no prefix may be shared -------------------------------------------------------------


def test_decoding_without_a_cache_runs_every_prompt_whole(tiny_model, tokenizer, make_args, monkeypatch):
    """use_cache False asks for no cache at all, so the shared prefix (a cache) is not run apart."""
    import oppu.generation

    model = lora_model(tiny_model, make_args).eval()
    prompts = [INSTRUCTION + a + "\nAnswer:" for a, _ in ARTICLES]
    plain = generate(model, tokenizer, prompts, DecodeConfig(max_new_tokens=4, shared_prefix=False), show=False)

    def no_prefix(*_):
        raise AssertionError("a prefix ran apart without a cache")

    monkeypatch.setattr(oppu.generation, "run_prefix", no_prefix)
    uncached = generate(model, tokenizer, prompts, DecodeConfig(max_new_tokens=4, use_cache=False), show=False)
    assert uncached == plain


def tiny_mistral(tokenizer, window: int):
    from transformers import MistralConfig, MistralForCausalLM

    from oppu.modeling import prepare_model

    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).float()
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    prepare_model(model)
    return model.eval()


def test_a_sliding_window_shorter_than_the_rows_keeps_every_row_whole(tokenizer):
    """A prefix shared as a full-attention cache, or rows packed under a mask of their own, would
    let a token see past a sliding window: such a model trains and decodes every row whole, and
    scoring (always packed) says it cannot run."""
    from oppu.answers import score_answers
    from oppu.training import attention_window, shares_prefix

    model = tiny_mistral(tokenizer, window=24)
    assert attention_window(model) == 24 and not shares_prefix(model, 40) and shares_prefix(model, 20)
    examples = shared_examples(tokenizer)[:4]
    assert common_prefix_length([e.input_ids for e in examples]) > 24
    batch = collate(examples, tokenizer.pad_token_id)
    model.train()
    loss, used, _ = _summed_loss(model, batch, prefix=common_prefix_length([e.input_ids for e in examples]))
    plain, _, _ = _summed_loss(model, batch, prefix=None)
    assert used == 0 and torch.allclose(loss, plain)
    model.eval()
    prompts = [INSTRUCTION + a + "\nAnswer:" for a, _ in ARTICLES]
    shared = generate(model, tokenizer, prompts, DecodeConfig(max_new_tokens=4, batch_size=3), show=False)
    plain_cfg = DecodeConfig(max_new_tokens=4, batch_size=3, shared_prefix=False)
    assert shared == generate(model, tokenizer, prompts, plain_cfg, show=False)
    with pytest.raises(ValueError, match="sliding attention window of 24"):
        score_answers(model, tokenizer, prompts, ["crime", "sports"], show=False)
    assert attention_window(tiny_mistral(tokenizer, window=None)) is None
    # the stages refuse those answer modes once the model is loaded, before training anyone
    import argparse

    from oppu.cli import check_answer_window
    from utils import UserError

    check_answer_window(model, argparse.Namespace(answer_mode="generate", cut_off=2048))
    check_answer_window(model, argparse.Namespace(answer_mode="score", cut_off=16))
    with pytest.raises(UserError, match="--answer_mode constrained: .* sliding window of 24 tokens"):
        check_answer_window(model, argparse.Namespace(answer_mode="constrained", cut_off=2048))


def test_a_prompt_tuned_windowed_model_decodes_through_peft_without_a_cache(tokenizer, make_args):
    """Virtual tokens that cannot run once as a cache (a sliding window shorter than the prompts)
    go through peft's own path, which takes no cache and one prompt at a time."""
    from oppu import cli
    from oppu.adapters import add_user_adapter

    args = make_args("--peft_type", "prompt_tuning", "--num_virtual_tokens", "5")
    torch.manual_seed(0)
    model = add_user_adapter(tiny_mistral(tokenizer, window=24), tokenizer, args, cli.target_modules(args)).eval()
    prompts = [INSTRUCTION + a + "\nAnswer:" for a, _ in ARTICLES[:3]]
    alone = generate(
        model, tokenizer, prompts, DecodeConfig(max_new_tokens=6, batch_size=1, use_cache=False), show=False
    )
    assert generate(model, tokenizer, prompts, DecodeConfig(max_new_tokens=6, batch_size=3), show=False) == alone


def test_the_three_loss_paths_agree_in_bf16(tiny_model, tokenizer, make_args):
    """--dtype bfloat16: the packed pass builds its additive mask in the model's dtype; the plain
    forward, the shared prefix over padded rows and the packed pass agree to bf16's rounding."""
    model = lora_model(tiny_model, make_args).to(torch.bfloat16)
    examples = shared_examples(tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    prefix = common_prefix_length([e.input_ids for e in examples])
    plain, _, _ = _summed_loss(model, batch, None)
    padded, used, _ = _summed_loss(model, batch, prefix, pack=False)
    packed, used_packed, computed_padding = _summed_loss(model, batch, prefix, pack=True)
    assert used == used_packed == prefix and computed_padding == 0
    assert plain.dtype == torch.float32 and torch.isfinite(plain)  # the loss is taken in fp32
    for loss in (padded, packed):
        assert abs(loss.item() - plain.item()) <= 2e-2 * abs(plain.item())


def test_a_converted_checkpoint_is_installed_without_deleting_a_complete_one(tmp_path):
    """accelerate's ranks all convert the embedded model: a complete folder another one put there
    first stays (a rank may be loading it); a partial one is replaced."""
    from oppu.modeling import install_folder

    def made(name: str, weights: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_text(weights)
        (folder / "tokenizer.json").write_text("{}")
        return folder

    target = tmp_path / "model"
    install_folder(made("mine", "mine"), target)
    assert (target / "model.safetensors").read_text() == "mine"
    install_folder(made("late", "late"), target)  # another process's copy was there first
    assert (target / "model.safetensors").read_text() == "mine" and not (tmp_path / "late").exists()
    (target / "tokenizer.json").unlink()  # a conversion killed half-way
    install_folder(made("again", "again"), target)
    assert (target / "model.safetensors").read_text() == "again" and (target / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
