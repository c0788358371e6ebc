"""A user's own PEFT: the self-contained export folder, the identity of what it stacks on, its
model card, training from one user's file, and updates on the history items added since."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from oppu import cli
from oppu.adapters import ADAPTER_WEIGHTS, save_adapter
from oppu.data import TEST_PROFILES_FILE, TEST_USERS_FILE, User, load_profiles, validate_users
from oppu.defaults import epochs_for_min_steps
from oppu.examples import history_pairs
from oppu.modeling import ModelSpec, resolve_model_path, short_name
from oppu.runs import (
    ADDED_SETTINGS,
    CONFIG_FILE,
    config_fingerprint,
    file_fingerprint,
    public_config,
    read_user_result,
    safe_dirname,
    user_result_dir,
)
from oppu.tasks import Task, get_task
from oppu.training import encode_pairs, train
from utils import UserError, read_json, set_seed, stable_seed, write_json

IDENTITY_FILE = "oppu_peft.json"  # identity, training record and updates of one exported PEFT
HISTORY_FILE = "history.json"  # the user's history in the per-user format (readable by --user_file)
CARD_FILE = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_FILE = "oppu_merged_base.json"  # beside a merged base: which base and task adapter it holds
FORMAT = "oppu-peft/1"
# An update trains on every new item plus ceil(F x new) older ones: 0.5 keeps the update's cost
# proportional to the new items (1.5x them, whatever the history's length) while one old item
# per two new ones anchors the task format and the stable part of the taste; new items stay
# two thirds of the update, so a real shift in taste wins (tests/test_ownership.py).
DEFAULT_REPLAY_FRACTION = 0.5
# Config fields that say which network a PEFT fits: a same-named model of another shape is refused.
SIGNATURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def task_adapter_sha(task_lora: Path) -> str:
    """SHA-256 of a task adapter's weights: the identity a personal PEFT stacks on."""
    path = Path(task_lora) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UserError(f"{task_lora}: no task adapter here ({ADAPTER_WEIGHTS} missing)")
    return sha256_file(path)


def base_signature(spec: ModelSpec) -> dict[str, Any]:
    """The base model's shape from its config alone (no weights are loaded)."""
    from transformers import AutoConfig

    merged = Path(spec.name) / MERGED_FILE
    if merged.is_file():
        return read_json(merged)["base_signature"]
    try:
        config = AutoConfig.from_pretrained(
            resolve_model_path(spec.name), token=spec.access_token, trust_remote_code=spec.trust_remote_code
        )
    except OSError as err:
        raise UserError(f"{spec.name}: could not read the model config ({str(err).splitlines()[0]})") from None
    return {key: getattr(config, key, None) for key in SIGNATURE_KEYS}


# --- identity and checks -------------------------------------------------------------------------


def make_identity(
    user_id: str, task: Task, run_config: dict, spec: ModelSpec, task_lora: Path, trained: dict, profile: str | None
) -> dict:
    """Everything a PEFT needs to be used again: what it stacks on, how its prompts are built,
    which history items trained it, and how."""
    settings = {k: v for k, v in public_config(run_config).items() if k not in ("data_dir", "ckpt_dir", "output_dir")}
    return {
        "format": FORMAT,
        "user_id": user_id,
        "task_name": task.name,
        "k": run_config["k"],
        "add_profile": bool(run_config["add_profile"]),
        "profile": profile,
        "base_model": run_config["model_name"],
        "base_signature": base_signature(spec),
        "task_adapter": {"path": str(Path(task_lora).resolve()), "sha256": task_adapter_sha(task_lora)},
        "trained_item_ids": trained.pop("trained_item_ids"),
        "training": trained,
        "settings": settings,
        "updates": [],
    }


def prompt_setting(identity: dict, key: str):
    """A setting of the PEFT's training run (identity first, then its recorded flags, then the
    defaults of runs from before the flag existed)."""
    if key in identity:
        return identity[key]
    return identity["settings"].get(
        key,
        (
            {"retrieval": "most", "history_format": "query", "peft_type": "lora", "answer_mode": "generate"}
            | ADDED_SETTINGS
        ).get(key),
    )


def read_identity(folder: Path) -> dict:
    """The identity of an exported PEFT folder (UserError if it is not one)."""
    path = Path(folder) / IDENTITY_FILE
    if not (Path(folder) / ADAPTER_WEIGHTS).is_file() or not path.is_file():
        raise UserError(f"{folder}: not an exported PEFT ({ADAPTER_WEIGHTS} or {IDENTITY_FILE} missing)")
    identity = read_json(path)
    if not isinstance(identity, dict) or identity.get("format") != FORMAT:
        raise UserError(f"{path}: field 'format' is not {FORMAT!r}")
    return identity


def read_history(folder: Path, identity: dict) -> User:
    """The user's history saved with the PEFT (for retrieval when it was trained with k > 0)."""
    return load_user_file(get_task(identity["task_name"]), Path(folder) / HISTORY_FILE)


def check_base(identity: dict, spec: ModelSpec, where: str) -> None:
    """The base must be the recorded one: same model (short) name and the same shape."""
    want = identity["base_model"]
    if short_name(spec.name) != short_name(want) and not (Path(spec.name) / MERGED_FILE).is_file():
        raise UserError(f"{where}: this PEFT was trained on base model {want!r}, not {spec.name!r}")
    if base_signature(spec) != identity["base_signature"]:
        raise UserError(f"{where}: base model {spec.name!r} has another shape than the PEFT's base {want!r}")


def check_task_adapter(identity: dict, task_lora: Path, where: str) -> None:
    sha = task_adapter_sha(task_lora)
    if sha != identity["task_adapter"]["sha256"]:
        raise UserError(
            f"{where}: task adapter {task_lora} (sha256 {sha[:12]}) is not the one this PEFT was trained on "
            f"({identity['task_adapter']['path']}, sha256 {identity['task_adapter']['sha256'][:12]})"
        )


def check_merged_base(identity: dict, model_dir: Path, where: str) -> None:
    """A merged base (export_user.py --merged_base) must hold the PEFT's base and task adapter."""
    merged = read_json(Path(model_dir) / MERGED_FILE)
    if short_name(merged["base_model"]) != short_name(identity["base_model"]):
        raise UserError(
            f"{where}: merged base {model_dir} holds {merged['base_model']!r}, not {identity['base_model']!r}"
        )
    if merged["task_adapter_sha256"] != identity["task_adapter"]["sha256"]:
        raise UserError(f"{where}: merged base {model_dir} holds another task adapter than this PEFT was trained on")


def same_stack(identities: dict[Path, dict], settings: Sequence[str] = ()) -> dict:
    """Several PEFTs served together must share task, base, task adapter, k, profile use, kind of
    PEFT (which decides how a batch is served) and --cut_off (which cuts every prompt of the
    call), and the training runs' ``settings``
    (e.g. answer_mode, max_new_tokens, which the first PEFT's would otherwise decide for all)."""
    keys = ("task_name", "base_model", "k", "add_profile")
    first_dir, first = next(iter(identities.items()))
    for folder, identity in identities.items():
        for key in keys:
            if identity[key] != first[key]:
                raise UserError(f"{folder}: {key} {identity[key]!r} differs from {first_dir}'s {first[key]!r}")
        if identity["task_adapter"]["sha256"] != first["task_adapter"]["sha256"]:
            raise UserError(f"{folder}: stacks on another task adapter than {first_dir}")
        for key in ("peft_type", "cut_off", *settings):
            mine, theirs = prompt_setting(identity, key), prompt_setting(first, key)
            if mine != theirs:
                hint = f", or give --{key} for all" if key in settings else ""
                raise UserError(
                    f"{folder}: {key} {mine!r} differs from {first_dir}'s {theirs!r}; serve them in separate calls{hint}"
                )
    return first


# --- the export folder ---------------------------------------------------------------------------


def write_export(out: Path, adapter_dir: Path, identity: dict, user: User, overwrite: bool) -> Path:
    """Write (or replace, with ``overwrite``) a self-contained PEFT folder in one rename:
    the adapter files at the top (as vLLM's --lora-modules and PeftModel load them), the
    identity, the user's history and a model card."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; use --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copyfile(Path(adapter_dir) / name, tmp / name)
    write_json(tmp / IDENTITY_FILE, identity)
    write_json(tmp / HISTORY_FILE, [{"user_id": user["user_id"], "profile": user["profile"], "query": []}])
    (tmp / CARD_FILE).write_text(model_card(identity, out.name), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def model_card(identity: dict, folder_name: str) -> str:
    """A short README for the folder: what it is, how it was trained, how to use it."""
    t, a = identity["training"], identity["task_adapter"]
    s = identity["settings"]
    kind = {"lora": "A LoRA", "ia3": "An IA3 adapter", "prompt_tuning": "A prompt-tuning adapter"}
    peft_type = prompt_setting(identity, "peft_type")
    if peft_type == "lora":
        shape = f"LoRA r={s.get('lora_r')}, alpha={s.get('lora_alpha')}, dropout {s.get('lora_dropout')} on "
        shape += f"{s.get('target_modules')}"
    elif peft_type == "ia3":
        shape = f"IA3 on {s.get('target_modules')}"
    else:
        shape = f"prompt tuning, {s.get('num_virtual_tokens')} virtual tokens"
    lines = [
        f"# Personal PEFT of user `{identity['user_id']}` ({identity['task_name']})",
        "",
        f"{kind.get(peft_type, f'A {peft_type} adapter')} trained by OPPU (One PEFT Per User) on this user's history alone. "
        "It stacks on a shared",
        "base: the base model with the task adapter merged in. Keep `history.json` to yourself: a server",
        "needs only `adapter_model.safetensors` and `adapter_config.json`.",
        "",
        "## What it stacks on",
        f"- base model: `{identity['base_model']}`",
        f"- task adapter: `{a['path']}` (sha256 `{a['sha256']}`)",
        f"- prompts: task `{identity['task_name']}`, k={identity['k']} retrieved history items, "
        f"profile {'yes' if identity['add_profile'] else 'no'}",
        "",
        "## How it was trained",
        f"- {t.get('history_items')} history items, {t.get('train_examples')} examples, "
        f"{t.get('steps')} steps, final loss {t.get('final_loss')}, {t.get('seconds')} s",
        f"- {shape}; lr {s.get('learning_rate')}, batch {s.get('batch_size')}, "
        f"{t.get('epochs', s.get('max_epoch'))} epochs, seed {s.get('seed')}",
    ]
    for i, u in enumerate(identity["updates"], 1):
        lines.append(
            f"- update {i}: {len(u['new_item_ids'])} new + {len(u['replayed_item_ids'])} replayed items, "
            f"{u['steps']} steps, {u['seconds']} s"
        )
    lines += [
        "",
        "## How to use it",
        "```bash",
        f'python generate.py --peft {folder_name} --input "..."',
        f"python generate.py --peft {folder_name} --inputs queries.jsonl --output_file preds.json",
        f"python OPPU.py --update --peft_dir {folder_name} --user_file my_history.json --task_name {identity['task_name']}",
        "```",
        "",
    ]
    return "\n".join(lines)


def load_user_file(task: Task, path: Path) -> User:
    """One user in the per-user format: an object, or a list holding exactly one. Queries are
    optional and need no gold."""
    data = read_json(path)
    users = [data] if isinstance(data, dict) else data
    if not isinstance(users, list) or len(users) != 1:
        raise UserError(f"{path}: expected one user (an object or a list of one), got {len(users)} users")
    if isinstance(users[0], dict):
        users = [{"query": []} | users[0]]
    return validate_users(task, users, path, need_gold=False)[0]


def export_from_run(
    run_dir: Path,
    user_id: str,
    out: Path,
    overwrite: bool,
    data_dir: str | None = None,
    access_token: str | None = None,
) -> Path:
    """Export one user's PEFT from a finished OPPU run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: not an OPPU run folder ({CONFIG_FILE} missing)")
    config = read_json(run_dir / CONFIG_FILE)
    task = get_task(config["task_name"])
    folder = Path(data_dir or config["data_dir"]) / task.name
    inputs = [folder / TEST_USERS_FILE] + ([folder / TEST_PROFILES_FILE] if config["add_profile"] else [])
    if file_fingerprint(*inputs) != config.get("data_sha256"):
        raise UserError(f"{inputs[0]}: the data changed since the run (or is missing); pass the run's --data_dir")
    users = [u for u in validate_users(task, read_json(inputs[0]), inputs[0]) if u["user_id"] == user_id]
    if not users:
        raise UserError(f"{inputs[0]}: no user with user_id {user_id!r}")
    user = users[0]
    # under the folder's current settings: an interrupted --overwrite with new ones leaves old results behind
    result = read_user_result(run_dir, user_id, [q["id"] for q in user["query"]], config_fingerprint(config))
    if result is None:
        raise UserError(
            f"{user_result_dir(run_dir, user_id)}: user {user_id!r} has no finished result in this run "
            f"under its settings ({CONFIG_FILE})"
        )
    profile = None
    if config["add_profile"]:
        everyone = validate_users(task, read_json(inputs[0]), inputs[0])
        profile = load_profiles(inputs[1], everyone)[[u["user_id"] for u in everyone].index(user_id)]
    task_lora = Path(config["task_lora"])
    if config.get("task_lora_sha256") not in (None, task_adapter_sha(task_lora)):
        raise UserError(f"{task_lora}: the task adapter changed since the run trained this user")
    trained = _manifest_line(result, user)
    spec = ModelSpec(config["model_name"], access_token=access_token, trust_remote_code=config["trust_remote_code"])
    identity = make_identity(user_id, task, config, spec, task_lora, trained, profile)
    return write_export(out, user_result_dir(run_dir, user_id) / "adapter", identity, user, overwrite)


def _manifest_line(result: dict, user: User) -> dict:
    """The run's manifest line of a user, with the ids of the items it was trained on (runs
    from before they were recorded trained on the whole history)."""
    line = {k: v for k, v in result.items() if k not in ("predictions", "raw_generations")}
    line.setdefault("trained_item_ids", [it["id"] for it in user["profile"]])
    return line


# --- training on your own machine, and updates ---------------------------------------------------


def add_own_args(parser: argparse.ArgumentParser) -> None:
    """OPPU.py's flags for training one user's PEFT from their own file, and updating it."""
    g = parser.add_argument_group("own your PEFT (docs/ownership.md)")
    g.add_argument(
        "--user_file",
        help="train only this user (a per-user-format file holding one user, queries "
        "optional) against --task_lora and write their self-contained PEFT folder",
    )
    g.add_argument("--peft_dir", help="the user's PEFT folder (default <ckpt_dir>/peft/<task_name>/<user>)")
    g.add_argument("--profile_file", help='with --add_profile: the user\'s profile, [{"output": text}]')
    g.add_argument(
        "--update",
        action="store_true",
        help="continue the PEFT in --peft_dir on the history items of "
        "--user_file it was not trained on yet (plus a replay of older ones) instead of retraining",
    )
    g.add_argument(
        "--replay_fraction",
        type=float,
        default=DEFAULT_REPLAY_FRACTION,
        help="--update: replay ceil(F x new items) older items, seeded (default 0.5: one per two new)",
    )


@dataclass
class OwnJob:
    """A checked --user_file run: the user, where the PEFT goes, and what it stacks on."""

    task: Task
    user: User
    profile: str | None
    peft_dir: Path
    task_lora: Path
    identity: dict | None  # the existing PEFT's, for --update


def plan_own(args: argparse.Namespace, task: Task) -> OwnJob:
    """Check a --user_file (and --update) command before any model is loaded."""
    if not args.user_file:
        raise UserError("--update needs --user_file (the user's history, old and new items)")
    user = load_user_file(task, Path(args.user_file))
    peft_dir = Path(args.peft_dir or Path(args.ckpt_dir) / "peft" / task.name / safe_dirname(user["user_id"]))
    if not 0 <= args.replay_fraction:
        raise UserError("--replay_fraction must be >= 0")
    if (Path(args.model_name) / MERGED_FILE).is_file():  # training merges the task adapter itself
        raise UserError(
            f"--model_name {args.model_name}: a merged base (base + task adapter) is for serving; "
            "train on the base model itself, with --task_lora"
        )
    identity = None
    if args.update:
        twice = next((i for i, n in Counter(item["id"] for item in user["profile"]).items() if n > 1), None)
        if twice is not None:  # ids tell new items from trained ones: a repeated one would hide an item
            raise UserError(f"{args.user_file}: history item id {twice!r} appears twice; every item needs its own id")
        identity = read_identity(peft_dir)
        where = str(peft_dir)
        have = {item["id"] for item in user["profile"]}
        missing = [i for i in identity["trained_item_ids"] if i not in have]
        if missing:  # the history is retrieved from and saved as given: new items alone would truncate it
            raise UserError(
                f"{args.user_file}: {len(missing)} of the {len(identity['trained_item_ids'])} history items this "
                f"PEFT was trained on are missing (e.g. {missing[0]!r}); an update reads the whole history, old and new items"
            )
        for key, have in (
            ("task_name", task.name),
            ("k", args.k),
            ("add_profile", args.add_profile),
            ("user_id", user["user_id"]),
            ("peft_type", args.peft_type),
        ):
            if prompt_setting(identity, key) != have:
                raise UserError(
                    f"{where}: this PEFT has {key} {prompt_setting(identity, key)!r}; the command gives {have!r}"
                )
        task_lora = Path(args.task_lora or identity["task_adapter"]["path"])
        check_base(identity, cli.model_spec(args), where)
        check_task_adapter(identity, task_lora, where)
    else:
        if not args.task_lora:
            raise UserError("--user_file needs --task_lora (the task adapter to stack the PEFT on)")
        task_lora = Path(args.task_lora)
        task_adapter_sha(task_lora)
        if peft_dir.exists() and not args.overwrite:
            raise UserError(f"{peft_dir}: already exists; use --overwrite to retrain it, or --update to update it")
    profile = _own_profile(args, user, identity)
    return OwnJob(task, user, profile, peft_dir, task_lora, identity)


def _own_profile(args: argparse.Namespace, user: User, identity: dict | None) -> str | None:
    if not args.add_profile:
        return None
    if args.profile_file:
        return load_profiles(args.profile_file, [user])[0]
    if identity and identity.get("profile"):
        return identity["profile"]
    raise UserError("--add_profile with --user_file needs --profile_file (one {'output': profile} entry)")


def export_trained(job: OwnJob, args: argparse.Namespace, run_dir: Path, result: dict) -> Path:
    """After OPPU.train_user ran on the job's user in ``run_dir``: write the PEFT folder."""
    config = vars(args) | {"task_name": job.task.name, "stage": "OPPU", "task_lora": str(job.task_lora)}
    identity = make_identity(
        job.user["user_id"],
        job.task,
        config,
        cli.model_spec(args),
        job.task_lora,
        _manifest_line(result, job.user),
        job.profile,
    )
    return write_export(
        job.peft_dir, user_result_dir(run_dir, job.user["user_id"]) / "adapter", identity, job.user, overwrite=True
    )


def update_plan(identity: dict, user: User, replay_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(new, replayed) history indices of an update: every item not trained on yet, plus a
    seeded sample of ceil(replay_fraction x new) of the items already trained on."""
    trained = set(identity["trained_item_ids"])
    new = [i for i, item in enumerate(user["profile"]) if item["id"] not in trained]
    old = [i for i, item in enumerate(user["profile"]) if item["id"] in trained]
    count = min(len(old), math.ceil(replay_fraction * len(new)))
    return new, sorted(random.Random(seed).sample(old, count))


def update_peft(model, tokenizer, job: OwnJob, args: argparse.Namespace, inputs: list[str] | None = None) -> dict:
    """Continue the user's PEFT on the new history items plus a replay of older ones, save it
    in place, and record the update (items, steps, seconds) in its identity. ``inputs``: the
    rewriter's input for each history item, for a PEFT trained on them."""
    from peft import PeftModel

    start = time.time()
    identity, user = job.identity, job.user
    seed = stable_seed(args.seed, f"{user['user_id']}#update{len(identity['updates']) + 1}")
    new, replay = update_plan(identity, user, args.replay_fraction, seed)
    if not new:
        raise UserError(
            f"{args.user_file}: no history items since the PEFT was trained (every item id is in its manifest)"
        )
    pairs = history_pairs(
        job.task,
        user,
        identity["k"],
        job.profile,
        prompt_setting(identity, "retrieval"),
        prompt_setting(identity, "history_format"),
        inputs,
    )
    encoded = encode_pairs(tokenizer, [pairs[i] for i in sorted(new + replay)], args.cut_off)
    # The same rule as a first training (oppu/defaults.py): small models get a floor of steps.
    epochs = epochs_for_min_steps(len(encoded), args.batch_size, args.max_epoch, args.min_steps)
    cfg = replace(cli.personal_configs(args, job.task)[0], seed=seed, max_epoch=epochs)
    set_seed(seed)
    peft_model = PeftModel.from_pretrained(model, str(job.peft_dir), is_trainable=True, use_safetensors=True)
    fit = train(peft_model, tokenizer, encoded, cfg, desc=f"update {user['user_id']}")
    record = {
        "new_item_ids": [user["profile"][i]["id"] for i in new],
        "replayed_item_ids": [user["profile"][i]["id"] for i in replay],
        "train_examples": len(encoded),
        "train_tokens": fit.tokens,
        "steps": fit.steps,
        "final_loss": fit.final_loss,
        "seconds": round(time.time() - start, 2),
        "replay_fraction": args.replay_fraction,
        "seed": seed,
        "epochs": epochs,
        "settings": {
            k: getattr(args, k) for k in ("learning_rate", "batch_size", "max_epoch", "min_steps", "max_step")
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    updated = identity | {
        "trained_item_ids": identity["trained_item_ids"] + record["new_item_ids"],
        "updates": identity["updates"] + [record],
        "profile": job.profile,
    }
    staging = job.peft_dir.with_name(f".{job.peft_dir.name}.adapter{os.getpid()}")
    save_adapter(peft_model, staging)
    write_export(job.peft_dir, staging, updated, user, overwrite=True)
    shutil.rmtree(staging, ignore_errors=True)
    return record


def write_merged_base(model, tokenizer, out: Path, spec: ModelSpec, task_lora: Path, overwrite: bool) -> Path:
    """The base with the task adapter merged in (``model``), saved once as a model folder
    (safetensors and tokenizer) that a multi-LoRA server (vLLM --enable-lora) loads as the
    base of every personal PEFT, and that generate.py accepts as --model_name."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; use --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {
        "base_model": spec.name,
        "base_signature": base_signature(spec),
        "task_adapter_path": str(Path(task_lora).resolve()),
        "task_adapter_sha256": task_adapter_sha(task_lora),
    }
    write_json(tmp / MERGED_FILE, record)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
