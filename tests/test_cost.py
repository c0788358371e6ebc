"""The cost model (oppu/cost.py) on hand-computed cases."""

from types import SimpleNamespace

import pytest

from oppu.cost import (
    History,
    Machine,
    Shape,
    batch_train_flops,
    decode_seconds,
    linear_flops,
    lora_parameters,
    pass_train_flops,
    train_flops,
    train_seconds,
    user_train_flops,
    users_wall_seconds,
)

TINY = SimpleNamespace(
    hidden_size=4,
    num_hidden_layers=1,
    intermediate_size=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=2,
    vocab_size=10,
)


def test_shape_of_llama_2_7b_from_its_config():
    config = SimpleNamespace(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    shape = Shape.from_config(config)
    assert (shape.hidden, shape.kv, shape.layers) == (4096, 4096, 32)
    assert shape.parameters == pytest.approx(6.74e9, rel=0.001)


def test_a_batch_of_one_without_prefix_is_one_example():
    shape = Shape.from_config(TINY)
    # per token: q, o 4x4 + k, v 4x2 + gate, up, down 4x8 = 144 multiply-adds, x 3 tokens = 432;
    # attention 4 x (1 + 2 + 3) pairs x 2 matmuls = 48; head 4 x 10 x 2 logit positions = 80.
    # Training: 2 FLOPs x (2 x 432 + 3 x 48 + 2 x 80) = 2336.
    assert batch_train_flops(shape, 3, 2, batch=1) == train_flops(TINY, 3, 2) == 2336


def test_a_shared_prefix_is_computed_once_per_batch():
    shape = Shape.from_config(TINY)
    # 2 examples of 3 tokens sharing 2: projections for 2 + 2 x 1 = 4 tokens (144 each: 576);
    # attention: the prefix's 1 + 2 pairs once, each example's third position 3 pairs, x 8
    # (d 4 x 2 matmuls): (3 + 2 x 3) x 8 = 72; head 4 x 10 x 2 positions x 2 examples = 160.
    # Training: 2 x (2 x 576 + 3 x 72 + 2 x 160) = 3376, against 2 x 2336 = 4672 without it.
    assert batch_train_flops(shape, 3, 2, batch=2, prefix=2) == 3376
    assert batch_train_flops(shape, 3, 2, batch=2) == 2 * 2336


def test_a_pass_of_unequal_examples_behind_a_shared_prefix():
    shape = Shape.from_config(TINY)
    # examples of 3 and 4 tokens sharing 2, with 2 and 1 logit positions: projections for
    # 2 + 1 + 2 = 5 tokens (720); attention: the prefix's 3 pairs once, then 3 and 3 + 4 pairs,
    # x 8: (3 + 3 + 7) x 8 = 104; head 4 x 10 x 3 = 120. 2 x (2 x 720 + 3 x 104 + 2 x 120) = 3984.
    assert pass_train_flops(shape, [3, 4], [2, 1], prefix=2) == 3984
    assert pass_train_flops(shape, [3, 3], [2, 2], prefix=2) == batch_train_flops(shape, 3, 2, batch=2, prefix=2)


def test_user_flops_follow_min_steps_padding_and_recomputation():
    shape = Shape.from_config(TINY)
    h = History(items=4, tokens=3, answer_tokens=1)  # 1 answer token: 2 logit positions
    one_epoch = 4 * 2336
    assert user_train_flops(shape, h, epochs=1, batch_size=2) == one_epoch
    # 4 items at batch 2 are 2 steps an epoch: 6 steps need 3 epochs
    assert user_train_flops(shape, h, epochs=1, batch_size=2, min_steps=6) == 3 * one_epoch
    assert user_train_flops(shape, h, epochs=1, batch_size=2, padding=0.5) == 2 * one_epoch
    # checkpointing recomputes each layer's forward up to down_proj's input: projections 432 - 96
    # (down_proj: 4 x 8 x 3), attention 48; against 2 x 432 + 3 x 48 + 2 x 80 = 1168 per example
    assert user_train_flops(shape, h, epochs=1, batch_size=2, recompute=True) == pytest.approx(
        one_epoch * (1 + (432 - 96 + 48) / 1168)
    )


def test_seconds_from_peak_and_efficiency():
    machine = Machine("m", matmul_tflops=1.0, efficiency=0.5, memory_gbs=1.0, bytes_per_param=4)
    assert train_seconds(1e12, machine) == 2.0


def test_decoding_is_bound_by_reading_the_weights_or_by_compute():
    shape = Shape(hidden=4, layers=1, intermediate=8, kv=2, vocab=10, parameters=1e9)
    # the products' weights: q, o 4 x 4, k, v 4 x 2, the MLP 3 x 4 x 8, the LM head 4 x 10
    weights = 2 * 16 + 2 * 8 + 3 * 32 + 40
    assert linear_flops(shape, 1) + shape.hidden * shape.vocab == weights
    # every pass reads the weights (2 bytes each) at 1 byte/s: 2 batches' prompt passes (each
    # computing the first of 5 new tokens), then 2 x 4 steps
    slow_memory = Machine("m", 1e-9, 0.5, memory_gbs=1e-9, bytes_per_param=2, decode_efficiency=0.5)
    seconds = decode_seconds(shape, slow_memory, queries=4, prompt_tokens=10, new_tokens=5, batch=2)
    assert seconds == pytest.approx((2 + 8) * weights * 2)
    # compute-bound at 1e3 x 0.5 FLOP/s: each prompt's projections (144 multiply-adds a token) and
    # the LM head at its last token, then steps of 2 rows through the products
    slow_compute = Machine("m", 1e-9, 0.5, memory_gbs=1e6, bytes_per_param=2, decode_efficiency=0.5)
    prompt = 2 * (144 * 10 + 40) * 4 / (1e3 * 0.5)
    step = 2 * weights * 2 / (1e3 * 0.5)
    seconds = decode_seconds(shape, slow_compute, queries=4, prompt_tokens=10, new_tokens=5, batch=2)
    assert seconds == pytest.approx(prompt + 8 * step)
    # a GPU's eager decoding: each pass, prompt or step, takes at least its kernel launches' time
    launch_bound = Machine("m", 1000.0, 0.5, memory_gbs=1e6, bytes_per_param=2, step_seconds=0.04)
    seconds = decode_seconds(shape, launch_bound, queries=4, prompt_tokens=10, new_tokens=5, batch=2)
    assert seconds == pytest.approx((2 + 8) * 0.04, rel=1e-6)
    # an answer of one token is the prompt passes alone; a last batch of 1 is a pass of its own
    assert decode_seconds(shape, launch_bound, queries=4, prompt_tokens=10, new_tokens=1, batch=2) == pytest.approx(
        0.08, rel=1e-6
    )
    assert decode_seconds(shape, launch_bound, queries=3, prompt_tokens=10, new_tokens=2, batch=2) == pytest.approx(
        (2 + 2) * 0.04, rel=1e-6
    )


def test_on_a_gpu_a_short_prefix_is_trained_per_example():
    from benchmarks.cost_model import GPUS, OURS, as_trained

    h = History(items=10, tokens=120.0, answer_tokens=2.0, prefix=90)
    cpu = Machine("cpu", 0.1, 0.5, 30.0, 4)
    assert as_trained(h, OURS, cpu) == h  # 90 tokens pay on a CPU
    assert as_trained(h, OURS, GPUS["H200"]).prefix == 0  # not under 256 on a GPU
    long = History(items=10, tokens=600.0, answer_tokens=2.0, prefix=400)
    assert as_trained(long, OURS, GPUS["H200"]) == long


def test_the_gpu_check_reads_a_gpu_bench_run():
    from benchmarks.cost_model import GPUS, LLAMA2_7B, check_against_gpu_bench
    from oppu.cost import recompute_factor

    path = {"mfu": 0.5, "seconds": 2.0}
    gpu = {
        "device": "g",
        "matmul_tflops": 700.0,
        "train": {"plain": path, "paper": path},
        "settings": {"examples": 64, "prompt_length": 256},
        "decode": {"rows": 8, "new_tokens_per_row": 32, "new_tokens_per_s": {"single_adapter": 128.0}},
    }
    rows = check_against_gpu_bench(gpu, GPUS["H200"])
    h200 = GPUS["H200"]
    plain = rows["train plain, 64 examples (s)"]
    assert plain["measured"] == 2.0
    # 0.5 x 2 s x 700 TFLOP/s of model FLOPs at 989 x 0.35 TFLOP/s
    assert plain["predicted"] == pytest.approx(700e12 / (h200.matmul_tflops * 1e12 * h200.efficiency))
    factor = recompute_factor(LLAMA2_7B, 256, 5)  # the default shape: 256 tokens, loss on the last 4
    assert 1.3 < factor < 1.4
    assert rows["train paper, 64 examples (s)"]["predicted"] == pytest.approx(factor * plain["predicted"])
    assert rows["decode 8 rows x 32 new tokens, one adapter (s)"]["measured"] == pytest.approx(2.0)


def test_lora_parameters_and_a_clear_error_for_unknown_targets():
    shape = Shape.from_config(TINY)
    # q: 8 x (4 + 4), v: 8 x (4 + 2)
    assert lora_parameters(shape, 8, ["q_proj", "v_proj"]) == 112
    with pytest.raises(ValueError, match="gate_proj"):
        lora_parameters(shape, 8, ["gate_proj"])


def test_users_split_over_processes_as_oppu_splits_them():
    # costliest first to the least loaded: [5, 2, 1] and [4, 3], so 8 (a round robin's [1, 3, 5]: 9)
    assert users_wall_seconds([1, 2, 3, 4, 5], 2, load_seconds=10) == 18
    assert users_wall_seconds([1, 2, 3], 1) == 6


def test_each_configuration_decodes_answers_of_its_own_length():
    """The paper's sampled answers (up to 200 tokens) are longer than ours (capped at the task's
    max_new_tokens): the cost model decodes each configuration's measured length."""
    from benchmarks.cost_model import OURS, PAPER, user_figures

    shape = Shape(hidden=4, layers=1, intermediate=8, kv=2, vocab=10, parameters=1e9)
    machine = Machine("m", 1000.0, 0.5, memory_gbs=1e-9, bytes_per_param=2, decode_efficiency=0.5)
    h = History(items=4, tokens=3, answer_tokens=1)
    q = {"prompt_tokens": 0.0, "prefix_tokens": 0.0, "new_tokens": 3.0, "new_tokens_paper": 11.0}
    # each pass reads the products' 184 weights (2 bytes each) at 1 byte/s: 4 queries one at a time
    # (4 prompt passes, each giving a first token, then 10 steps each), or one batch of 8 (1 + 2)
    read = 184 * 2.0
    assert user_figures(shape, machine, h, PAPER, 1, 4, q)["answer_seconds"] == pytest.approx(4 * 11 * read)
    assert user_figures(shape, machine, h, OURS, 1, 4, q)["answer_seconds"] == pytest.approx(3 * read)


# --- a training run's FLOPs as oppu.training computes them ------------------------------------


def _example(prefix: list[int], own: int, answer: int, start: int = 1000):
    """An encoded example: ``prefix``, then ``own`` prompt tokens, then ``answer`` target tokens."""
    from oppu.training import IGNORE_INDEX, Encoded

    ids = prefix + list(range(start, start + own + answer))
    return Encoded(ids, [IGNORE_INDEX] * (len(prefix) + own) + ids[len(prefix) + own :], False)


def test_chunk_train_flops_shares_the_prefix_as_training_does():
    from oppu.cost import chunk_train_flops, packing_pays

    shape = Shape(hidden=8, layers=2, intermediate=16, kv=4, vocab=50, parameters=1.0)
    prefix = list(range(20))
    chunk = [_example(prefix, 5, 3), _example(prefix, 9, 2, start=2000)]  # 28 and 31 tokens
    # logits from the batch's first target position (25) to the widest row's end (31): 7 per row
    assert not packing_pays(shape, [8, 11], held=20)  # packed, as many FLOPs or more (PACKING_MARGIN)
    assert chunk_train_flops(shape, chunk) == pass_train_flops(shape, [28, 31], [7, 7], prefix=20)
    # rows of 8 and 17 tokens behind the prefix run packed: each row's last token left out,
    # logits at the targets only
    spread = [_example(prefix, 5, 3), _example(prefix, 15, 2, start=2000)]
    assert packing_pays(shape, [8, 17], held=20)
    assert chunk_train_flops(shape, spread) == pass_train_flops(shape, [27, 36], [3, 2], prefix=20)
    assert chunk_train_flops(shape, chunk, shared_prefix=False) == pass_train_flops(shape, [28, 31], [7, 7])
    # a prefix shorter than the least worth sharing runs in every row
    assert chunk_train_flops(shape, chunk, min_prefix=21) == pass_train_flops(shape, [28, 31], [7, 7])
    # rows that share more than their prompts: the prefix stops before the first target's logits
    # (rows of one length have no padding to save: they run padded)
    same = [_example(prefix, 5, 3), _example(prefix, 5, 3)]
    assert not packing_pays(shape, [4, 4], held=24)
    assert chunk_train_flops(shape, same) == pass_train_flops(shape, [28, 28], [4, 4], prefix=24)
    # the paper release's loss (--all_logits): logits at every position of the padded batch, no prefix
    assert chunk_train_flops(shape, chunk, all_logits=True) == pass_train_flops(shape, [28, 31], [31, 31])


def test_plan_train_flops_follows_the_batch_plan():
    from oppu.cost import chunk_train_flops, plan_train_flops
    from oppu.training import TrainConfig, batch_plan

    shape = Shape(hidden=8, layers=2, intermediate=16, kv=4, vocab=50, parameters=1.0)
    prefix = list(range(20))
    examples = [_example(prefix, 3 + i, 2, start=1000 + 100 * i) for i in range(5)]
    cfg = TrainConfig(batch_size=4, micro_batch_size=2, max_epoch=2, seed=3)
    flops, steps = plan_train_flops(shape, examples, cfg)
    plan = batch_plan(5, cfg, [len(e.input_ids) for e in examples])
    assert steps == len(plan) == 4  # 2 epochs of a batch of 4 and a batch of 1
    want = sum(
        chunk_train_flops(shape, [examples[i] for i in step[j : j + 2]])
        for step in plan
        for j in range(0, len(step), 2)
    )
    assert flops == pytest.approx(want)
    # checkpointing runs no shared prefix (oppu.training), nor does --no_shared_prefix
    for off in ({"gradient_checkpointing": True}, {"shared_prefix": False}):
        plain, _ = plan_train_flops(shape, examples, TrainConfig(**(vars(cfg) | off)))
        unshared = sum(
            chunk_train_flops(shape, [examples[i] for i in step[j : j + 2]], shared_prefix=False)
            for step in plan
            for j in range(0, len(step), 2)
        )
        assert plain == pytest.approx(unshared) and plain > flops
    every, _ = plan_train_flops(shape, examples, TrainConfig(**(vars(cfg) | {"all_logits": True})))
    want = sum(
        chunk_train_flops(shape, [examples[i] for i in step[j : j + 2]], shared_prefix=False, all_logits=True)
        for step in plan
        for j in range(0, len(step), 2)
    )
    assert every == pytest.approx(want) and every > plain
