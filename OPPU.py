"""Stage 2: merge the task adapter into the base model, then for every test user train a fresh
personal LoRA on that user's history alone, save it, and answer the user's queries with it.

Usage:
    python OPPU.py --task_name news_categorize --k 0 --task_lora ckpt/news_categorize/k0-news_categorize-SmolLM2-135M-Instruct-task_LoRA_ckpt
    accelerate launch --num_processes 2 OPPU.py --task_name news_categorize --task_lora PATH   # users split over GPUs
    python OPPU.py --task_name news_categorize --task_lora PATH --peft_type ia3 --ckpt_dir ckpt_ia3 --output_dir output_ia3   # or prompt_tuning

A killed run resumes: rerun the same command and finished users are skipped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from oppu import cli, ownership
from oppu.adapters import (
    ADAPTER_WEIGHTS,
    USER_TARGETS,
    add_user_adapter,
    check_adapter_dir,
    merge_adapter,
    remove_adapter,
    save_adapter,
    trainable_parameters,
)
from oppu.analysis import read_manifest
from oppu.answers import answer, answer_stats, invalid_fraction, report_answers
from oppu.data import TEST_PROFILES_FILE, TEST_USERS_FILE, User, golds_of, predictions_json
from oppu.defaults import epochs_for_min_steps
from oppu.examples import history_pairs, query_prompts
from oppu.modeling import load_model
from oppu.rewriter import check_rewriter, rewrite_histories
from oppu.runs import (
    CONFIG_FILE,
    PERSONAL_ANSWER_ONLY,
    RunLock,
    check_or_save_config,
    check_predictions,
    clean_stale_staging,
    commit_user_result,
    config_fingerprint,
    file_fingerprint,
    oppu_dir,
    public_config,
    read_user_result,
    reuse_mismatch,
    split_users,
    staging_dir,
    user_result_dir,
    wait_for_users,
)
from oppu.tasks import Task
from oppu.training import Encoded, TrainConfig, encode_pairs, train
from prompts import parse_prediction
from utils import (
    UserError,
    atomic_write_text,
    ensure_writable_dir,
    read_json,
    run_cli,
    set_seed,
    stable_seed,
    write_json,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task_lora",
        help="the task adapter folder written by task_LoRA.py (required, except with --update, which defaults "
        "to the one the PEFT was trained on)",
    )
    cli.add_common_args(parser, stage="OPPU", target_modules=USER_TARGETS)
    cli.add_personal_args(parser)
    ownership.add_own_args(parser)
    args = parser.parse_args(argv)
    cli.resolve_personal_args(args)
    return args


def check_task_lora(path: Path, args: argparse.Namespace, task: Task) -> None:
    """The task adapter must exist and have been trained for this task on this base model."""
    check_adapter_dir(path)
    if not (path / CONFIG_FILE).is_file():
        return
    trained = read_json(path / CONFIG_FILE)
    for key, want in (("model_name", args.model_name), ("task_name", task.name)):
        if trained.get(key) not in (None, want):
            raise UserError(f"{path}: task adapter was trained with {key} {trained[key]!r}, not {want!r}")


def answer_user(peft_model, tokenizer, task: Task, user: User, profile: str | None, args: argparse.Namespace) -> dict:
    """A user's queries answered with their PEFT: the result fields it fills (the parsed
    predictions, the raw generations and the share of invalid answers)."""
    _, decode_cfg = cli.personal_configs(args, task)
    prompts = query_prompts(task, user, args.k, profile, args.retrieval)
    raw = answer(peft_model, tokenizer, task, prompts, decode_cfg, args.answer_mode, show=False)
    predictions = {q["id"]: parse_prediction(task, text) for q, text in zip(user["query"], raw)}
    return {
        "invalid_fraction": invalid_fraction(task, predictions),
        "predictions": predictions,
        "raw_generations": {q["id"]: text for q, text in zip(user["query"], raw)},
    }


def user_training(
    tokenizer, task: Task, user: User, profile: str | None, args: argparse.Namespace, inputs: list[str] | None = None
) -> tuple[list[Encoded], TrainConfig]:
    """What a user's personal training runs on: the user's history as encoded examples (with
    ``args.k`` retrieved items, the profile, ``inputs`` as in ``train_user``) and the training
    settings, seeded per user, with the epochs raised to reach ``--min_steps``."""
    pairs = history_pairs(task, user, args.k, profile, args.retrieval, args.history_format, inputs)
    encoded = encode_pairs(tokenizer, pairs, args.cut_off)
    epochs = epochs_for_min_steps(len(encoded), args.batch_size, args.max_epoch, args.min_steps)
    train_cfg, _ = cli.personal_configs(args, task)
    return encoded, replace(train_cfg, seed=stable_seed(args.seed, user["user_id"]), max_epoch=epochs)


def train_user(
    model,
    tokenizer,
    task: Task,
    user: User,
    profile: str | None,
    args: argparse.Namespace,
    run_dir: Path,
    fingerprint: str = "",
    inputs: list[str] | None = None,
    launch: str | None = None,
) -> tuple[object, dict]:
    """One user: a fresh personal adapter (--peft_type) on the clean merged model, trained on this user's history only,
    saved, and used to answer the user's queries. ``inputs``: the rewriter's input for each history
    item (oppu/rewriter.py), else the items' own. Returns the clean model and the result."""
    start = time.time()
    seed = stable_seed(args.seed, user["user_id"])
    set_seed(seed)
    peft_model = add_user_adapter(model, tokenizer, args, cli.target_modules(args))
    encoded, cfg = user_training(tokenizer, task, user, profile, args, inputs)
    fit = train(peft_model, tokenizer, encoded, cfg, desc=f"user {user['user_id']}")
    trained = time.time()
    answers = answer_user(peft_model, tokenizer, task, user, profile, args)
    answered = time.time()
    staging = staging_dir(run_dir, user["user_id"])
    save_adapter(peft_model, staging / "adapter")
    result = {
        "user_id": user["user_id"],
        "history_items": len(user["profile"]),
        "train_examples": len(encoded),
        **({"history_inputs": inputs} if inputs is not None else {}),  # the rewriter's
        "trained_item_ids": [item["id"] for item in user["profile"]],
        "peft_type": args.peft_type,
        "trainable_params": trainable_parameters(peft_model),
        "adapter_bytes": (staging / "adapter" / ADAPTER_WEIGHTS).stat().st_size,
        "train_tokens": fit.tokens,
        "truncated_examples": sum(e.truncated for e in encoded),
        "epochs": cfg.max_epoch,
        "steps": fit.steps,
        "final_loss": fit.final_loss,
        "losses": [round(x, 4) for x in fit.losses],  # training loss per optimiser step
        "seconds": round(time.time() - start, 2),  # all of it: adapter, data, training, answering, saving
        "train_seconds": round(trained - start, 2),  # a fresh adapter, the user's examples and training
        "answer_seconds": round(answered - trained, 2),
        "config": fingerprint,
        **({"launch": launch} if launch else {}),
        **answers,
    }
    commit_user_result(run_dir, user["user_id"], staging, result)
    return remove_adapter(peft_model), result


def reused_source(args: argparse.Namespace, config: dict, run_dir: Path) -> tuple[Path, str] | None:
    """--reuse_adapters: (the run folder, its results' fingerprint) when its PEFTs were trained
    under this run's settings (answer-only ones aside); None, with a note, when they were not,
    and every user is trained."""
    if not args.reuse_adapters:
        return None
    source = Path(args.reuse_adapters)
    if not (source / CONFIG_FILE).is_file():
        raise UserError(f"--reuse_adapters {source}: no OPPU run here ({CONFIG_FILE} missing)")
    if source.resolve() == run_dir.resolve():
        raise UserError(f"--reuse_adapters {source}: that is this run's own folder; give the finished run's")
    theirs = read_json(source / CONFIG_FILE)
    key = reuse_mismatch(public_config(config), theirs)
    if key is not None:
        print(
            f"note: --reuse_adapters {source}: its PEFTs were trained with {key} {theirs.get(key)!r}, not "
            f"{config.get(key)!r} (only {', '.join(sorted(PERSONAL_ANSWER_ONLY))} may differ); training every user"
        )
        return None
    return source, config_fingerprint(theirs)


def answer_with_saved(
    model,
    tokenizer,
    task: Task,
    user: User,
    profile: str | None,
    args: argparse.Namespace,
    run_dir: Path,
    fingerprint: str,
    source: Path,
    trained: dict,
    launch: str | None = None,
) -> tuple[object, dict]:
    """One user whose PEFT another run trained under the same settings (``trained``: its result):
    load it, answer this run's way, and record its training figures with the new answers."""
    from peft import PeftModel

    start = time.time()
    set_seed(stable_seed(args.seed, user["user_id"]))  # sampling: seeded, though not the trained run's stream
    staging = staging_dir(run_dir, user["user_id"])
    # copied first and loaded from the copy: the saved PEFT and the answers cannot come apart
    shutil.copytree(user_result_dir(source, user["user_id"]) / "adapter", staging / "adapter")
    peft_model = PeftModel.from_pretrained(model, str(staging / "adapter"), use_safetensors=True)
    peft_model.eval()
    loaded = time.time()
    answers = answer_user(peft_model, tokenizer, task, user, profile, args)
    result = trained | {
        "source_seconds": trained.get("source_seconds", trained["seconds"]),  # training and answering there
        "seconds": round(time.time() - start, 2),  # this run's own: loading the PEFT and answering
        "answer_seconds": round(time.time() - loaded, 2),  # this run's answering (train_seconds: the source's)
        "adapter_from": str(source),
        "config": fingerprint,
        **({"launch": launch} if launch else {}),
        **answers,
    }
    commit_user_result(run_dir, user["user_id"], staging, result)
    return remove_adapter(peft_model), result


def merge_outputs(
    run_dir: Path, task: Task, users: list[User], pred_file: Path, model_name: str, fingerprint: str
) -> dict[str, str]:
    """Gather every user's result, in user order, into the predictions file and the run's
    manifest (which also keeps the lines of users that only other calls answered)."""
    results = [read_user_result(run_dir, u["user_id"], [q["id"] for q in u["query"]], fingerprint) for u in users]
    missing = [u["user_id"] for u, r in zip(users, results) if r is None]
    if missing:
        raise RuntimeError(f"{run_dir}: {len(missing)} users have no result (first: {missing[:3]})")
    preds = {qid: out for r in results for qid, out in r["predictions"].items()}
    write_json(pred_file, predictions_json(task, preds, f"{model_name} + task adapter + OPPU"))
    # users of other calls into this run folder (another --user_stride, say) keep their lines, if
    # made under this run's settings (not an earlier config's, replaced by --overwrite)
    path = run_dir / "manifest.jsonl"
    mine = {u["user_id"] for u in users}
    manifest = [m for uid, m in read_manifest(path).items() if uid not in mine and m.get("config") == fingerprint]
    manifest += [{k: v for k, v in r.items() if k not in ("predictions", "raw_generations", "launch")} for r in results]
    atomic_write_text(path, "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in manifest))
    return preds


def train_own(args: argparse.Namespace, task: Task, spec) -> dict[str, Path]:
    """--user_file: one user's PEFT from their own file alone, trained as in a full run and
    written as a self-contained folder; with --update, their PEFT continued on the new items."""
    job = ownership.plan_own(args, task)
    model, tokenizer = load_model(spec)
    inputs = None
    mode = ownership.prompt_setting(job.identity, "history_inputs") if args.update else args.history_inputs
    if mode == "rewriter":  # on the clean base, before the task adapter is merged
        model, rewrites = rewrite_histories(model, tokenizer, task, [job.user], job.task_lora)
        inputs = rewrites[job.user["user_id"]]
    model = merge_adapter(model, job.task_lora)
    if args.update:
        done = ownership.update_peft(model, tokenizer, job, args, inputs)
        items = f"{len(done['new_item_ids'])} new + {len(done['replayed_item_ids'])} replayed items"
        print(f"updated {job.peft_dir}: {items}, {done['steps']} steps, {done['seconds']} s")
        return {"peft_dir": job.peft_dir, "update": done}
    with tempfile.TemporaryDirectory(prefix=".oppu-user-", dir=ensure_writable_dir(job.peft_dir.parent)) as work:
        _, result = train_user(model, tokenizer, task, job.user, job.profile, args, Path(work), inputs=inputs)
        ownership.export_trained(job, args, Path(work), result)
    print(f"wrote the PEFT of user {job.user['user_id']} to {job.peft_dir}")
    return {"peft_dir": job.peft_dir, "result": result}


def reusable(source: tuple[Path, str] | None, user: User) -> dict | None:
    """The result of the --reuse_adapters run (``source``: its folder and fingerprint) for this
    user when its PEFT can answer here; else None (the user trains)."""
    if source is None:
        return None
    return read_user_result(source[0], user["user_id"], [q["id"] for q in user["query"]], source[1])


def finished(run_dir: Path, user: User, fingerprint: str) -> bool:
    """Whether the user already has a result under these settings."""
    return read_user_result(run_dir, user["user_id"], [q["id"] for q in user["query"]], fingerprint) is not None


def user_cost(user: User, args: argparse.Namespace) -> float:
    """A user's share of the run, for splitting users over processes: the characters of their
    history items times the epochs they will be trained for, plus their queries' characters."""
    text = sum(len(str(v)) for item in user["profile"] for v in item.values())
    epochs = epochs_for_min_steps(len(user["profile"]), args.batch_size, args.max_epoch, args.min_steps)
    return text * epochs + sum(len(str(q.get("input", ""))) for q in user["query"])


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    task, spec = cli.validate(args)
    if args.user_file or args.update:
        return train_own(args, task, spec)
    if not args.task_lora:
        raise UserError("--task_lora is required: the task adapter folder written by task_LoRA.py")
    check_task_lora(Path(args.task_lora), args, task)
    users, profiles = cli.load_test_users(args, task)
    run_dir = oppu_dir(args.ckpt_dir, task, args.k, args.model_name, args.add_profile)
    pred_file = cli.prediction_file(args, task, "OPPU")
    ensure_writable_dir(run_dir), ensure_writable_dir(pred_file.parent)
    inputs = [Path(args.data_dir) / task.name / TEST_USERS_FILE]
    if args.add_profile:
        inputs.append(Path(args.data_dir) / task.name / TEST_PROFILES_FILE)
    config = vars(args) | {"task_name": task.name, "stage": "OPPU", "data_sha256": file_fingerprint(*inputs)}
    config["task_lora_sha256"] = ownership.task_adapter_sha(Path(args.task_lora))  # a retrained one invalidates results
    if args.history_inputs == "rewriter":
        config["rewriter_sha256"] = ownership.sha256_file(check_rewriter(args.task_lora) / ADAPTER_WEIGHTS)
    fingerprint = config_fingerprint(config)
    check_predictions(pred_file, config, args.overwrite)
    source = reused_source(args, config, run_dir)

    from accelerate import Accelerator

    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    launch = None  # under --overwrite, results an earlier launch left must not count as done
    if args.overwrite and world > 1:
        from accelerate.utils import broadcast_object_list

        launch = broadcast_object_list([uuid.uuid4().hex])[0]  # the main process's, for every rank
    with RunLock(run_dir, rank):
        check_or_save_config(run_dir, config, args.overwrite)
        clean_stale_staging(run_dir)
        model, tokenizer = load_model(spec, accelerator.device)
        cli.check_answer_window(model, args)
        mine = split_users([user_cost(u, args) for u in users], world)[rank]
        rewrites: dict[str, list[str]] = {}
        if args.history_inputs == "rewriter":  # on the clean base, before the task adapter is merged
            todo = [
                u
                for u in (users[i] for i in mine)
                if (args.overwrite or not finished(run_dir, u, fingerprint)) and not reusable(source, u)
            ]  # the users this call trains: a reused PEFT only answers
            model, rewrites = rewrite_histories(model, tokenizer, task, todo, args.task_lora)
        model = merge_adapter(model, Path(args.task_lora))
        done = reused = 0
        bar = tqdm(mine, desc=f"OPPU users (process {rank})", position=rank)
        for i in bar:
            user = users[i]
            if not args.overwrite and finished(run_dir, user, fingerprint):
                continue
            trained = reusable(source, user)
            if trained is not None:
                model, result = answer_with_saved(
                    model, tokenizer, task, user, profiles[i], args, run_dir, fingerprint, source[0], trained, launch
                )
                reused += 1
            else:
                inputs = rewrites.get(user["user_id"])
                model, result = train_user(
                    model, tokenizer, task, user, profiles[i], args, run_dir, fingerprint, inputs, launch
                )
                done += 1
            bar.set_postfix(user=user["user_id"], loss=f"{result['final_loss']:.3f}")
        reuse_note = f", answered {reused} with the PEFTs of {source[0]}" if source else ""
        print(f"process {rank}: trained {done} users{reuse_note}, skipped {len(mine) - done - reused} finished ones")
        if world > 1:
            wait_for_users(run_dir, users, fingerprint, launch=launch)  # not a barrier: the split can be unbalanced
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            preds = merge_outputs(run_dir, task, users, pred_file, args.model_name, fingerprint)
            write_json(pred_file.with_suffix(".config.json"), public_config(config) | answer_stats(task, preds))
            write_json(pred_file.with_suffix(".golds.json"), golds_of(task, users))
            report_answers(task, preds, pred_file, "OPPU")
        accelerator.wait_for_everyone()  # every process returns once the predictions are written
    return {"run_dir": run_dir, "predictions": pred_file}


if __name__ == "__main__":
    run_cli(main)
