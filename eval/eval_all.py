"""Score every task of a predictions zip against a golds zip, like the LaMP leaderboard.

Usage:
    python eval/eval_all.py --golds_zip golds.zip --preds_zip preds.zip --output_file R.json
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as `python eval/eval_all.py`, sys.path[0] is eval/; the repo root holds utils and oppu.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.eval_task import evaluate
from oppu.data import file_task, lamp_outputs
from oppu.tasks import Task
from utils import UserError, ensure_writable_dir, parse_json_bytes, run_cli, write_json


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golds_zip", required=True, help="zip of LaMP outputs files (golds)")
    parser.add_argument("--preds_zip", required=True, help="zip of LaMP outputs files (predictions)")
    parser.add_argument("--output_file", required=True, help="where to write the result JSON")
    parser.add_argument("--temp_dir", help="accepted for compatibility with LaMP; unused")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser.parse_args(argv)


def is_outputs_file(name: str) -> bool:
    """JSON members of a zip, at any depth; macOS adds '._x.json' metadata files beside them."""
    base = name.rsplit("/", 1)[-1]
    return name.endswith(".json") and not base.startswith("._") and "__MACOSX/" not in name


def read_zip(path: str | Path) -> dict[Task, tuple[str, dict[str, str]]]:
    """Map each task of a zip to (member source, id -> output); one file per task."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: cannot open as a zip file ({err})") from None
    found: dict[Task, tuple[str, dict[str, str]]] = {}
    with archive:
        for name in filter(is_outputs_file, archive.namelist()):
            source = f"{path}:{name}"
            data = parse_json_bytes(archive.read(name), source)
            task = file_task(data, source) if isinstance(data, dict) else None
            if task is None:
                raise UserError(f"{source}: expected an object with a 'task' field")
            if task in found:
                raise UserError(f"{source}: second file for {task.lamp_id} after {found[task][0]}")
            found[task] = (source, lamp_outputs(data, source, task))
    return found


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ensure_writable_dir(Path(args.output_file).parent)
    golds = read_zip(args.golds_zip)
    preds = read_zip(args.preds_zip)
    if not preds:
        raise UserError(f"{args.preds_zip}: no LaMP outputs files (*.json) found")
    result: dict[str, Any] = {}
    for task, (preds_source, task_preds) in sorted(preds.items(), key=lambda kv: kv[0].lamp_id):
        if task not in golds:
            raise UserError(f"{preds_source}: no gold file for {task.lamp_id} in {args.golds_zip}")
        golds_source, task_golds = golds[task]
        result[task.lamp_id] = evaluate(task, task_golds, task_preds, golds_source, preds_source)
    unscored = sorted(task.lamp_id for task in golds if task not in preds)
    if unscored:  # scored as the official script does, but a forgotten file should not pass unseen
        print(f"note: {args.golds_zip}: no predictions for {', '.join(unscored)}; not scored", file=sys.stderr)
    write_json(args.output_file, result)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    run_cli(main)
