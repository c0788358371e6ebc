"""Training defaults by model size: the paper's values for 7B-class models, and values that
work for small models such as the embedded 135M SmolLM2 (evidence: docs/defaults.md)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from oppu.modeling import EMBEDDED_MODEL, ModelSpec, resolve_model_path
from oppu.tasks import get_task

# Below this many parameters the paper's values (tuned for Llama-2-7b) leave LoRA untrained.
SMALL_MODEL_PARAMS = 1_000_000_000
EMBEDDED_PARAMS = 134_515_008  # SmolLM2-135M: 30 layers, hidden 576, 49,152 tied embeddings


@dataclass(frozen=True)
class Defaults:
    learning_rate: float
    batch_size: int
    task_epochs: int  # task adapter (task_LoRA.py)
    user_epochs: int  # personal adapters (OPPU.py)
    min_steps: int  # personal adapters: more epochs until a user gets at least this many steps
    micro_batch_size: int  # examples per forward pass; gradients accumulate up to batch_size


# REFERENCE.md §1: AdamW lr 1e-4, batch 16, 3 epochs (task) / 2 epochs (user), no step floor.
# Micro-batches of 4 keep a 7B model's activations small on one GPU.
PAPER = Defaults(learning_rate=1e-4, batch_size=16, task_epochs=3, user_epochs=2, min_steps=0, micro_batch_size=4)
# Small models: lr 1e-4 never teaches a 135M model the answer format (invalid answers on every
# rating query); 1e-3 does. Batch 8 and a floor of 24 steps give short histories enough updates
# (at batch 16 x 2 epochs a 12-item history gets 2 steps). See docs/defaults.md. A whole batch
# in one forward pass: the shared prefix runs once per step, not once per micro-batch (demo news
# data, 2 threads: 4.13 against 5.14 s a step for the task adapter, 3.48 against 5.72 for a
# personal LoRA; benchmarks/README.md, "Profile of the demo's news step").
SMALL = Defaults(learning_rate=1e-3, batch_size=8, task_epochs=3, user_epochs=2, min_steps=24, micro_batch_size=8)
# Tasks whose personal adapters need a higher floor with small models. Tweets: on validation users
# (demo seed 1, 4 users x 4 queries), OPPU's ROUGE-1 was 0.685 at 24 steps, below the task
# adapter's 0.700, and 0.882 at 48; at 24 the adapters end at a loss of 0.65 to 1.20, writing
# hashtags of their own beside the user's (docs/defaults.md, "Tweets").
SMALL_TASK_MIN_STEPS = {"tweet_paraphrase": 48}


def estimate_parameters(config) -> int:
    """Parameters of a decoder-only transformer from its config (embeddings, attention, MLP)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
    mlp = 3 * h * getattr(config, "intermediate_size", 4 * h)
    embeddings = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return layers * (attention + mlp) + embeddings


def model_parameters(spec: ModelSpec) -> int | None:
    """The model's size from its config alone (no weights loaded); None when it can't be read."""
    if spec.name == EMBEDDED_MODEL:
        return EMBEDDED_PARAMS
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            resolve_model_path(spec.name), token=spec.access_token, trust_remote_code=spec.trust_remote_code
        )
        return estimate_parameters(config)
    except (OSError, ValueError, AttributeError):
        return None


def defaults_for(parameters: int | None, paper: bool = False) -> Defaults:
    """The paper's values for large (or unknown) models and with ``paper``, else SMALL."""
    if paper or parameters is None or parameters >= SMALL_MODEL_PARAMS:
        return PAPER
    return SMALL


def resolve_training_defaults(args: argparse.Namespace, stage: str, parameters: int | None) -> dict:
    """Fill the training flags left unset (None) from the defaults for this model size, in
    place, and return what was chosen and why (printed at start and saved in run_config.json)."""
    chosen = defaults_for(parameters, args.paper_defaults)
    min_steps = chosen.min_steps
    if chosen is SMALL:
        min_steps = SMALL_TASK_MIN_STEPS.get(get_task(args.task_name).name, min_steps)
    values = {
        "learning_rate": chosen.learning_rate,
        "batch_size": chosen.batch_size,
        "max_epoch": chosen.task_epochs if stage == "task_LoRA" else chosen.user_epochs,
        "min_steps": 0 if stage == "task_LoRA" else min_steps,
        "micro_batch_size": chosen.micro_batch_size,
    }
    for name, value in values.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return {"defaults": "paper" if chosen is PAPER else "small-model", "model_parameters": parameters}


def epochs_for_min_steps(n_examples: int, batch_size: int, max_epoch: int, min_steps: int) -> int:
    """At least ``max_epoch`` epochs, more when needed to reach ``min_steps`` optimiser steps."""
    per_epoch = max(math.ceil(n_examples / batch_size), 1)
    return max(max_epoch, math.ceil(min_steps / per_epoch))
