"""Export one user's personal PEFT from a finished OPPU run as a self-contained folder they can
keep, use (generate.py) and update (OPPU.py --update); optionally also write the merged base
(base + task adapter, once) that serves every user's PEFT in a multi-LoRA server such as vLLM.

Usage:
    python export_user.py --oppu_dir ckpt/news_categorize/k0-news_categorize-SmolLM2-135M-Instruct-OPPU \
        --user_id demo-news-000 --output_dir my_peft
    python export_user.py --oppu_dir RUN --user_id U --output_dir my_peft --merged_base merged_base   # for vLLM

The folder holds adapter_model.safetensors and adapter_config.json (a PEFT LoRA folder, loadable
as is by peft and by vLLM --lora-modules), oppu_peft.json (what it stacks on: base model, task
adapter and the SHA-256 of its weights, task, k, profile; the manifest line and the history item
ids it was trained on), history.json (the user's history, for retrieval and updates) and README.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from oppu import ownership
from oppu.adapters import merge_adapter
from oppu.modeling import ModelSpec, load_model
from oppu.runs import CONFIG_FILE, safe_dirname
from utils import UserError, read_json, run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oppu_dir", required=True, help="the ...-OPPU folder of a finished OPPU.py run")
    parser.add_argument("--user_id", required=True, help="the user whose PEFT to export")
    parser.add_argument("--output_dir", help="the PEFT folder to write (default exports/<sanitised user id>)")
    parser.add_argument("--merged_base", help="also write the base with the task adapter merged in, as a model folder")
    parser.add_argument("--data_dir", help="where the run's data is now (default: the run's --data_dir)")
    parser.add_argument("--dtype", default="auto", help="--merged_base: dtype to load and save the base in")
    parser.add_argument("--access_token", default=None, help="hub token for gated models (never logged or saved)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing folders")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def merged_base_kept(run_dir: Path, out: Path, overwrite: bool) -> bool:
    """Whether ``out`` already holds the run's base with its task adapter merged in (kept as it
    is); raises, before anything is loaded or written, where another folder is in the way."""
    task_lora = Path(read_json(run_dir / CONFIG_FILE)["task_lora"])
    record = out / ownership.MERGED_FILE
    if (
        record.is_file()
        and not overwrite
        and read_json(record)["task_adapter_sha256"] == ownership.task_adapter_sha(task_lora)
    ):
        return True
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists and holds another base or task adapter; use --overwrite to replace it")
    return False


def write_merged_base(run_dir: Path, out: Path, args: argparse.Namespace) -> Path:
    """The run's base with its task adapter merged in, written once (kept when it already holds
    the same base and task adapter)."""
    if merged_base_kept(run_dir, out, args.overwrite):
        print(f"{out} already holds this base and task adapter; kept")
        return out
    config = read_json(run_dir / CONFIG_FILE)
    task_lora = Path(config["task_lora"])
    spec = ModelSpec(
        config["model_name"], args.dtype, access_token=args.access_token, trust_remote_code=config["trust_remote_code"]
    )
    model, tokenizer = load_model(spec, "cpu")
    model = merge_adapter(model, task_lora)
    return ownership.write_merged_base(model, tokenizer, out, spec, task_lora, args.overwrite)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    run_dir = Path(args.oppu_dir)
    out = Path(args.output_dir or Path("exports") / safe_dirname(args.user_id))
    if args.merged_base and Path(args.merged_base).resolve() == out.resolve():
        raise UserError("--merged_base and --output_dir must be different folders")
    if args.merged_base:  # a folder in its way is an error before the PEFT is written
        merged_base_kept(run_dir, Path(args.merged_base), args.overwrite)
    peft = ownership.export_from_run(run_dir, args.user_id, out, args.overwrite, args.data_dir, args.access_token)
    print(f"wrote the PEFT of user {args.user_id} to {peft}")
    outputs = {"peft": peft}
    if args.merged_base:
        outputs["merged_base"] = write_merged_base(run_dir, Path(args.merged_base), args)
        print(f"merged base (base + task adapter) in {outputs['merged_base']}")
    return outputs


if __name__ == "__main__":
    run_cli(main)
