"""Inputs for history items that hold only the user's output (LaMP-7: a tweet and nothing else).

A tweet history item asked as a query would be (paraphrase this tweet: T) -> T: a personal adapter
trained on such pairs learns to copy its input, and a query's input is a neutral paraphrase, so it
answers the paraphrase back. The queries of the task adapter's users pair a neutral input with the
user's tweet; read in reverse they teach a **rewriter** (a LoRA on the base model, trained in stage 1
beside the task adapter) to write a tweet's neutral input, as back-translation does. Its rewrite of
each history tweet becomes that item's input, so the personal adapter learns what the user adds.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from oppu.adapters import ADAPTER_WEIGHTS
from oppu.data import User
from oppu.examples import rewrite_pairs, rewrite_prompts
from oppu.generation import DecodeConfig, generate
from oppu.tasks import Task
from oppu.training import encode_pairs
from prompts import parse_prediction
from utils import UserError, read_json

REWRITER_DIR = "rewriter"  # inside the task adapter's folder
# The rewriter's greedy decoding, the same whatever the queries are answered with: up to 128 new
# tokens (a LaMP-7 tweet is capped at 280 characters, about 70 tokens), 8 items at a time.
REWRITE_TOKENS = 128
REWRITE_BATCH = 8
# The task adapter's prompt settings: the rewriter's own prompts hold no retrieved item and no
# profile, so the rewriters beside the k=0, k=1 and profile task adapters are the same weights.
PROMPT_ONLY = ("k", "add_profile", "retrieval")


def rewriter_dir(task_lora: str | Path) -> Path:
    return Path(task_lora) / REWRITER_DIR


def rewriter_config(adapter_config: dict, others_sha256: str | None = None) -> dict:
    """What determines the rewriter: the task adapter's config less its prompt settings, with the
    hash of the other users' file alone (a profile task adapter's hash also covers profiles);
    without ``others_sha256`` (a saved rewriter's config) the config's own hash is kept."""
    kept = {k: v for k, v in adapter_config.items() if k not in PROMPT_ONLY}
    return kept | ({"data_sha256": others_sha256} if others_sha256 else {})


def needs_rewriter(task: Task) -> bool:
    """Whether stage 1 trains a rewriter for ``task``: its history items hold no input."""
    return not task.history_has_input


def check_rewriter(task_lora: str | Path) -> Path:
    folder = rewriter_dir(task_lora)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise UserError(
            f"{folder}: no rewriter here ({ADAPTER_WEIGHTS} missing); task_LoRA.py trains it beside the task "
            "adapter (rerun it), or pass --history_inputs item to train on the items as they are"
        )
    return folder


def train_rewriter(model, tokenizer, task: Task, users: Sequence[User], args: argparse.Namespace, accelerator=None):
    """A fresh LoRA on ``model`` (the clean base) trained on the users' queries in reverse (gold
    output -> the query's neutral text), with the task adapter's settings. Returns the PEFT model
    and the training result."""
    from oppu import cli
    from oppu.adapters import add_adapter, lora_config
    from oppu.training import train
    from utils import set_seed, stable_seed

    # its own seed: the same rewriter whether the task adapter was just trained or reused
    set_seed(stable_seed(args.seed, "rewriter"))
    peft_model = add_adapter(model, lora_config(args, cli.target_modules(args)))
    encoded = encode_pairs(tokenizer, rewrite_pairs(task, users), args.cut_off)
    fit = train(peft_model, tokenizer, encoded, cli.train_config(args), accelerator, desc="rewriter")
    return (accelerator.unwrap_model(peft_model) if accelerator else peft_model), fit


def rewrite_decoding(cut_off: int | None, max_new_tokens: int = REWRITE_TOKENS) -> DecodeConfig:
    """The rewriter's greedy decoding under the ``cut_off`` it was trained with (its saved
    config's; OPPU's own --cut_off may differ): a prompt keeps ``cut_off`` less the answer's tokens,
    and the answer at most half of ``cut_off``, so a small cut_off still leaves a prompt."""
    new = max_new_tokens if cut_off is None else max(1, min(max_new_tokens, cut_off // 2))
    return DecodeConfig(max_new_tokens=new, batch_size=REWRITE_BATCH, cut_off=cut_off)


def rewrite_histories(
    model,
    tokenizer,
    task: Task,
    users: Sequence[User],
    task_lora: str | Path,
    max_new_tokens: int = REWRITE_TOKENS,
):
    """Every history item's input written by the rewriter in ``task_lora`` loaded on ``model``
    (the clean base: call it before the task adapter is merged), greedy, each user's items in
    batched passes of their own, each prompt cut as the rewriter's training examples were (``rewrite_decoding``).
    Returns (the clean model, {user id: one input per item}); an empty rewrite keeps the item's
    own text."""
    from peft import PeftModel

    jobs = [(user, i) for user in users for i in range(len(user["profile"]))]
    inputs = {u["user_id"]: [str(item[task.text_field]) for item in u["profile"]] for u in users}
    if not jobs:
        return model, inputs
    folder = check_rewriter(task_lora)
    peft_model = PeftModel.from_pretrained(model, str(folder), use_safetensors=True)
    peft_model.eval()
    prompts = {u["user_id"]: rewrite_prompts(task, u) for u in users}
    # its own decoding, not the queries': an answer's --max_new_tokens or batch would change the
    # personal training data
    decode = rewrite_decoding(read_json(folder / "run_config.json").get("cut_off"), max_new_tokens)
    # user by user: a user's rewrites (their PEFT's training data) must not depend on which other
    # users share the call (length batches, the shared prefix), so that 1 or N processes and a
    # resumed run give the same
    raw = [
        text
        for u in tqdm(users, desc="rewrite history", leave=False)
        for text in generate(peft_model, tokenizer, prompts[u["user_id"]], decode, show=False)
    ]
    empty = 0
    for (user, i), text in zip(jobs, raw):
        rewrite = parse_prediction(task, text)
        empty += not rewrite
        inputs[user["user_id"]][i] = rewrite or inputs[user["user_id"]][i]
    if empty:
        print(f"rewriter: {empty} of {len(jobs)} rewrites came out empty; those items keep their own text")
    return peft_model.unload(), inputs
