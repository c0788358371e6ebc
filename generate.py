"""Answer with exported personal PEFTs: one input, a file of inputs, or many users' inputs at once
(batched across users, each row with its own user's PEFT; at most --max_loaded_adapters in memory).

Usage:
    python generate.py --peft my_peft --input "Which category does this article relate to ... article: ..."
    python generate.py --peft my_peft --inputs queries.jsonl --output_file preds.json    # lines {"id", "input"}
    python generate.py --inputs requests.jsonl --output_file preds.json                  # lines {"id", "input", "peft"}
    python generate.py --peft my_peft --model_name merged_base --input "..."             # export_user.py --merged_base

The base model and the task adapter default to the ones the PEFT records; either is checked
(name and shape; SHA-256 of the task adapter's weights) and a mismatch is refused. Prompts are
built as in training: retrieval from the user's own history when the PEFT was trained with k > 0,
the profile when it was trained with one. Greedy unless --do_sample (the paper's sampling).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from oppu import cli, ownership, serving
from oppu.answers import ANSWER_MODES
from oppu.data import predictions_json
from oppu.modeling import ModelSpec, check_spec
from oppu.runs import ADDED_SETTINGS
from oppu.tasks import get_task
from prompts import parse_prediction
from utils import UserError, read_jsonl, run_cli, set_seed, write_json


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("what to answer")
    g.add_argument("--peft", help="an exported PEFT folder (export_user.py, OPPU.py --user_file)")
    g.add_argument("--input", help="one query input, answered on stdout")
    g.add_argument(
        "--inputs", help='a JSON-lines file of {"id", "input"}, each line optionally with its own "peft" folder'
    )
    g.add_argument("--output_file", help="with --inputs: predictions in the LaMP outputs format (config beside it)")
    g.add_argument(
        "--max_loaded_adapters", type=int, default=8, help="PEFTs kept in memory at once (least recently used leave)"
    )
    g.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    g = parser.add_argument_group("model (default: what the PEFT records)")
    g.add_argument("--model_name", help="the base model, or a merged base written by export_user.py --merged_base")
    g.add_argument("--task_lora", help="the task adapter folder (its SHA-256 must match the PEFT's record)")
    cli.add_loading_args(g)
    g = parser.add_argument_group("decoding (greedy unless --do_sample)")
    g.add_argument("--answer_mode", choices=ANSWER_MODES, default=None, help="default: the PEFT's training run's")
    g.add_argument("--max_new_tokens", type=int, default=None, help="default: the PEFT's training run's")
    g.add_argument("--decode_batch_size", type=int, default=None, help="default: the PEFT's training run's")
    g.add_argument(
        "--no_shared_prefix",
        dest="shared_prefix",
        action="store_false",
        help="recompute the prompts' common prefix for every prompt",
    )
    g.add_argument("--do_sample", action="store_true", help="sample as the paper did")
    g.add_argument("--temperature", type=float, default=0.1)
    g.add_argument("--top_k", type=int, default=10)
    g.add_argument("--top_p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def read_requests(args: argparse.Namespace) -> list[serving.Request]:
    """The (id, PEFT folder, input) to answer, checked before any model is loaded."""
    if (args.input is None) == (args.inputs is None):
        raise UserError("give exactly one of --input TEXT or --inputs FILE.jsonl")
    if args.input is not None:
        if not args.peft:
            raise UserError("--input needs --peft (the exported PEFT folder to answer with)")
        return [serving.Request("input", Path(args.peft), args.input)]
    requests, seen = [], set()
    for n, line in enumerate(read_jsonl(args.inputs), 1):
        where = f"{args.inputs}: line {n}"
        if not isinstance(line, dict) or not isinstance(line.get("input"), str) or "id" not in line:
            raise UserError(f"{where}: expected an object with 'id' and 'input' (a string)")
        if str(line["id"]) in seen:
            raise UserError(f"{where}: duplicate id {line['id']!r}")
        seen.add(str(line["id"]))
        folder = line.get("peft", args.peft)
        if not folder:
            raise UserError(f"{where}: no 'peft' folder on this line and no --peft")
        requests.append(serving.Request(str(line["id"]), Path(folder), line["input"]))
    if not requests:
        raise UserError(f"{args.inputs}: no inputs")
    return requests


def decode_settings(args: argparse.Namespace, stack: dict):
    """Decoding as the PEFT's run decoded (its length, batch and --cut_off, the rules of its kind of PEFT),
    with this command's sampling flags."""
    task = get_task(stack["task_name"])
    # a PEFT exported before a setting existed ran at the value that setting adds (runs.ADDED_SETTINGS)
    run = {"max_new_tokens": None, "decode_batch_size": 8, "cut_off": None} | ADDED_SETTINGS | stack["settings"]
    given = {k: getattr(args, k) for k in ("max_new_tokens", "decode_batch_size") if getattr(args, k) is not None}
    flags = {k: getattr(args, k) for k in ("shared_prefix", "do_sample", "temperature", "top_k", "top_p")}
    merged = argparse.Namespace(**(run | given | flags))
    merged.peft_type = ownership.prompt_setting(stack, "peft_type")
    return cli.personal_configs(merged, task)[1]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.load_in_4bit:  # the PEFTs' task adapter is merged into the base
        raise UserError(cli.NO_4BIT_MERGE)
    if args.max_loaded_adapters < 1 or (args.decode_batch_size or 1) < 1:
        raise UserError("--max_loaded_adapters and --decode_batch_size must be >= 1")
    problems = cli.decoding_problems(args)
    if problems:
        raise UserError("; ".join(problems))
    if args.output_file and args.inputs is None:
        raise UserError("--output_file needs --inputs")
    requests = read_requests(args)
    identities = {folder: ownership.read_identity(folder) for folder in dict.fromkeys(r.peft for r in requests)}
    # how each PEFT's run answered, unless this command says it for all
    unsaid = [k for k in ("answer_mode", "max_new_tokens") if getattr(args, k) is None]
    stack = ownership.same_stack(identities, unsaid)
    task = get_task(stack["task_name"])
    cli.check_answer_mode(args.answer_mode, task)
    spec = ModelSpec(
        args.model_name or stack["base_model"], args.dtype, args.load_in_4bit, args.access_token, args.trust_remote_code
    )
    check_spec(spec)
    decode = decode_settings(args, stack)
    model, tokenizer = serving.load_serving_model(stack, spec, args.task_lora, str(requests[0].peft))
    set_seed(args.seed)
    raw, pool = serving.answer(
        model, tokenizer, requests, identities, decode, args.max_loaded_adapters, args.answer_mode
    )
    preds = {r.id: parse_prediction(task, text) for r, text in zip(requests, raw)}
    if args.output_file:
        write_json(args.output_file, predictions_json(task, preds, f"{spec.name} + task adapter + personal PEFT"))
        config = {k: v for k, v in vars(args).items() if k not in ("access_token", "debug")}
        write_json(Path(args.output_file).with_suffix(".config.json"), config | {"pefts": [str(p) for p in identities]})
    else:
        for rid, pred in preds.items():
            print(pred if args.input is not None else f"{rid}\t{pred}")
    print(
        f"answered {len(requests)} inputs of {len(identities)} users ({pool.loads} adapter loads, "
        f"at most {pool.peak} in memory)" + (f"; predictions in {args.output_file}" if args.output_file else ""),
        file=sys.stderr,
    )
    return {"predictions": preds, "raw": raw, "loads": pool.loads, "peak_loaded": pool.peak}


if __name__ == "__main__":
    run_cli(main)
