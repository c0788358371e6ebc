"""Tokenize-and-mask, batching, and the training loop shared by both stages."""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss there
MEGA_BATCH = 50  # length grouping sorts within 50 batches at a time, as the HF Trainer does
LENGTH_JITTER = 0.05  # length grouping sorts by length x [1, 1.05): batches vary between epochs
# A shared prefix costs one extra (batch 1) forward call; below this many tokens it does not pay.
MIN_SHARED_PREFIX = 16
# On a GPU a training step of a 7B model is bound by the CPU's kernel launches, and the extra call
# doubles them: on an H200 (benchmarks/README.md) 16 rows sharing 96 of 128 tokens trained at 0.48x
# the plain path's speed, 192 of 256 at 0.85x, 384 of 512 at 2.09x.
MIN_SHARED_PREFIX_ACCELERATOR = 256


def min_shared_prefix(device: torch.device) -> int:
    """The fewest shared tokens for which training runs them once: on CPU the saved arithmetic
    pays from MIN_SHARED_PREFIX on; on an accelerator only long prefixes pay."""
    return MIN_SHARED_PREFIX if device.type == "cpu" else MIN_SHARED_PREFIX_ACCELERATOR


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # the prompt (or, if it alone was too long, the target) was cut to fit


@dataclass
class TrainConfig:
    """The paper's optimisation settings (REFERENCE.md §1); ``max_step`` -1 means no cap."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 0.3
    batch_size: int = 16
    micro_batch_size: int = 4  # memory knob only: gradients accumulate up to batch_size
    max_epoch: int = 3
    max_step: int = -1
    seed: int = 42
    gradient_checkpointing: bool = False
    # Speed-ups the paper's code does not have; both leave the loss of every example unchanged.
    group_by_length: bool = True  # batches of similar lengths: almost no padding
    shared_prefix: bool = True  # run the tokens every example of a micro-batch starts with once
    min_shared_prefix: int | None = None  # fewest tokens worth sharing; None: min_shared_prefix(device)
    # The paper's release (transformers' causal-LM loss over -100 labels) projects every position
    # onto the vocabulary and throws the prompt's logits away: the same loss at a higher cost.
    # Only for measuring that configuration (benchmarks/release_config.py); it runs no shared prefix.
    all_logits: bool = False
    # With gradient_checkpointing: torch's reentrant checkpoint, as the release had (checkpointing()).
    reentrant_checkpointing: bool = False


@dataclass
class TrainResult:
    steps: int = 0
    examples: int = 0
    tokens: int = 0
    padded_tokens: int = 0  # padding positions the forward passes computed (none in a packed pass)
    shared_prefix_tokens: int = 0  # prompt tokens not recomputed thanks to a shared prefix
    final_loss: float = float("nan")
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def chat_wrap(tokenizer, prompt: str) -> str:
    """The prompt as the model expects it: inside the chat template when the tokenizer has one
    (instruction-tuned models such as the embedded SmolLM2 end at once on raw text), else as is."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, exactly as training and generation both see it."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(chat_wrap(tokenizer, prompt), add_special_tokens=not templated)["input_ids"]


def template_head(tokenizer) -> list[int]:
    """The tokens every prompt starts with, which a truncated prompt keeps: the chat template's
    system turn and the user turn's opening; without a template, the BOS the tokenizer adds, if
    it adds one (Llama-2), else nothing."""
    a, b = encode_prompt(tokenizer, "a"), encode_prompt(tokenizer, "b")
    return a[: common_prefix_length([a, b])]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], cut_off: int) -> list[Encoded]:
    """Tokenize-and-mask every (prompt, target) pair."""
    return [tokenize_and_mask(tokenizer, prompt, target, cut_off) for prompt, target in pairs]


@functools.lru_cache(maxsize=16)  # asked for every example; a tokenizer's answer does not change
def marks_word_start(tokenizer) -> bool:
    """Whether the tokenizer marks a word's start itself on text it is given alone, as
    SentencePiece does (Llama-2: "a" is "▁a", and "b" then "a" tokenized apart are "b a"
    tokenized whole). A target tokenized alone then needs no leading space: with it, every
    target would start with a lone "▁" that the prompt and its answer tokenized together never
    have. Byte-level BPE (GPT-2, SmolLM2) and character tokenizers keep the space as it is."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return ids("b") + ids("a") == ids("b a")


def tokenize_and_mask(tokenizer, prompt: str, target: str, cut_off: int) -> Encoded:
    """Prompt tokens labelled -100, then the target and EOS, which carry the loss.

    Longer than ``cut_off`` tokens: the prompt loses its oldest text first (the profile and
    retrieved items come before the query), behind the chat template's opening turns, which stay
    when the budget holds them (``template_head``); only a target longer than the whole budget is
    cut, keeping at least one prompt token. Either way ``truncated`` is set so callers can report it.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None) or marks_word_start(tokenizer):
        target = target.lstrip()  # the assistant turn starts on a fresh line; or the tokenizer adds the space
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    overflow = len(prompt_ids) + len(target_ids) - cut_off
    truncated = overflow > 0
    if truncated:
        keep_target = min(len(target_ids), cut_off - 1)
        target_ids = target_ids[:keep_target]
        prompt_ids = fit_prompt(tokenizer, prompt_ids, cut_off - keep_target)
    return Encoded(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids, truncated)


def fit_prompt(tokenizer, prompt_ids: list[int], budget: int) -> list[int]:
    """A prompt's token ids cut to ``budget`` (>= 1) tokens, oldest text first: the chat
    template's opening turns (``template_head``) stay when the budget holds them, then the
    prompt's last tokens (the query and the assistant turn's opening)."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    head = template_head(tokenizer)
    head = head if len(head) < budget and prompt_ids[: len(head)] == head else []
    return head + prompt_ids[len(head) :][-(budget - len(head)) :]


def encode_prompts(tokenizer, prompts: Sequence[str], budget: int | None, report: bool = True) -> list[list[int]]:
    """Every test prompt's token ids (``encode_prompt``), each cut to ``budget`` tokens as
    ``fit_prompt`` cuts them (None: uncut); with ``report``, how many were cut is written to stderr."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if budget is None:
        return encoded
    cut = sum(len(ids) > budget for ids in encoded)
    if cut and report:
        print(
            f"note: {cut} of {len(encoded)} prompts were cut to {budget} tokens (the cut-off less the answer's room)",
            file=sys.stderr,
        )
    return [fit_prompt(tokenizer, ids, budget) for ids in encoded]


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batch_plan(n_examples: int, cfg: TrainConfig, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Example indices of every optimiser step: a seeded shuffle per epoch, cut at max_step.

    With ``lengths`` and ``cfg.group_by_length`` each epoch's shuffle is cut into mega-batches of
    ``MEGA_BATCH`` batches, each sorted by length (longest first) and cut into batches, and the
    epoch's batches are shuffled again: batches hold examples of similar length (little padding).
    Two things keep it from favouring some examples over epochs:

    - the sort key is the length times a random factor in [1, 1 + LENGTH_JITTER), drawn anew each
      epoch, so which examples meet in a batch changes between epochs among examples of about
      the same length (a plain sort gives a history smaller than a mega-batch the same batches
      every epoch);
    - a mega-batch's partial batch (its size modulo the batch size) takes random examples, not
      the shortest ones: each step's loss is a mean over its batch's target tokens, so the
      examples of a small batch weigh more, and always the same ones would for the whole run.

    Either way every example is used once per epoch.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = []
    for _ in range(cfg.max_epoch):
        order = torch.randperm(n_examples, generator=gen).tolist()
        if lengths is None or not cfg.group_by_length:
            steps += [order[i : i + cfg.batch_size] for i in range(0, n_examples, cfg.batch_size)]
            continue
        jitter = (1 + LENGTH_JITTER * torch.rand(n_examples, generator=gen)).tolist()
        mega = MEGA_BATCH * cfg.batch_size
        epoch = []
        for start in range(0, n_examples, mega):
            chunk = order[start : start + mega]  # in shuffled order
            spill = len(chunk) % cfg.batch_size
            rest = sorted(chunk[spill:], key=lambda i: -lengths[i] * jitter[i])
            epoch += [rest[i : i + cfg.batch_size] for i in range(0, len(rest), cfg.batch_size)]
            epoch += [chunk[:spill]] if spill else []
        steps += [epoch[i] for i in torch.randperm(len(epoch), generator=gen).tolist()]
    return steps if cfg.max_step < 0 else steps[: cfg.max_step]


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Leading tokens all sequences share, leaving each at least one token of its own (its last
    position must run: its logits predict the next token)."""
    if len(sequences) < 2:
        return 0
    first, limit = sequences[0], min(len(s) for s in sequences) - 1
    for n in range(limit):
        if any(s[n] != first[n] for s in sequences[1:]):
            return n
    return max(limit, 0)


def prompt_tuned(model) -> bool:
    """Whether the model is under a prompt-tuning adapter, whose virtual tokens peft puts before
    every input (plain models, LoRA and IA3 change only what happens inside the layers)."""
    config = getattr(model, "active_peft_config", None)
    return config is not None and config.peft_type == "PROMPT_TUNING"


def virtual_tokens(model) -> int:
    """How many virtual tokens a prompt-tuning adapter puts before every input (0: none)."""
    return model.active_peft_config.num_virtual_tokens if prompt_tuned(model) else 0


def attention_window(model) -> int | None:
    """The sliding attention window of the model's windowed layers (Mistral, Gemma, Qwen2 with
    ``use_sliding_window``); None where every layer attends to every earlier token."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def shares_prefix(model, length: int) -> bool:
    """Whether sequences of up to ``length`` positions may run a shared prefix once. The prefix's
    keys and values are handed on as a full-attention cache and packed passes mask only what a
    token may not see in its own row, so a sliding window shorter than the sequence would be lost:
    such models run every row whole."""
    window = attention_window(model)
    return window is None or length < window


def virtual_prompt(model) -> torch.Tensor | None:
    """The (1, V, d) virtual tokens of a prompt-tuning adapter; None for every other model."""
    return model.get_prompt(batch_size=1) if prompt_tuned(model) else None


@dataclass
class Prefix:
    """What every row starts with, run once (batch 1); see ``run_prefix``."""

    model: object  # runs the rest of each row (the base, under a prompt-tuning adapter)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), batch 1
    virtual: int  # virtual tokens of a prompt-tuning adapter ahead of the text
    last_logits: torch.Tensor  # (vocabulary,): predicts the token after the prefix

    def cache(self, rows: int):
        """A cache holding the prefix for ``rows`` rows. expand() copies nothing; the cache's
        first concatenation does, and backward sums the rows' gradients into the prefix's."""
        from transformers import DynamicCache

        return DynamicCache(
            ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.kv]
        )


def run_prefix(model, prefix_ids: torch.Tensor) -> Prefix:
    """Run what every row starts with once (batch 1): a prompt-tuning adapter's virtual tokens, if
    any, then ``prefix_ids`` (1, P; P may be 0 behind virtual tokens). Under a prompt-tuning
    adapter the rest runs on the base model: the virtual tokens are in the cache now and must not
    be prepended again. Nothing is detached, so gradients flow into the prefix. A model with a
    ``run_prefix`` method of its own (serving.RowAdapters: an adapter per row) runs it its way."""
    if hasattr(model, "run_prefix"):
        return model.run_prefix(prefix_ids)
    virtual = virtual_prompt(model)
    if virtual is None:
        out = model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1)
        return Prefix(model, [(k, v) for k, v, *_ in out.cache], 0, out.logits[0, -1])
    core = model.get_base_model()
    words = core.get_input_embeddings()(prefix_ids)
    out = core(inputs_embeds=torch.cat([virtual.to(words.dtype), words], dim=1), use_cache=True, logits_to_keep=1)
    return Prefix(core, [(k, v) for k, v, *_ in out.cache], virtual.size(1), out.logits[0, -1])


def packed_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], held: int
) -> tuple[list[int], list[int], torch.Tensor, list[list[list[int]]]]:
    """One sequence holding every prompt's own tokens and every answer behind it, for one forward
    pass behind ``held`` cached positions (virtual tokens and shared text) that all of it sees.

    ``rows`` are (the prompt's tokens behind the cache, each answer's tokens and EOS). An answer's
    last token predicts nothing, so it is left out. Returns the token ids, their position ids, the
    boolean mask (tokens, held + tokens): a prompt's token sees the cache and its own prompt's
    earlier tokens, an answer's token the cache, its prompt and its own earlier tokens; and, per
    prompt and answer, the packed indices whose logits predict the answer's tokens in turn."""
    ids: list[int] = []
    positions: list[int] = []
    block: list[int] = []  # every prompt and every answer is a block of its own
    owner: list[int] = []  # the prompt block each token sees besides its own
    where: list[list[list[int]]] = []
    for rest, tails in rows:
        if not rest:
            raise ValueError("every prompt needs a token of its own behind the cached prefix")
        prompt_block, last = len(where) + sum(len(w) for w in where), len(ids) + len(rest) - 1
        ids += rest
        positions += range(held, held + len(rest))
        block += [prompt_block] * len(rest)
        owner += [prompt_block] * len(rest)
        per_answer = []
        for n, tail in enumerate(tails, 1):
            body = list(tail[:-1])
            per_answer.append([last, *range(len(ids), len(ids) + len(body))])
            ids += body
            positions += range(held + len(rest), held + len(rest) + len(body))
            block += [prompt_block + n] * len(body)
            owner += [prompt_block] * len(body)
        where.append(per_answer)
    b, o, p = torch.tensor(block), torch.tensor(owner), torch.tensor(positions)
    sees = (p[:, None] >= p[None, :]) & ((b[:, None] == b[None, :]) | (o[:, None] == b[None, :]))
    return ids, positions, torch.cat([torch.ones(len(ids), held, dtype=torch.bool), sees], dim=1), where


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: may attend) as the additive one eager attention adds to the
    scores (sdpa takes either form)."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def forward_shared_prefix(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: int, logits_to_keep: int
) -> torch.Tensor:
    """The model's logits for a batch whose rows all start with the same ``prefix`` tokens: the
    prefix runs once (batch 1) and its keys and values are broadcast to every row. Nothing is
    detached: a LoRA on q or v changes the prefix's keys and values, so its gradient must flow.
    A prompt-tuning adapter's virtual tokens join the prefix, exactly as peft prepends them."""
    rows = input_ids.size(0)
    head = run_prefix(model, input_ids[:1, :prefix])
    start, end = head.virtual + prefix, head.virtual + input_ids.size(1)
    positions = torch.arange(start, end, device=input_ids.device).unsqueeze(0)
    if head.virtual:
        attention_mask = torch.cat([attention_mask.new_ones(rows, head.virtual), attention_mask], dim=1)
    out = head.model(
        input_ids=input_ids[:, prefix:],
        attention_mask=attention_mask,
        position_ids=positions,
        cache=head.cache(rows),
        logits_to_keep=logits_to_keep,
    )
    return out.logits


def packed_shared_loss(model, batch: dict[str, torch.Tensor], prefix: int) -> torch.Tensor:
    """``_summed_loss`` of a right-padded batch whose rows all start with the same ``prefix``
    tokens, with no padding computed, in one forward pass: the prefix once, then every row's own
    tokens (``packed_rows``, the prefix as the prompt and the rows as its answers: each row sees
    the prefix and its own earlier tokens, at the positions it has in its row; a row's last
    token, which predicts nothing, is left out), and logits only where a row has a target. A
    prompt-tuning adapter's virtual tokens run first (``run_prefix``) and everything sees them.
    The same loss and gradients as the padded pass, up to float rounding (tested); LoRA dropout
    draws its masks over other shapes, so a run with dropout differs from the padded pass's as
    two seeds do."""
    ids, labels = batch["input_ids"], batch["labels"]
    # no logits predict the prefix's tokens, nor the first token behind it: a target there is lost
    if (labels[:, : prefix + 1] != IGNORE_INDEX).any():
        raise ValueError(
            f"a target token lies within the first {prefix + 1} tokens: the shared prefix must end before it"
        )
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    rows = [ids[r, prefix:n].tolist() for r, n in enumerate(lengths)]
    head = run_prefix(model, ids[:1, :0]) if prompt_tuned(model) else None  # the virtual tokens alone
    held = head.virtual if head else 0
    if prefix:
        tokens, positions, mask, where = packed_rows([(ids[0, :prefix].tolist(), rows)], held)
        predicts = where[0]  # per row, the positions whose logits predict its tokens in turn
    else:  # only virtual tokens are shared: each row, less its last token, is a block of its own
        own = [row[:-1] or row for row in rows]
        tokens, positions, mask, _ = packed_rows([(row, []) for row in own], held)
        starts = [sum(len(r) for r in own[:i]) for i in range(len(own))]
        # a row's first token has no target (checked above): nothing predicts it (-1, never kept)
        predicts = [[-1, *range(s, s + len(row) - 1)] for s, row in zip(starts, rows)]
    keep, targets = [], []
    for row_labels, at in zip(labels.tolist(), predicts):
        for t, i in enumerate(at):
            if row_labels[prefix + t] != IGNORE_INDEX:
                keep.append(i)
                targets.append(row_labels[prefix + t])
    device, dtype = ids.device, next(model.parameters()).dtype
    out = (head.model if head else model)(
        input_ids=torch.tensor([tokens], device=device),
        attention_mask=additive_mask(mask, dtype)[None, None].to(device),
        position_ids=torch.tensor([positions], device=device),
        cache=head.cache(1) if head else None,
        use_cache=bool(head),
        logits_to_keep=torch.tensor(keep, device=device, dtype=torch.long),
    )
    target = torch.tensor(targets, device=device, dtype=torch.long)
    return torch.nn.functional.cross_entropy(out.logits[0].float(), target, reduction="sum")


def packs(model, attention_mask: torch.Tensor, prefix: int) -> bool:
    """Whether ``_summed_loss`` runs a shared ``prefix`` and the rows behind it packed into one
    pass (``packed_shared_loss``): on CPU (only CPU was measured), where ``oppu.cost.packing_pays``
    finds it costs no more FLOPs than the padded rows, for models whose config gives the cost
    model its shape (Llama-like: else the padded pass). A prompt-tuning adapter's virtual tokens
    are positions every token sees and none computes."""
    from oppu.cost import Shape, packing_pays

    if attention_mask.device.type != "cpu":
        return False
    try:
        shape = Shape.from_config(model.config)
    except AttributeError:  # e.g. a config without intermediate_size or num_key_value_heads
        return False
    virtual = virtual_tokens(model)
    return packing_pays(shape, [n - prefix for n in attention_mask.sum(dim=1).tolist()], prefix, cached=virtual)


def _summed_loss(
    model,
    batch: dict[str, torch.Tensor],
    prefix: int | None = 0,
    min_prefix: int | None = None,
    pack: bool | None = None,
    all_logits: bool = False,
) -> tuple[torch.Tensor, int, int]:
    """Sum of token losses (so micro-batches add up to the same gradient as one big batch), how
    many of the ``prefix`` tokens all rows share were run once (0: none), and how many padding
    positions the pass computed. ``prefix`` None asks for the plain forward; a prefix too short
    to pay is not shared, but a prompt-tuning adapter's virtual tokens still run once for the
    batch.

    Logits are computed only from the first target position on: the vocabulary projection of
    every prompt token would be thrown away, and for a small model it is a fifth of the work.
    ``all_logits`` computes them at every position (and shares no prefix), as the paper's release did.

    Where a prefix runs once on CPU, it and the rows behind it run packed into one pass without
    padding (``packed_shared_loss``) when that costs no more FLOPs (``packs``: the packed
    sequence's attention spans every row's tokens); ``pack`` True or False decides instead.
    """
    labels = batch["labels"]
    has_target = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    first = 1 if all_logits else max(int(has_target[0]) if len(has_target) else labels.size(1) - 1, 1)
    keep = labels.size(1) - first + 1  # logits at positions first-1 .. end predict tokens first .. end
    shared = prefix is not None
    prefix = min(prefix or 0, first - 1)  # the logits at first - 1 are needed: the suffix must hold it
    least = min_shared_prefix(labels.device) if min_prefix is None else min_prefix
    prefix = prefix if prefix >= least else 0
    padding = batch["attention_mask"].numel() - int(batch["attention_mask"].sum())
    virtual = virtual_tokens(model)
    windowed = not shares_prefix(model, labels.size(1) + virtual)  # every row whole
    prefix = 0 if windowed else prefix
    if shared and not windowed and (prefix or virtual):
        if pack is None:
            pack = packs(model, batch["attention_mask"], prefix)
        if pack:
            return packed_shared_loss(model, batch, prefix), prefix, 0
        logits = forward_shared_prefix(model, batch["input_ids"], batch["attention_mask"], prefix, keep)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, first:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, prefix, padding


def checkpointing(model, on: bool, reentrant: bool = False) -> None:
    """transformers' activation (gradient) checkpointing on or off, under its current name where
    the installed release has it: the old name warns at every call from transformers 5.x on.
    ``reentrant``: torch's reentrant checkpoint, which runs a layer's whole forward again in the
    backward pass, where the non-reentrant one (transformers 5's default) stops at the last tensor
    the backward needs; the paper's release (transformers and torch 2.0.1 of early 2024) had it."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        kwargs = {f"{prefix}_checkpointing_kwargs": {"use_reentrant": reentrant}}
        getattr(model, f"{prefix}_checkpointing_enable")(**kwargs)
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


def loss_denominator(step_tokens: int, processes: int) -> float:
    """What each process divides its summed token loss by, so that the gradient the processes
    average (DDP divides their sum by their number) is the whole step's mean over its
    ``step_tokens`` target tokens, as one process computes it, however unevenly the step's
    tokens fall on the processes (the HF Trainer's ``average_tokens_across_devices``). One
    process: its own target tokens."""
    return max(step_tokens, 1) / processes


def train(
    model, tokenizer, examples: Sequence[Encoded], cfg: TrainConfig, accelerator=None, desc: str = "train"
) -> TrainResult:
    """Train the model's trainable parameters with AdamW, linear warmup and decay, and
    gradient-norm clipping. Under an ``accelerate`` launch (``accelerator`` given) each step's
    batch is split across processes and gradients are averaged, as the HF Trainer does."""
    from transformers import get_linear_schedule_with_warmup

    start = time.time()
    plan = batch_plan(len(examples), cfg, [len(e.input_ids) for e in examples])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * len(plan))
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, max(len(plan), 1))
    if len(plan) == 1 and warmup:  # as the HF Trainer's schedule: its one step runs at learning rate 0
        print(f"note: {desc}: 1 optimiser step, all of it warm-up: the weights do not change", file=sys.stderr)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if cfg.gradient_checkpointing:  # before prepare: the DDP wrapper does not have the method
        checkpointing(model, True, cfg.reentrant_checkpointing)
    if accelerator:
        model, optimizer = accelerator.prepare(model, optimizer)
    device = next(model.parameters()).device
    # A cache passed through checkpointed layers would be appended to again on recomputation, and
    # DDP allows one forward call per backward: the prefix is run once only without either.
    share_prefix = cfg.shared_prefix and not cfg.gradient_checkpointing and world == 1 and not cfg.all_logits
    model.train()
    result = TrainResult(steps=len(plan))
    bar = tqdm(plan, desc=desc, leave=False, disable=rank != 0)
    for step in bar:
        mine = [examples[i] for i in step[rank::world]]
        n_tokens = sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in mine)
        n_step = n_tokens
        if accelerator and world > 1:  # every process's target tokens: the step's loss is their mean
            n_step = int(accelerator.reduce(torch.tensor(n_tokens, device=accelerator.device), reduction="sum"))
        denominator = loss_denominator(n_step, world)
        # A process left without examples in a short last step still joins the gradient
        # all-reduce, with one example weighted zero; skipping it would hang the others.
        weight = 1.0 if mine else 0.0
        work = mine or [examples[step[0]]]
        micro = [work[i : i + cfg.micro_batch_size] for i in range(0, len(work), cfg.micro_batch_size)]
        total = 0.0
        for m, chunk in enumerate(micro):
            batch = {k: v.to(device) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
            sync = nullcontext() if not accelerator or m == len(micro) - 1 else accelerator.no_sync(model)
            with sync:
                common = common_prefix_length([e.input_ids for e in chunk]) if share_prefix else None
                summed, prefix, padding = _summed_loss(
                    model, batch, common, cfg.min_shared_prefix, all_logits=cfg.all_logits
                )
                loss = weight * summed / denominator
                accelerator.backward(loss) if accelerator else loss.backward()
            total += weight * summed.item() / max(n_tokens, 1)  # shown and recorded: this process's mean
            result.padded_tokens += padding
            result.shared_prefix_tokens += prefix * (len(chunk) - 1)
        if accelerator:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(total)
        result.examples += len(mine)
        result.tokens += sum(len(e.input_ids) for e in mine)
        bar.set_postfix(loss=f"{total:.3f}")
    if cfg.gradient_checkpointing:
        checkpointing(accelerator.unwrap_model(model) if accelerator else model, False)
    model.eval()
    result.final_loss = result.losses[-1] if result.losses else float("nan")
    result.seconds = time.time() - start
    return result
