"""Stage 1: train the shared task adapter on the queries of all non-test users, then answer
the test users' queries with it (the non-personalized fine-tuned baseline).

Usage:
    python task_LoRA.py --task_name news_categorize --k 0
    python task_LoRA.py --task_name LaMP_2M --k 1 --add_profile --model_name meta-llama/Llama-2-7b-hf --access_token $HF_TOKEN
    accelerate launch --num_processes 2 task_LoRA.py --task_name news_categorize   # data-parallel
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from oppu import cli
from oppu.adapters import ADAPTER_WEIGHTS, TASK_TARGETS, add_adapter, lora_config, save_adapter
from oppu.answers import answer, answer_stats, report_answers
from oppu.data import OTHER_PROFILES_FILE, OTHER_USERS_FILE, User, golds_of, predictions_json
from oppu.examples import query_pairs, query_prompts
from oppu.generation import DecodeConfig
from oppu.modeling import load_model
from oppu.rewriter import REWRITER_DIR, needs_rewriter, rewriter_config, rewriter_dir, train_rewriter
from oppu.runs import (
    CONFIG_FILE,
    PERSONAL_ONLY,
    check_predictions,
    config_differences,
    file_fingerprint,
    public_config,
    task_lora_dir,
    training_config,
)
from oppu.tasks import Task
from oppu.training import encode_pairs, train
from prompts import parse_prediction
from utils import UserError, ensure_writable_dir, read_json, run_cli, set_seed, write_json


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(parser, stage="task_LoRA", target_modules=TASK_TARGETS)
    parser.add_argument(
        "--predict_base", action="store_true", help="also answer the test queries with the base model (no adapter)"
    )
    parser.add_argument(
        "--no_answer",
        action="store_true",
        help="only train (or reuse) the task adapter; do not answer the test queries with it",
    )
    return parser.parse_args(argv)


def predict_users(
    model,
    tokenizer,
    task: Task,
    users: list[User],
    profiles: list,
    k: int,
    decode: DecodeConfig,
    mode: str = "generate",
    retrieval: str = "most",
) -> dict[str, str]:
    """Answer every query of ``users``; returns {query id: parsed prediction} in user order."""
    prompts, ids = [], []
    for user, profile in zip(users, profiles):
        prompts += query_prompts(task, user, k, profile, retrieval)
        ids += [q["id"] for q in user["query"]]
    raw = answer(model, tokenizer, task, prompts, decode, mode, desc="answer test queries")
    return {qid: parse_prediction(task, text) for qid, text in zip(ids, raw)}


def predict_shared(
    accelerator,
    model,
    tokenizer,
    task: Task,
    users: list[User],
    profiles: list,
    k: int,
    decode: DecodeConfig,
    mode: str = "generate",
    retrieval: str = "most",
) -> dict[str, str]:
    """Answer the users' queries with the users split over the processes (user i on process
    i mod N); every process gets all predictions back, in user order."""
    from accelerate.utils import gather_object

    mine = range(accelerator.process_index, len(users), accelerator.num_processes)
    preds = predict_users(
        model, tokenizer, task, [users[i] for i in mine], [profiles[i] for i in mine], k, decode, mode, retrieval
    )
    merged = {qid: out for shard in gather_object([preds]) for qid, out in shard.items()}
    return {q["id"]: merged[q["id"]] for u in users for q in u["query"]}


def adapter_differences(folder: Path, config: dict, project=None) -> list[str] | None:
    """The settings in which the finished adapter in ``folder`` was trained otherwise than
    ``config`` says (empty: the same); None when the folder holds no finished adapter.
    ``project`` maps a saved config to what is compared (the rewriter's: ``rewriter_config``)."""
    if not (folder / ADAPTER_WEIGHTS).is_file() or not (folder / CONFIG_FILE).is_file():
        return None
    old = {k: v for k, v in read_json(folder / CONFIG_FILE).items() if k != "final_loss"}
    old = project(old) if project else old
    return config_differences(training_config(old), public_config(training_config(config)))


def reusable_adapter(folder: Path, config: dict, project=None) -> bool:
    """A finished adapter trained with the same settings can be reused instead of retrained."""
    return adapter_differences(folder, config, project) == []


def check_adapter_folder(folder: Path, config: dict, overwrite: bool) -> None:
    """A finished task adapter trained under other settings is never replaced without
    --overwrite: OPPU runs on it record its hash, and their users would all be trained again."""
    differences = adapter_differences(folder, config)
    if differences and not overwrite:
        saved = read_json(folder / CONFIG_FILE)
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in differences[:4])
        raise UserError(
            f"{folder}: this folder holds a task adapter trained with other settings ({shown}); "
            "use --overwrite to replace it, or another --ckpt_dir"
        )


def ensure_rewriter(
    accelerator, model, tokenizer, task: Task, others: list[User], args, adapter_dir: Path, config: dict
):
    """For a task whose history items hold only the output (tweets): train the rewriter on the
    clean base (oppu/rewriter.py) into the task adapter's folder, unless a finished one of the same
    settings is there or beside another task adapter of the task (then it is copied: a grid's three
    settings share one). ``model`` carries the task adapter and is returned carrying it again."""
    from peft import PeftModel

    folder = rewriter_dir(adapter_dir)
    others_sha256 = file_fingerprint(Path(args.data_dir) / task.name / OTHER_USERS_FILE)
    wanted = rewriter_config(config, others_sha256)
    if reusable_adapter(folder, wanted, rewriter_config) and not args.overwrite:
        print(f"reusing the rewriter in {folder} (same config; --overwrite retrains)")
        return model
    siblings = sorted(p for p in adapter_dir.parent.glob(f"*/{REWRITER_DIR}") if p != folder)
    twin = next((p for p in siblings if reusable_adapter(p, wanted, rewriter_config)), None)
    if twin is not None and not args.overwrite:
        if accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(twin, folder)
        accelerator.wait_for_everyone()
        accelerator.print(
            f"copied the rewriter of {twin.parent.name} (same settings; its prompts hold no k or profile)"
        )
        return model
    rewriter, fit = train_rewriter(model.unload(), tokenizer, task, others, args, accelerator)
    accelerator.print(f"rewriter: {fit.steps} steps, {fit.examples} example passes, final loss {fit.final_loss:.4f}")
    if accelerator.is_main_process:
        save_adapter(rewriter, folder)
        write_json(folder / CONFIG_FILE, public_config(wanted) | {"final_loss": fit.final_loss})
    accelerator.wait_for_everyone()
    return PeftModel.from_pretrained(rewriter.unload(), str(adapter_dir), use_safetensors=True)


def stage_config(args: argparse.Namespace, task: Task, inputs: Sequence[Path]) -> dict:
    """The run's recorded config: the flags (less the personal-training-only ones) and the data's hash."""
    config = {k: v for k, v in vars(args).items() if k not in PERSONAL_ONLY}
    return config | {"task_name": task.name, "stage": "task_LoRA", "data_sha256": file_fingerprint(*inputs)}


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    task, spec = cli.validate(args)
    others, other_profiles = cli.load_other_users(args, task)
    tests, test_profiles = cli.load_test_users(args, task)
    ensure_writable_dir(args.ckpt_dir), ensure_writable_dir(args.output_dir)
    inputs = [Path(args.data_dir) / task.name / OTHER_USERS_FILE]
    if args.add_profile:
        inputs.append(Path(args.data_dir) / task.name / OTHER_PROFILES_FILE)
    config = stage_config(args, task, inputs)
    adapter_dir = task_lora_dir(args.ckpt_dir, task, args.k, args.model_name, args.add_profile)
    check_adapter_folder(adapter_dir, config, args.overwrite)
    pred_file = cli.prediction_file(args, task, "task_LoRA")
    if not args.no_answer:
        check_predictions(pred_file, config, args.overwrite)
    if args.predict_base:
        check_predictions(cli.prediction_file(args, task, "base"), config, args.overwrite)
    decode = cli.decode_config(args, task)

    from accelerate import Accelerator
    from peft import PeftModel

    accelerator = Accelerator()
    set_seed(args.seed)
    model, tokenizer = load_model(spec, accelerator.device)
    cli.check_answer_window(model, args)
    outputs = {"adapter": adapter_dir, "predictions": pred_file}
    if args.predict_base:
        base_file = cli.prediction_file(args, task, "base")
        preds = predict_shared(
            accelerator, model, tokenizer, task, tests, test_profiles, args.k, decode, args.answer_mode, args.retrieval
        )
        if accelerator.is_main_process:
            write_json(base_file, predictions_json(task, preds, f"{args.model_name} (no adapter)"))
            write_json(base_file.with_suffix(".config.json"), public_config(config) | answer_stats(task, preds))
            write_json(base_file.with_suffix(".golds.json"), golds_of(task, tests))
            report_answers(task, preds, base_file, "base model", trained=False)
        outputs["base_predictions"] = base_file

    # The shared adapter trains on the most relevant items whatever --retrieval: a behaviour shift
    # is the test users' (the paper's setting), so "least" only changes how their queries are asked;
    # likewise --answer_mode and the decoding flags: one adapter serves every way of answering.
    adapter_config = training_config(config)
    if reusable_adapter(adapter_dir, adapter_config) and not args.overwrite:
        print(f"reusing the task adapter in {adapter_dir} (same config; --overwrite retrains)")
        model = PeftModel.from_pretrained(model, str(adapter_dir), use_safetensors=True)
    else:
        set_seed(args.seed)  # the adapter's init and dropout: the seed's alone, sampled base answers or not
        model = add_adapter(model, lora_config(args, cli.target_modules(args)))
        pairs = [pair for u, p in zip(others, other_profiles) for pair in query_pairs(task, u, args.k, p)]
        encoded = encode_pairs(tokenizer, pairs, args.cut_off)
        if any(e.truncated for e in encoded):
            accelerator.print(
                f"{sum(e.truncated for e in encoded)} of {len(encoded)} training examples were cut to --cut_off {args.cut_off} tokens"
            )
        result = train(model, tokenizer, encoded, cli.train_config(args), accelerator, desc="task adapter")
        accelerator.print(
            f"task adapter: {result.steps} steps on {len(encoded)} examples, final loss {result.final_loss:.4f}, {result.seconds:.0f}s"
        )
        model = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            save_adapter(model, adapter_dir)
            write_json(adapter_dir / CONFIG_FILE, public_config(adapter_config) | {"final_loss": result.final_loss})
    if needs_rewriter(task):
        model = ensure_rewriter(accelerator, model, tokenizer, task, others, args, adapter_dir, adapter_config)
    if args.no_answer:
        accelerator.wait_for_everyone()
        return {k: v for k, v in outputs.items() if k != "predictions"}
    preds = predict_shared(
        accelerator, model, tokenizer, task, tests, test_profiles, args.k, decode, args.answer_mode, args.retrieval
    )
    if accelerator.is_main_process:
        write_json(pred_file, predictions_json(task, preds, f"{args.model_name} + task adapter"))
        write_json(pred_file.with_suffix(".config.json"), public_config(config) | answer_stats(task, preds))
        write_json(pred_file.with_suffix(".golds.json"), golds_of(task, tests))
        report_answers(task, preds, pred_file, "task adapter")
    accelerator.wait_for_everyone()
    return outputs


if __name__ == "__main__":
    run_cli(main)
