"""Training throughput of a personal LoRA on the embedded model: tokens per second for each
micro-batch size and dtype, measured in one run so the ratios compare like with like.

Usage:
    python benchmarks/train_throughput.py                       # fp32, micro-batches 1, 4, 8
    python benchmarks/train_throughput.py --dtypes float32,bfloat16 --micro_batch_sizes 4,8 --steps 6
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from oppu.adapters import USER_TARGETS, add_adapter, lora_config, remove_adapter
from oppu.demo_data import make_demo_users
from oppu.examples import history_pairs
from oppu.modeling import ModelSpec, load_model
from oppu.tasks import get_task
from oppu.training import TrainConfig, tokenize_and_mask, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_name", default="news_categorize")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--micro_batch_sizes", default="1,4,8")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed optimiser steps per setting (after 1 warm-up)")
    args = parser.parse_args()
    task = get_task(args.task_name)
    (user,) = make_demo_users(task, 1, args.batch_size * (args.steps + 1), 1)
    lora = argparse.Namespace(lora_r=8, lora_alpha=8, lora_dropout=0.05)
    print("| dtype | micro-batch | tokens/s | seconds/step |\n|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        model, tokenizer = load_model(ModelSpec(dtype=dtype))
        encoded = [tokenize_and_mask(tokenizer, p, t, 2048) for p, t in history_pairs(task, user)]
        for micro in (int(m) for m in args.micro_batch_sizes.split(",")):
            peft = add_adapter(model, lora_config(lora, USER_TARGETS))
            cfg = TrainConfig(batch_size=args.batch_size, micro_batch_size=micro, max_epoch=1, max_step=1)
            train(peft, tokenizer, encoded[: args.batch_size], cfg, desc="warm-up")
            cfg.max_step = args.steps
            start = time.perf_counter()
            fit = train(peft, tokenizer, encoded[args.batch_size :], cfg, desc=f"{dtype} micro {micro}")
            seconds = time.perf_counter() - start
            print(f"| {dtype} | {micro} | {fit.tokens / seconds:.0f} | {seconds / fit.steps:.2f} |", flush=True)
            model = remove_adapter(peft)


if __name__ == "__main__":
    main()
