"""OPPU's cost model: FLOPs, seconds, storage and serving throughput of personal PEFTs.

One place for the FLOP count that ``benchmarks/bench.py`` uses for model FLOPs utilisation, and
the predictions of ``benchmarks/cost_model.py`` (docs/cost.md): per-user training FLOPs and
seconds from a user's history, the size of one personal LoRA, and queries/s of decoding, on a
machine described by its matmul peak, the fraction of it training reaches, and its memory
bandwidth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oppu.defaults import epochs_for_min_steps, estimate_parameters
from oppu.runs import split_users
from oppu.training import IGNORE_INDEX, MIN_SHARED_PREFIX, Encoded, TrainConfig, batch_plan, common_prefix_length

# The projections LoRA adapts in each layer, and their output widths (d: hidden, kv: key/value).
LORA_OUTPUTS = {"q_proj": "d", "k_proj": "kv", "v_proj": "kv", "o_proj": "d"}


@dataclass(frozen=True)
class Shape:
    """What the cost depends on in a decoder-only transformer's config."""

    hidden: int
    layers: int
    intermediate: int
    kv: int  # key/value width: key-value heads x head dim
    vocab: int
    parameters: float  # all weights, embeddings included (read once per decoding step)

    @classmethod
    def from_config(cls, config) -> Shape:
        d, ff = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
        kv = config.num_key_value_heads * head_dim
        return cls(d, config.num_hidden_layers, ff, kv, config.vocab_size, float(estimate_parameters(config)))


@dataclass(frozen=True)
class Machine:
    """A machine as the cost model sees it. ``efficiency`` is model FLOPs utilisation of training
    (model FLOPs / s over ``matmul_tflops``), ``decode_efficiency`` the same for the prompt pass."""

    name: str
    matmul_tflops: float  # dense matmul peak in the dtype used
    efficiency: float
    memory_gbs: float  # memory bandwidth: a decoding step reads every weight once
    bytes_per_param: int  # 4 for fp32, 2 for bf16
    decode_efficiency: float = 0.5
    step_seconds: float = 0.0  # the least a new-token step takes (an eager model's kernel launches)
    min_shared_prefix: int = 16  # training runs a shared prefix once from this many tokens (oppu.training)


def linear_flops(shape: Shape, tokens: int) -> float:
    """Forward multiply-adds of the 7 projections of every layer for ``tokens`` tokens."""
    d, kv, ff = shape.hidden, shape.kv, shape.intermediate
    return shape.layers * (2 * d * d + 2 * d * kv + 3 * d * ff) * tokens


def attention_flops(shape: Shape, length: int, prefix: int = 0) -> float:
    """Forward multiply-adds of causal attention (QK^T and AV, d per query-key pair) for the
    query positions after ``prefix`` of a sequence of ``length``."""
    pairs = length * (length + 1) // 2 - prefix * (prefix + 1) // 2
    return shape.layers * shape.hidden * 2 * pairs


def train_flops(config, length: int, logit_positions: int) -> float:
    """Model FLOPs of one training example (recomputation by checkpointing not counted).

    Forward multiply-adds: the 7 projections of every layer per token, causal attention (QK^T and
    AV: d per query-key pair, n(n+1)/2 pairs), and the vocabulary projection only at the logit
    positions. Backward computes activation gradients only (the base is frozen; LoRA's r=8
    weight gradients are under 1% and not counted): one matmul per projection, two per attention
    matmul. So training = 2 x (2 x linear + 3 x attention + 2 x head) multiply-adds.
    """
    shape = config if isinstance(config, Shape) else Shape.from_config(config)
    linear = linear_flops(shape, length)
    attention = attention_flops(shape, length)
    head = shape.hidden * shape.vocab * logit_positions
    return 2.0 * (2 * linear + 3 * attention + 2 * head)


def batch_train_flops(shape: Shape, length: int, logit_positions: int, batch: int, prefix: int = 0) -> float:
    """Model FLOPs of one batch of ``batch`` examples of ``length`` tokens whose first ``prefix``
    tokens are the same: with a shared prefix, those tokens' projections and attention are
    computed once per batch (forward and backward) instead of once per example."""
    return pass_train_flops(shape, [length] * batch, [logit_positions] * batch, prefix)


def pass_train_flops(shape: Shape, lengths: Sequence[int], logit_positions: Sequence[int], prefix: int = 0) -> float:
    """``batch_train_flops`` for one forward pass over examples of the given ``lengths`` (padding
    not counted), each with its own number of logit positions."""
    linear = linear_flops(shape, prefix + sum(n - prefix for n in lengths))
    attention = attention_flops(shape, prefix) + sum(attention_flops(shape, n, prefix) for n in lengths)
    head = shape.hidden * shape.vocab * sum(logit_positions)
    return 2.0 * (2 * linear + 3 * attention + 2 * head)


# Packing pays where it computes no more than the padded batch, as packing_pays counts the
# FLOPs (its one pass runs larger products in fewer calls than the prefix and the padded rows).
# Measured (benchmarks/README.md, "Packed rows"; packed and padded alternated): the bench's news
# epoch (batches at 0.84 and 0.89 of the padded FLOPs) 1.16 to 1.30 times as fast packed, its
# headline epoch (0.95, 0.98) 1.05 to 1.19, two of the demo's batches (1.00, 1.01) 1.07 and 1.09,
# two others (1.04) a tie.
PACKING_MARGIN = 1.0


def packing_pays(shape: Shape, rows: Sequence[int], held: int, cached: int = 0) -> bool:
    """Whether a training pass's rows (``rows``: each one's own tokens, behind ``held`` shared
    tokens and ``cached`` positions every token sees but none computes, a prompt-tuning
    adapter's virtual tokens) cost no more FLOPs packed into one sequence after the shared
    tokens than as a right-padded batch behind them (``PACKING_MARGIN`` of them at most): the
    projections of every position computed, and attention over every (query, key) pair the
    kernel computes, masked or not. Padded: each row's width of queries over cached + held +
    width keys. Packed (each row's last token left out, ``oppu.training.packed_shared_loss``):
    its tokens over cached + held + all of them, and the shared tokens' queries over them too.
    The shared tokens' own work is the same both ways and not counted, nor are the logits
    packing saves."""
    width, total = max(rows), sum(rows) - len(rows)
    pair = shape.layers * shape.hidden * 2  # attention_flops per (query, key) pair
    seen = cached + held
    padded = linear_flops(shape, len(rows) * width) + pair * len(rows) * width * (seen + width)
    packed = linear_flops(shape, total) + pair * total * (seen + total + held)
    return packed <= PACKING_MARGIN * padded


def first_target(chunk: Sequence[Encoded], all_logits: bool = False) -> int:
    """The batch's first target position, as ``oppu.training._summed_loss`` finds it (at least 1;
    1 with ``all_logits``, where training projects every position onto the vocabulary)."""
    if all_logits:
        return 1
    width = max(len(e.input_ids) for e in chunk)
    firsts = [next((i for i, x in enumerate(e.labels) if x != IGNORE_INDEX), width - 1) for e in chunk]
    return max(min(firsts), 1)


def chunk_shared_prefix(chunk: Sequence[Encoded], min_prefix: int | None = None) -> int:
    """The tokens a training pass over ``chunk`` runs once for all its rows on CPU: those every
    row starts with, short of the first target's logits, if at least ``min_prefix`` (default
    ``MIN_SHARED_PREFIX``); else 0."""
    prefix = min(common_prefix_length([e.input_ids for e in chunk]), first_target(chunk) - 1)
    return prefix if prefix >= (MIN_SHARED_PREFIX if min_prefix is None else min_prefix) else 0


def chunk_train_flops(
    shape: Shape,
    chunk: Sequence[Encoded],
    shared_prefix: bool = True,
    min_prefix: int | None = None,
    all_logits: bool = False,
) -> float:
    """Model FLOPs of one training pass over ``chunk`` as ``oppu.training`` runs it on CPU:
    (``shared_prefix``) the tokens every row starts with once (``chunk_shared_prefix``), the
    projections and attention of every row's own tokens (padding not counted), and the logits
    training computes: at its targets only where the rows behind a shared prefix run packed
    (``packing_pays``; there each row's last token, which predicts nothing, is not run), else at
    every row's positions from the batch's first target on, padded ones included. Recomputation
    by checkpointing and the packed sequence's masked attention are not counted. A LoRA's or
    IA3's passes: no virtual tokens. ``all_logits`` (TrainConfig's): logits at every position
    and no shared prefix."""
    first, width = first_target(chunk, all_logits), max(len(e.input_ids) for e in chunk)
    prefix = chunk_shared_prefix(chunk, min_prefix) if shared_prefix and not all_logits else 0
    lengths = [len(e.input_ids) for e in chunk]
    if prefix and packing_pays(shape, [n - prefix for n in lengths], prefix):
        targets = [sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in chunk]
        return pass_train_flops(shape, [n - 1 for n in lengths], targets, prefix)
    return pass_train_flops(shape, lengths, [width - first + 1] * len(chunk), prefix)


def plan_train_flops(shape: Shape, examples: Sequence[Encoded], cfg: TrainConfig) -> tuple[float, int]:
    """Model FLOPs and optimiser steps of ``oppu.training.train(model, tokenizer, examples, cfg)``
    in one process on CPU: its batch plan, each micro-batch one pass (``chunk_train_flops``). On
    an accelerator training shares only longer prefixes (``oppu.training.min_shared_prefix``), and
    several processes share none: there this counts less than they compute."""
    shared = cfg.shared_prefix and not cfg.gradient_checkpointing and not cfg.all_logits
    steps = batch_plan(len(examples), cfg, [len(e.input_ids) for e in examples])
    total = 0.0
    for step in steps:
        chunk = [examples[i] for i in step]
        for i in range(0, len(chunk), cfg.micro_batch_size):
            micro = chunk[i : i + cfg.micro_batch_size]
            total += chunk_train_flops(shape, micro, shared, cfg.min_shared_prefix, cfg.all_logits)
    return total, len(steps)


def recompute_factor(shape: Shape, length: int, logit_positions: int) -> float:
    """Training FLOPs with gradient checkpointing over those without: every layer's forward runs
    again in the backward pass, up to the last tensor the backward needs. torch's non-reentrant
    checkpoint (transformers' default) stops there, before down_proj, whose output no gradient
    needs; the vocabulary projection is not checkpointed. So 1 + (linear - down + attention) /
    (2 x linear + 3 x attention + 2 x head): x1.37 for a HuffPost example on SmolLM2-135M, where
    a whole forward again would be x1.5 (torch's FLOP counter: x1.374; one H200: x1.36)."""
    linear = linear_flops(shape, length)
    down = shape.layers * shape.hidden * shape.intermediate * length
    attention = attention_flops(shape, length)
    head = shape.hidden * shape.vocab * logit_positions
    return 1.0 + (linear - down + attention) / (2 * linear + 3 * attention + 2 * head)


@dataclass(frozen=True)
class History:
    """One user's personal training as the cost model sees it (averages over the items)."""

    items: int
    tokens: float  # prompt + answer tokens of one training example
    answer_tokens: float  # positions whose logits the loss needs
    prefix: int = 0  # tokens every example of the user starts with (0: no shared prefix)


def user_train_flops(
    shape: Shape,
    history: History,
    *,
    epochs: int,
    batch_size: int,
    min_steps: int = 0,
    padding: float = 0.0,
    recompute: bool = False,
) -> float:
    """Model FLOPs of one user's personal training: ``epochs`` (raised to reach ``min_steps``
    optimiser steps, as OPPU.py does) over the history in batches of ``batch_size``. ``padding``
    is the fraction of computed positions that are padding; ``recompute`` adds gradient
    checkpointing's recomputation (``recompute_factor``)."""
    epochs = epochs_for_min_steps(history.items, batch_size, epochs, min_steps)
    examples = history.items * epochs
    length, answer = round(history.tokens), max(1, round(history.answer_tokens))
    per_batch = batch_train_flops(shape, length, answer + 1, batch_size, min(history.prefix, length - answer))
    flops = per_batch * examples / batch_size / (1.0 - padding)
    return flops * (recompute_factor(shape, length, answer + 1) if recompute else 1.0)


def train_seconds(flops: float, machine: Machine) -> float:
    return flops / (machine.matmul_tflops * 1e12 * machine.efficiency)


def decode_seconds(
    shape: Shape, machine: Machine, *, queries: int, prompt_tokens: float, new_tokens: float, batch: int
) -> float:
    """Greedy decoding of ``queries`` in batches of ``batch``, each answer ``new_tokens`` long.
    Each batch's prompt pass computes the projections of every prompt token and the vocabulary
    projection at each prompt's last position, which gives the first new token (2 FLOPs per
    multiply-add, at ``decode_efficiency`` of the peak). Each of the other new tokens takes a step
    per batch. A prompt pass and a step each cost the largest of reading the products' weights
    once (the projections and the LM head; an embedding lookup reads a row), their compute and
    ``machine.step_seconds``."""
    peak = machine.matmul_tflops * 1e12
    head = shape.hidden * shape.vocab
    step_weights = linear_flops(shape, 1) + head  # multiply-adds of one token = weights of the products
    floor = max(step_weights * machine.bytes_per_param / (machine.memory_gbs * 1e9), machine.step_seconds)
    row_prompt = 2 * (linear_flops(shape, 1) * prompt_tokens + head) / (peak * machine.decode_efficiency)
    rows = [min(batch, queries - start) for start in range(0, queries, batch)]
    prompt = sum(max(row_prompt * n, floor) for n in rows)
    step = max(floor, 2 * step_weights * batch / (peak * machine.decode_efficiency))
    return prompt + len(rows) * max(new_tokens - 1, 0) * step


def lora_parameters(shape: Shape, rank: int, targets: Sequence[str]) -> int:
    """Trainable parameters of a LoRA of ``rank`` on ``targets`` (A: d x r, B: r x out) in every layer."""
    widths = {"d": shape.hidden, "kv": shape.kv}
    unknown = sorted(set(targets) - set(LORA_OUTPUTS))
    if unknown:
        raise ValueError(f"cost model knows LoRA on {sorted(LORA_OUTPUTS)}, not {unknown}")
    per_layer = sum(rank * (shape.hidden + widths[LORA_OUTPUTS[t]]) for t in targets)
    return shape.layers * per_layer


def users_wall_seconds(per_user: Sequence[float], processes: int, load_seconds: float = 0.0) -> float:
    """Wall time of users split over ``processes`` as OPPU.py splits them (runs.split_users:
    costliest first, each to the least loaded process; OPPU.py weighs a user by the characters
    it will train on, here by its predicted seconds): the slowest process, plus loading the
    model once per process."""
    split = split_users(per_user, processes)
    return max(sum(per_user[i] for i in mine) for mine in split) + load_seconds
