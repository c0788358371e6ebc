"""Batched decoding with left padding: greedy by default, the paper's sampling on request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from oppu.training import encode_prompt


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 32
    batch_size: int = 8
    do_sample: bool = False  # the paper sampled (temperature 0.1, top-k 10, top-p 0.9)
    temperature: float = 0.1
    top_k: int = 10
    top_p: float = 0.9


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], cfg: DecodeConfig, desc: str = "generate",
             show: bool = True) -> list[str]:  # fmt: skip
    """Decode every prompt and return only the new text, in the prompts' order.

    Prompts are batched by length (less padding); the tokenizer pads on the left so every
    prompt ends where generation starts.
    """
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
    greedy = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    for batch in tqdm(batches, desc=desc, leave=False, disable=not show):
        ids = [encode_prompt(tokenizer, prompts[i]) for i in batch]
        enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True, padding_side="left").to(device)
        out = model.generate(
            **enc, max_new_tokens=cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **(sampling if cfg.do_sample else greedy),
        )  # fmt: skip
        new = out[:, enc["input_ids"].shape[1] :]
        for i, ids in zip(batch, new):
            outputs[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return outputs
