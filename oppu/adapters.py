"""Adapters: the task LoRA, a user's personal PEFT (LoRA, IA3 or prompt tuning), safetensors
save, merge, and reset."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from utils import UserError

TASK_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama's attention output is o_proj
USER_TARGETS = ("q_proj", "v_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"

PEFT_TYPES = ("lora", "ia3", "prompt_tuning")  # the personal adapter's kind; the task adapter is LoRA
# (IA)^3 rescales keys, values and the feed-forward's inner activations (Liu et al. 2022; peft's
# default for Llama): down_proj is listed as feed-forward so that its *input* is scaled.
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)
# Personal learning rates when --learning_rate is not given (LoRA's follows the model size, see
# oppu/defaults.py). IA3 scales start at 1 and prompt embeddings at word-embedding scale: both
# need much larger steps than LoRA. 3e-3 is T-Few's IA3 rate; 3e-2 that of peft's prompt-tuning
# examples with AdamW (Lester et al. used 0.3 with Adafactor).
PEFT_LEARNING_RATES = {"ia3": 3e-3, "prompt_tuning": 3e-2}
# Prompt tuning starts from the embeddings of this text, repeated to the number of virtual
# tokens: Lester et al. found real word embeddings a better start than random vectors, most of
# all for smaller models.
PROMPT_INIT_TEXT = "Answer the way this user answered their own past items."


def lora_config(args: argparse.Namespace, targets: tuple[str, ...]):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=list(targets),
    )


def add_adapter(model, config):
    """Wrap ``model`` with a new, freshly initialised adapter of ``config`` (only its weights train)."""
    from peft import get_peft_model

    return get_peft_model(model, config)


def user_peft_config(args: argparse.Namespace, targets: tuple[str, ...]):
    """The personal adapter's config for ``args.peft_type``, freshly initialised for each user."""
    if args.peft_type == "lora":
        return lora_config(args, targets)
    if args.peft_type == "ia3":
        from peft import IA3Config

        feedforward = [t for t in targets if t in IA3_FEEDFORWARD]
        return IA3Config(task_type="CAUSAL_LM", target_modules=list(targets), feedforward_modules=feedforward)
    from peft import PromptTuningConfig, PromptTuningInit

    # Always saved as RANDOM: peft's TEXT init loads a tokenizer by name when the adapter is
    # reloaded, which fails for local models; add_user_adapter copies the text's embeddings itself.
    return PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens, prompt_tuning_init=PromptTuningInit.RANDOM
    )


def add_user_adapter(model, tokenizer, args: argparse.Namespace, targets: tuple[str, ...]):
    """Wrap ``model`` with a fresh personal adapter of ``args.peft_type`` (only it trains)."""
    peft_model = add_adapter(model, user_peft_config(args, targets))
    if args.peft_type == "prompt_tuning" and args.prompt_init == "text":
        init_prompt_from_text(peft_model, tokenizer, PROMPT_INIT_TEXT)
    return peft_model


def init_prompt_from_text(peft_model, tokenizer, text: str) -> None:
    """Set the virtual tokens to the word embeddings of ``text``'s tokens, repeated or cut to fit."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = peft_model.active_peft_config.num_virtual_tokens
    ids = (ids * (n // len(ids) + 1))[:n]
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    with torch.no_grad():
        words = peft_model.word_embeddings(torch.tensor(ids, device=embedding.weight.device))
        embedding.weight.copy_(words.to(embedding.weight.dtype))


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def remove_adapter(peft_model):
    """Take the adapter out again and return the untouched base model, ready for the next user."""
    if peft_model.active_peft_config.is_prompt_learning:
        # Prompt tuning never enters the base model's layers (the virtual tokens are prepended
        # to its input), so there is nothing to unload; peft's generate leaves a copy of the
        # model's own method as an instance attribute, which is dropped to hand back the model as it came.
        base = peft_model.base_model
        base.__dict__.pop("prepare_inputs_for_generation", None)
        return base
    return peft_model.unload()


def save_adapter(peft_model, folder: Path) -> None:
    """Save the adapter as safetensors (never pickle), via a temporary folder and one rename."""
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def check_adapter_dir(path: Path) -> None:
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{path}: no task adapter here ({ADAPTER_WEIGHTS} missing); train it with task_LoRA.py")


def merge_adapter(model, path: Path):
    """Load a saved adapter (safetensors only) onto ``model`` and merge it into the weights."""
    from peft import PeftModel

    check_adapter_dir(path)
    return PeftModel.from_pretrained(model, str(path), use_safetensors=True).merge_and_unload()
