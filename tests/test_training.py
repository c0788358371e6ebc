"""Masking, batching, training, adapters and decoding, on the embedded tokenizer and tiny random Llamas."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import OPPU
from oppu.adapters import (
    ADAPTER_WEIGHTS,
    TASK_TARGETS,
    USER_TARGETS,
    add_adapter,
    lora_config,
    merge_adapter,
    save_adapter,
)
from oppu.examples import history_pairs
from oppu.generation import DecodeConfig, generate
from oppu.runs import user_result_dir
from oppu.tasks import get_task
from oppu.training import (
    IGNORE_INDEX,
    Encoded,
    TrainConfig,
    batch_plan,
    collate,
    encode_prompt,
    tokenize_and_mask,
    train,
)
from prompts import render_query_input

PROMPT = "Which category does this article relate to? article: The storm flooded the harbour town overnight.\nAnswer:"
TOY = [
    ("a bank robbery", " crime"),
    ("the final match", " sports"),
    ("a cheap flight", " travel"),
    ("the new senate", " politics"),
    ("a quantum chip", " science & technology"),
    ("a vegan bakery", " food & drink"),
    ("the old temple", " religion"),
    ("a merger deal", " business"),
]


def target_ids(tokenizer, target: str) -> list[int]:
    """The target's tokens as the model must learn them: in the chat template's assistant turn,
    which starts on a fresh line, the target's leading space is dropped."""
    return tokenizer(target.lstrip() if tokenizer.chat_template else target, add_special_tokens=False)["input_ids"]


def toy_examples(tokenizer, cut_off: int = 256) -> list[Encoded]:
    pairs = [(f"What is this article about? article: {topic}\nAnswer:", target) for topic, target in TOY]
    return [tokenize_and_mask(tokenizer, p, y, cut_off) for p, y in pairs]


def with_lora(model, args, targets):
    """``add_adapter`` with a seeded LoRA init (and dropout), so a test does not depend on the others' RNG use."""
    torch.manual_seed(0)
    return add_adapter(model, lora_config(args, targets))


def quick_train(model, tokenizer, **overrides):
    cfg = TrainConfig(**{"learning_rate": 0.1, "batch_size": 8, "micro_batch_size": 8, "max_epoch": 2} | overrides)
    return train(model, tokenizer, toy_examples(tokenizer), cfg)


# --- tokenize and mask -------------------------------------------------------------------------


@pytest.mark.parametrize("templated", [True, False], ids=["chat-template", "raw-text"])
def test_prompt_is_masked_then_target_then_eos(tokenizer, templated):
    tok = tokenizer if templated else copy.deepcopy(tokenizer)
    if not templated:
        tok.chat_template = None
    enc = tokenize_and_mask(tok, PROMPT, " crime", cut_off=2048)
    prompt, target, eos = encode_prompt(tok, PROMPT), target_ids(tok, " crime"), tok.eos_token_id
    assert enc.input_ids == prompt + target + [eos]
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + target + [eos]
    assert enc.truncated is False
    assert tok.decode(enc.labels[len(prompt) : -1]).strip() == "crime"
    if templated:  # the prompt ends where the assistant's answer starts
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def sentencepiece_like_tokenizer():
    """A tokenizer that marks word starts as Llama-2's does (its normalizer prepends "▁" and turns
    spaces into "▁"; no chat template): " crime" alone is "▁" then "▁crime"."""
    from tokenizers import Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "</s>", "<s>", "▁", "▁Answer:", "▁crime", "▁a", "▁b", "a", "b", " "]
    model = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0, byte_fallback=False))
    model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", bos_token="<s>")


def character_tokenizer():
    """One token per character, the space among them: " a" is " " then "a", which a target needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "</s>", " ", "a", "b", "c", "e", "i", "m", "r", ":"]
    model = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>")


def test_a_sentencepiece_target_starts_as_it_does_after_its_prompt():
    """Without the fix every target started with a lone "▁" (Llama-2's 29871), which the prompt and
    its answer tokenized together never have."""
    tok = sentencepiece_like_tokenizer()
    assert tok(" crime", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("▁"), 5]
    enc = tokenize_and_mask(tok, "Answer:", " crime", cut_off=64)
    together = tok("Answer: crime")["input_ids"]  # BOS, "▁Answer:", "▁crime"
    assert together[0] == tok.bos_token_id and len(together) == 3
    assert enc.input_ids == together + [tok.eos_token_id]
    assert [x for x in enc.labels if x != IGNORE_INDEX] == [tok.convert_tokens_to_ids("▁crime"), tok.eos_token_id]


def test_a_character_tokenizer_keeps_the_targets_space():
    tok = character_tokenizer()
    assert tok(" a", add_special_tokens=False)["input_ids"] == [2, 3]
    enc = tokenize_and_mask(tok, "crime:", " a", cut_off=64)
    assert enc.input_ids == tok("crime: a")["input_ids"] + [tok.eos_token_id]


def test_exact_fit_is_not_truncated_and_one_token_less_is(tokenizer):
    full = len(encode_prompt(tokenizer, PROMPT)) + len(target_ids(tokenizer, " crime")) + 1
    assert tokenize_and_mask(tokenizer, PROMPT, " crime", full).truncated is False
    shorter = tokenize_and_mask(tokenizer, PROMPT, " crime", full - 1)
    assert shorter.truncated is True and len(shorter.input_ids) == full - 1


def test_long_prompt_loses_its_oldest_tokens_and_keeps_target_and_eos(tokenizer):
    prompt, target, eos = encode_prompt(tokenizer, PROMPT), target_ids(tokenizer, " crime"), tokenizer.eos_token_id
    cut_off = len(target) + 1 + 5
    enc = tokenize_and_mask(tokenizer, PROMPT, " crime", cut_off)
    assert enc.truncated is True
    assert len(enc.input_ids) == len(enc.labels) == cut_off
    assert enc.input_ids == prompt[-5:] + target + [eos]
    assert enc.labels == [IGNORE_INDEX] * 5 + target + [eos]


def test_a_truncated_prompt_keeps_the_chat_templates_opening_turns(tokenizer):
    """What is cut is the oldest text of the user's turn, not the system turn and the user turn's
    opening, when the budget holds them; with no template nothing is kept ahead."""
    from oppu.training import template_head

    head = template_head(tokenizer)
    assert tokenizer.decode(head).startswith("<|im_start|>system") and tokenizer.decode(head).endswith("user\n")
    prompt, target, eos = encode_prompt(tokenizer, PROMPT), target_ids(tokenizer, " crime"), tokenizer.eos_token_id
    enc = tokenize_and_mask(tokenizer, PROMPT, " crime", len(head) + 10 + len(target) + 1)
    assert enc.truncated is True and enc.input_ids == head + prompt[-10:] + target + [eos]
    raw = copy.deepcopy(tokenizer)
    raw.chat_template = None
    assert template_head(raw) == []


def test_target_longer_than_cut_off_is_cut_visibly_keeping_one_prompt_token(tokenizer):
    long_target = " " + " ".join(["headline"] * 40)
    prompt, target = encode_prompt(tokenizer, PROMPT), target_ids(tokenizer, long_target)
    enc = tokenize_and_mask(tokenizer, PROMPT, long_target, cut_off=10)
    assert enc.truncated is True
    assert len(enc.input_ids) == 10
    assert enc.input_ids == prompt[-1:] + target[:9]
    assert enc.labels == [IGNORE_INDEX] + target[:9]


# --- batching ----------------------------------------------------------------------------------


def test_collate_pads_right_and_masks_padding_out_of_loss_and_attention(tokenizer):
    pad = tokenizer.pad_token_id
    batch = collate([Encoded([5, 6, 7, 8], [-100, -100, 7, 8], False), Encoded([9, 10], [-100, 10], False)], pad)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, pad, pad]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


@pytest.mark.parametrize("n, batch_size", [(10, 4), (8, 4), (3, 16)])
def test_batch_plan_covers_every_example_once_per_epoch(n, batch_size):
    plan = batch_plan(n, TrainConfig(batch_size=batch_size, max_epoch=3, seed=1))
    per_epoch = math.ceil(n / batch_size)
    assert len(plan) == 3 * per_epoch
    assert all(len(step) <= batch_size for step in plan)
    for epoch in range(3):
        seen = [i for step in plan[epoch * per_epoch : (epoch + 1) * per_epoch] for i in step]
        assert sorted(seen) == list(range(n))


def test_batch_plan_is_seeded_and_capped_by_max_step():
    cfg = TrainConfig(batch_size=4, max_epoch=3, seed=7)
    plan = batch_plan(10, cfg)
    assert batch_plan(10, cfg) == plan
    assert batch_plan(10, TrainConfig(batch_size=4, max_epoch=3, seed=8)) != plan
    assert batch_plan(10, TrainConfig(batch_size=4, max_epoch=3, seed=7, max_step=4)) == plan[:4]
    assert len(batch_plan(10, TrainConfig(batch_size=4, max_epoch=3, max_step=100))) == 9


# --- training and adapters ---------------------------------------------------------------------


def test_fresh_user_lora_learns_the_toy_targets(tiny_model, tokenizer, make_args):
    model = with_lora(tiny_model(), make_args(), USER_TARGETS)
    fit = quick_train(model, tokenizer, max_epoch=6, warmup_ratio=0.0)
    assert fit.steps == len(fit.losses) == 6 and fit.examples == 8 * 6
    assert all(math.isfinite(x) for x in fit.losses)
    assert fit.losses[-1] < fit.losses[0] - 1.5, fit.losses  # nats per target token
    assert not model.training  # train() hands the model back ready to decode


def test_micro_batches_only_save_memory(tiny_model, tokenizer, make_args):
    """Splitting a step into uneven micro-batches gives the same losses and weights as one batch:
    token losses are summed and divided by the whole step's target tokens."""
    args = make_args("--lora_dropout", "0")
    runs = []
    for micro in (8, 3):
        model = with_lora(tiny_model(), args, USER_TARGETS)
        fit = quick_train(model, tokenizer, micro_batch_size=micro)
        runs.append((fit.losses, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    assert all(torch.allclose(weights_a[n], weights_b[n], atol=1e-5) for n in weights_a)


def test_a_plan_of_one_warm_up_step_says_that_it_trains_nothing(tiny_model, tokenizer, make_args, capsys):
    """Warm-up is ceil(10 %) of the steps and the schedule starts at learning rate 0 (as the HF
    Trainer's), so a plan of one step leaves the weights as they were: said, not silent."""
    model = with_lora(tiny_model(), make_args(), USER_TARGETS)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    quick_train(model, tokenizer, batch_size=16, max_epoch=1)  # 8 toy examples: one step
    assert "1 optimiser step, all of it warm-up" in capsys.readouterr().err
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    quick_train(model, tokenizer, batch_size=4, max_epoch=1)  # two steps: the second trains
    assert "warm-up" not in capsys.readouterr().err
    assert not all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_gradient_checkpointing_only_saves_memory_and_warns_nothing(tiny_model, tokenizer, make_args):
    """The paper's --gradient_checkpointing: the same losses and weights, switched off again after
    training, and through transformers' current name (the old one warns at every call)."""
    import warnings

    args = make_args("--lora_dropout", "0")
    runs = []
    for checkpointing in (False, True):
        model = with_lora(tiny_model(), args, USER_TARGETS)
        layer = model.get_base_model().model.layers[0]
        seen = []  # whether the layer checkpoints, at each of its forward calls
        hook = layer.register_forward_pre_hook(
            lambda m, a, seen=seen: seen.append(getattr(m, "gradient_checkpointing", False))
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = quick_train(model, tokenizer, gradient_checkpointing=checkpointing, shared_prefix=False)
        hook.remove()
        assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
        assert seen and all(on == checkpointing for on in seen)  # on in training when asked, else off
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # off again
        runs.append((fit.losses, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    assert all(torch.allclose(weights_a[n], weights_b[n], atol=1e-5) for n in weights_a)


def test_task_adapter_wraps_q_k_v_and_o_of_every_layer_and_only_lora_trains(tiny_model, make_args):
    model = with_lora(tiny_model(), make_args(), TASK_TARGETS)
    layers = model.base_model.model.model.layers
    assert len(layers) == 2
    for layer in layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(layer.self_attn, name)
            assert "default" in proj.lora_A and "default" in proj.lora_B, name
            assert proj.lora_A["default"].weight.shape[0] == 8  # r
        assert not hasattr(layer.mlp.up_proj, "lora_A")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 4 * 2  # layers x projections x (A, B)
    assert all("lora_" in n for n in trainable)


QUERIES = [
    "Short one.\nAnswer:",
    "A much longer prompt about the harbour, the storm and the town council.\nAnswer:",
    "Medium prompt on sports.\nAnswer:",
]
DECODE = DecodeConfig(max_new_tokens=5, batch_size=3)


def test_saved_adapter_reloads_and_merges_to_the_same_predictions(tiny_model, tokenizer, make_args, tmp_path):
    from peft import PeftModel

    base_out = generate(tiny_model(), tokenizer, QUERIES, DECODE, show=False)
    model = with_lora(tiny_model(), make_args(), USER_TARGETS)
    quick_train(model, tokenizer)
    trained_out = generate(model, tokenizer, QUERIES, DECODE, show=False)
    assert trained_out != base_out  # the adapter changed the model, so the comparison means something

    save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert ADAPTER_WEIGHTS in files and "adapter_config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], files
    assert not list(tmp_path.glob(".adapter.tmp*"))

    reloaded = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "adapter"))
    assert generate(reloaded, tokenizer, QUERIES, DECODE, show=False) == trained_out
    merged = merge_adapter(tiny_model(), tmp_path / "adapter")
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert generate(merged, tokenizer, QUERIES, DECODE, show=False) == trained_out


def news_user(user_id: str, word: str) -> dict:
    """A news_categorize user whose every history item and query mentions ``word``."""
    task = get_task("news_categorize")
    items = [
        {
            "id": f"{user_id}-h{j}",
            "title": f"{word} news {j}",
            "category": c,
            "text": f"The {word} story number {j} about {word} habits.",
        }
        for j, c in enumerate(["sports", "travel", "crime"])
    ]
    query = {"id": f"{user_id}-q0", "input": render_query_input(task, text=f"Another {word} report."), "gold": "sports"}
    return {"user_id": user_id, "profile": items, "query": [query]}


def test_every_user_trains_a_fresh_lora_on_own_history_from_a_clean_base(
    tiny_model, tokenizer, make_args, tmp_path, monkeypatch
):
    task = get_task("news_categorize")
    args = make_args(
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
    users = [news_user("u-zebra", "zebra"), news_user("u-quokka", "quokka")]
    for user, other in ((users[0], "quokka"), (users[1], "zebra")):
        prompts = [p for p, _ in history_pairs(task, user, k=1)]
        assert len(prompts) == 3 and all(user["user_id"][2:] in p and other not in p for p in prompts)

    seen: list[str] = []

    def recording(tok, pairs, cut_off):
        seen.extend(prompt for prompt, _ in pairs)
        return [tokenize_and_mask(tok, prompt, target, cut_off) for prompt, target in pairs]

    monkeypatch.setattr(OPPU, "encode_pairs", recording)
    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model, adapters = base, []
    for user, other in ((users[0], "quokka"), (users[1], "zebra")):
        seen.clear()
        model, result = OPPU.train_user(model, tokenizer, task, user, None, args, tmp_path / "run")
        assert len(seen) == result["train_examples"] == 3
        assert not [p for p in seen if other in p]  # this user's history only
        assert model is base
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert not [n for n, _ in model.named_modules() if "lora" in n]
        assert not hasattr(model, "peft_config")
        adapters.append(load_file(user_result_dir(tmp_path / "run", user["user_id"]) / "adapter" / ADAPTER_WEIGHTS))
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


# --- generation --------------------------------------------------------------------------------


def test_greedy_decoding_is_deterministic_new_text_only_and_padding_invariant(tiny_model, tokenizer):
    model = tiny_model()
    prompts = [QUERIES[1], QUERIES[0], QUERIES[2] * 3]
    lengths = {len(encode_prompt(tokenizer, p)) for p in prompts}
    assert len(lengths) == 3  # a batch that needs real left padding
    cfg = DecodeConfig(max_new_tokens=6, batch_size=3)
    batched = generate(model, tokenizer, prompts, cfg, show=False)
    assert generate(model, tokenizer, prompts, cfg, show=False) == batched
    alone = [generate(model, tokenizer, [p], cfg, show=False)[0] for p in prompts]
    assert batched == alone
    for prompt, out in zip(prompts, batched):
        assert prompt.split("\n")[0] not in out and "assistant" not in out and "helpful AI" not in out


def test_processes_average_to_the_steps_token_mean(tokenizer, tiny_model, make_args):
    """Data-parallel steps: the gradient DDP averages over two processes, each dividing its summed
    token loss by loss_denominator of the whole step, equals one process's gradient of the step's
    mean, although the processes hold 3 examples and 1."""
    from oppu.training import _summed_loss, loss_denominator

    model = with_lora(tiny_model(), make_args("--lora_dropout", "0"), USER_TARGETS)
    examples = toy_examples(tokenizer)[:4]
    tokens = [sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in examples]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(share: list[Encoded], divide_by: float) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        summed, _, _ = _summed_loss(model, collate(share, tokenizer.pad_token_id), None)
        (summed / divide_by).backward()
        return [p.grad.clone() for p in params]

    whole = grads(examples, sum(tokens))
    denominator = loss_denominator(sum(tokens), 2)
    shares = [grads(examples[:3], denominator), grads(examples[3:], denominator)]
    averaged = [(a + b) / 2 for a, b in zip(*shares)]  # what DDP's all-reduce leaves on each process
    assert all(torch.allclose(a, w, rtol=1e-5, atol=1e-7) for a, w in zip(averaged, whole))
    # each process's own mean, averaged (the code before), weighs the lone example three times over
    own = [grads(examples[:3], sum(tokens[:3])), grads(examples[3:], sum(tokens[3:]))]
    assert not all(torch.allclose((a + b) / 2, w, rtol=1e-3) for a, b, w in zip(*own, whole))
    assert loss_denominator(sum(tokens), 1) == sum(tokens)  # one process: its own tokens, as before


def test_a_test_prompt_longer_than_cut_off_is_cut_as_a_training_prompt_is(tiny_model, tokenizer, capsys):
    """Decoding keeps a prompt and its answer within --cut_off as training does: the oldest text
    goes, the chat template's opening turns and the query's end stay; the cut is reported."""
    from oppu.training import fit_prompt, template_head

    model, long, new = tiny_model(), QUERIES[1] * 4, 4
    ids, head = encode_prompt(tokenizer, long), template_head(tokenizer)
    cut_off = len(head) + 12 + new
    kept = fit_prompt(tokenizer, ids, cut_off - new)
    assert len(ids) > cut_off and kept == head + ids[-12:]
    tail = len(target_ids(tokenizer, " storm")) + 1  # the target and EOS
    assert tokenize_and_mask(tokenizer, long, " storm", len(kept) + tail).input_ids[: len(kept)] == kept
    cfg = DecodeConfig(max_new_tokens=new, batch_size=2, cut_off=cut_off)
    got = generate(model, tokenizer, [long, QUERIES[0]], cfg, show=False)
    assert (
        f"1 of 2 prompts were cut to {len(kept)} tokens (the cut-off less the answer's room)" in capsys.readouterr().err
    )
    with torch.no_grad():
        out = model.generate(
            torch.tensor([kept]), max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert got[0] == tokenizer.decode(out[0, len(kept) :], skip_special_tokens=True)
    uncut = generate(model, tokenizer, [QUERIES[0]], replace(cfg, cut_off=None), show=False)
    assert uncut == got[1:]  # a short prompt is untouched


def test_known_third_party_noise_is_silenced(tiny_model):
    """The CLI wrapper hides peft's read of transformers' deprecated is_gradient_checkpointing (a
    FutureWarning for every adapter) and bitsandbytes' missing-kernel log line, and nothing else."""
    import logging
    import warnings

    from peft import LoraConfig

    from oppu.adapters import add_adapter
    from utils import BNB_CPU_LOGGER, silence_known_noise

    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

    def future_warnings(silenced: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            warnings.simplefilter("always")
            if silenced:
                silence_known_noise()
            add_adapter(tiny_model(), config)
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)  # still shown
        return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]

    plain = future_warnings(silenced=False)
    if not any("is_gradient_checkpointing" in m for m in plain):
        pytest.skip("this transformers no longer warns about is_gradient_checkpointing")
    assert future_warnings(silenced=True) == ["another FutureWarning"]

    ops = pytest.importorskip(BNB_CPU_LOGGER)
    assert ops.logger.name == BNB_CPU_LOGGER  # the module that logs it

    def shown(message: str) -> bool:
        return bool(
            ops.logger.filter(logging.LogRecord(BNB_CPU_LOGGER, logging.WARNING, __file__, 0, message, (), None))
        )

    missing = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'."
    silence_known_noise()
    assert not shown(missing) and shown("another warning")
