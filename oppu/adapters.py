"""LoRA adapters: the task adapter's and a user's configs, safetensors save, merge, and reset."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from utils import UserError

TASK_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama's attention output is o_proj
USER_TARGETS = ("q_proj", "v_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(args: argparse.Namespace, targets: tuple[str, ...]):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      bias="none", task_type="CAUSAL_LM", target_modules=list(targets))  # fmt: skip


def add_adapter(model, config):
    """Wrap ``model`` with a new, freshly initialised LoRA (only its weights train)."""
    from peft import get_peft_model

    return get_peft_model(model, config)


def remove_adapter(peft_model):
    """Take the LoRA layers out again and return the untouched base model, ready for the next user."""
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
