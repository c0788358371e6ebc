"""Batched decoding with left padding: greedy by default, the paper's sampling on request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from oppu.training import (
    MIN_SHARED_PREFIX,
    Prefix,
    common_prefix_length,
    encode_prompts,
    prompt_tuned,
    run_prefix,
    shares_prefix,
    virtual_tokens,
)


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 32
    batch_size: int = 8
    do_sample: bool = False  # the paper sampled (temperature 0.1, top-k 10, top-p 0.9)
    temperature: float = 0.1
    top_k: int = 10
    top_p: float = 0.9
    shared_prefix: bool = True  # run the prompts' common first tokens once, reuse their keys/values
    # Off for prompt tuning through peft's own path (--no_shared_prefix): peft 0.21 looks for the
    # cache under its transformers 4 name, misses it under transformers 5, and prepends the
    # virtual tokens again at every new token.
    use_cache: bool = True
    cut_off: int | None = None  # a prompt and its answer fit in this many tokens (--cut_off); None: uncut

    def prompt_budget(self, answer_tokens: int) -> int | None:
        """The tokens a prompt may keep so that an answer of ``answer_tokens`` still fits."""
        return None if self.cut_off is None else max(1, self.cut_off - answer_tokens)


def with_prefix(enc: dict[str, torch.Tensor], prefix_ids: list[int], prefix: Prefix, first_ids: list[int]) -> dict:
    """generate() inputs for left-padded suffixes behind a cached prefix: [prefix | pads | suffix].
    Positions come from the attention mask's running count, so every suffix continues at the
    prefix's length exactly as in the plain left-padded batch, and pads are masked out. The
    virtual tokens of a prompt-tuning adapter lead the prefix; they are in the cache only, so
    their ids are placeholders (generate() feeds only the tokens behind the cache): each row's
    own first token, so that a repetition penalty, which looks at which tokens a row holds, sees
    no token the prompt does not have."""
    rows, device = enc["input_ids"].size(0), enc["input_ids"].device
    virtual = torch.tensor(first_ids, device=device, dtype=torch.long).unsqueeze(1).expand(-1, prefix.virtual)
    text = torch.tensor([prefix_ids], device=device, dtype=torch.long).expand(rows, -1)
    ids = torch.cat([virtual, text], dim=1)
    # generate() appends to the cache by concatenation, so the shared tensors stay untouched.
    return {
        "input_ids": torch.cat([ids, enc["input_ids"]], dim=1),
        "attention_mask": torch.cat([torch.ones_like(ids), enc["attention_mask"]], dim=1),
        "cache": prefix.cache(rows),
    }


def prompt_ids(tokenizer, prompts: Sequence[str], cfg: DecodeConfig, report: bool = True) -> list[list[int]]:
    """The token ids generate() decodes behind: each prompt's, cut to ``cfg.cut_off`` less the
    answer's ``max_new_tokens`` (``report``: say how many were cut)."""
    return encode_prompts(tokenizer, prompts, cfg.prompt_budget(cfg.max_new_tokens), report)


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[str], cfg: DecodeConfig, desc: str = "generate", show: bool = True
) -> list[str]:
    """Decode every prompt and return only the new text, in the prompts' order.

    Prompts are batched by length (less padding); the tokenizer pads on the left so every
    prompt ends where generation starts. A prompt longer than ``cfg.cut_off`` less the answer's
    ``max_new_tokens`` loses its oldest text first, as a training example does. With ``cfg.shared_prefix`` the tokens all prompts
    start with (chat template, instruction, label list) run once for the whole call.
    """
    if not prompts:  # e.g. a user file with a history and no queries
        return []
    encoded = prompt_ids(tokenizer, prompts, cfg)
    # by length in tokens; equal lengths keep the prompts' order (oppu.serving.RowAdapters relies on it)
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    # a shared prefix is a cache: without one (use_cache False) every prompt runs whole
    longest = max(len(e) for e in encoded) + cfg.max_new_tokens + virtual_tokens(model)
    sharing = cfg.shared_prefix and cfg.use_cache and shares_prefix(model, longest)
    shared = common_prefix_length(encoded) if sharing else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    # A prompt-tuning adapter's virtual tokens always run once, ahead of whatever text is shared.
    cached = bool(shared) or (sharing and prompt_tuned(model))
    if prompt_tuned(model) and not cached:  # peft's own path: no cache, one prompt at a time (cli.personal_configs)
        cfg = replace(cfg, use_cache=False, batch_size=1)
    device = next(model.parameters()).device
    prefix = run_prefix(model, torch.tensor([encoded[0][:shared]], device=device, dtype=torch.long)) if cached else None
    decoder = prefix.model if prefix else model
    outputs: list[str] = [""] * len(prompts)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
    greedy = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    for batch in tqdm(batches, desc=desc, leave=False, disable=not show):
        ids = [encoded[i][shared:] for i in batch]
        enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True, padding_side="left").to(device)
        if prefix:
            enc = with_prefix(enc, encoded[0][:shared], prefix, [encoded[i][0] for i in batch])
        out = decoder.generate(
            **enc,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=cfg.use_cache,
            **(sampling if cfg.do_sample else greedy),
        )
        new = out[:, enc["input_ids"].shape[1] :]
        for i, ids in zip(batch, new):
            outputs[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return outputs
