"""Do the adapters of a finished run read the item, or answer each user with one constant?

For the task adapter and every user's personal adapter of a finished k=0 run, answer the test
queries by generation and by scoring (--answer_mode score), then report per method and mode: the
official metrics, the share of invalid answers, how many distinct answers a user gets, and how
often the answer changes with the item where the gold does (docs/defaults.md).

Usage:
    python docs/rating_probe.py --task_name product_rating --data_dir W/data --ckpt_dir W/ckpt
    python docs/rating_probe.py --task_name product_rating --data_dir W/data --predictions A.json B.json
        (the same figures for finished predictions files, e.g. a grid's RAG and OPPU+RAG rows)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from eval.metrics import score_lists  # noqa: E402
from oppu.adapters import merge_adapter  # noqa: E402
from oppu.answers import answer, invalid_fraction  # noqa: E402
from oppu.data import TEST_USERS_FILE, load_users  # noqa: E402
from oppu.examples import query_prompts  # noqa: E402
from oppu.generation import DecodeConfig  # noqa: E402
from oppu.modeling import EMBEDDED_MODEL, ModelSpec, load_model  # noqa: E402
from oppu.runs import oppu_dir, task_lora_dir, user_result_dir  # noqa: E402
from oppu.tasks import get_task  # noqa: E402
from prompts import parse_prediction  # noqa: E402
from utils import read_json  # noqa: E402


def item_reading(users: list[dict], preds: list[list[str]]) -> dict[str, float]:
    """Distinct answers per user, and the share of a user's query pairs with different golds whose
    answers differ too (0: one constant answer per user; 1: the answer follows the item)."""
    distinct, moved, pairs = [], 0, 0
    for user, answers in zip(users, preds):
        golds = [q["gold"] for q in user["query"]]
        distinct.append(len(set(answers)))
        for i in range(len(golds)):
            for j in range(i + 1, len(golds)):
                if golds[i] != golds[j]:
                    pairs += 1
                    moved += answers[i] != answers[j]
    return {"distinct_per_user": sum(distinct) / len(distinct), "moves_with_item": moved / max(pairs, 1)}


def user_answers(model, tokenizer, task, user: dict, mode: str) -> list[str]:
    decode = DecodeConfig(max_new_tokens=task.max_new_tokens)
    raw = answer(model, tokenizer, task, query_prompts(task, user), decode, mode, show=False)
    return [parse_prediction(task, a) for a in raw]


def summary(task, users: list[dict], preds: list[list[str]]) -> dict[str, float]:
    """The metrics over all users' queries together, invalid answers, and item reading."""
    golds = [q["gold"] for u in users for q in u["query"]]
    flat = [p for user_preds in preds for p in user_preds]
    return score_lists(task, golds, flat) | {"invalid": invalid_fraction(task, flat)} | item_reading(users, preds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_name", default="product_rating")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--ckpt_dir", help="a finished k=0 run's checkpoints: answer again with its adapters")
    parser.add_argument("--predictions", nargs="+", default=[], help="or: read these predictions files")
    args = parser.parse_args()
    task = get_task(args.task_name)
    users = load_users(task, Path(args.data_dir) / task.name / TEST_USERS_FILE)
    if args.predictions:
        rows = {}
        for path in args.predictions:
            preds = {g["id"]: g["output"] for g in read_json(path)["golds"]}
            rows[Path(path).stem] = summary(task, users, [[preds[q["id"]] for q in u["query"]] for u in users])
        print_table(rows)
        return
    if not args.ckpt_dir:
        parser.error("give --ckpt_dir or --predictions")
    from peft import PeftModel

    model, tokenizer = load_model(ModelSpec())
    merged = merge_adapter(model, task_lora_dir(args.ckpt_dir, task, 0, EMBEDDED_MODEL, False))
    rows = {}
    for mode in ("generate", "score"):
        preds = [user_answers(merged, tokenizer, task, u, mode) for u in users]
        rows[f"task adapter, {mode}"] = summary(task, users, preds)
    run = oppu_dir(args.ckpt_dir, task, 0, EMBEDDED_MODEL, False)
    for mode in ("generate", "score"):
        preds = []
        for user in users:
            peft = PeftModel.from_pretrained(merged, str(user_result_dir(run, user["user_id"]) / "adapter"))
            preds.append(user_answers(peft, tokenizer, task, user, mode))
            merged = peft.unload()
        rows[f"OPPU, {mode}"] = summary(task, users, preds)
    print_table(rows)


def print_table(rows: dict[str, dict[str, float]]) -> None:
    keys = list(next(iter(rows.values())))
    print("| method, answers | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
