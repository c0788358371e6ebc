"""The least time `python demo.py` can take on this machine: the model FLOPs of every training
step it runs (the task adapter's and each personal adapter's, batched and with shared prefixes as
the stages compute them, on the stages' defaults for the embedded model) over the machine's
measured fp32 matmul limit. Answering is left out, so the floor is a lower bound.

Usage:
    python benchmarks/demo_floor.py                          # the defaults (micro-batch 8)
    python benchmarks/demo_floor.py --micro_batch_size 4     # the micro-batch default before
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402
from oppu.cost import Shape, plan_train_flops  # noqa: E402
from oppu.data import OTHER_USERS_FILE, TEST_USERS_FILE, load_users  # noqa: E402
from oppu.defaults import SMALL, epochs_for_min_steps  # noqa: E402
from oppu.examples import history_pairs, query_pairs  # noqa: E402
from oppu.modeling import ModelSpec, embedded_checkpoint, load_tokenizer  # noqa: E402
from oppu.tasks import get_task  # noqa: E402
from oppu.training import TrainConfig, encode_pairs  # noqa: E402
from utils import stable_seed  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro_batch_size", type=int, default=SMALL.micro_batch_size)
    parser.add_argument("--limit_gflops", type=float, help="the matmul limit (default: measured now)")
    return parser.parse_args(argv)


def task_flops(shape: Shape, tokenizer, data: Path, name: str, micro: int, seed: int) -> dict:
    task = get_task(name)
    others = load_users(task, data / name / OTHER_USERS_FILE, need_history=False)
    tests = load_users(task, data / name / TEST_USERS_FILE)
    encoded = encode_pairs(tokenizer, [p for u in others for p in query_pairs(task, u)], 2048)
    cfg = TrainConfig(batch_size=SMALL.batch_size, micro_batch_size=micro, max_epoch=SMALL.task_epochs, seed=seed)
    task_adapter, task_steps = plan_train_flops(shape, encoded, cfg)
    personal, personal_steps = 0.0, 0
    for user in tests:
        # A tweet's pairs ask with the rewriter's neutral input: the tweet's own text stands in
        # for it here (about as long); the rewriter's own training is not counted.
        mine = encode_pairs(tokenizer, history_pairs(task, user), 2048)
        epochs = epochs_for_min_steps(len(mine), SMALL.batch_size, SMALL.user_epochs, SMALL.min_steps)
        user_cfg = TrainConfig(
            batch_size=SMALL.batch_size,
            micro_batch_size=micro,
            max_epoch=epochs,
            seed=stable_seed(seed, user["user_id"]),
        )
        flops, steps = plan_train_flops(shape, mine, user_cfg)
        personal, personal_steps = personal + flops, personal_steps + steps
    return {
        "task_adapter": task_adapter,
        "task_steps": task_steps,
        "personal": personal,
        "personal_steps": personal_steps,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoConfig

    from benchmarks.bench import matmul_gflops

    limit = args.limit_gflops or max(matmul_gflops() for _ in range(3))
    shape = Shape.from_config(AutoConfig.from_pretrained(str(embedded_checkpoint())))
    tokenizer = load_tokenizer(ModelSpec())
    sizes = demo.parse_args([])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        demo.prepare_demo_data(sizes, data)
        for name in sizes.tasks.split(","):
            rows[name] = task_flops(shape, tokenizer, data, name, args.micro_batch_size, sizes.seed)
    print(f"\nmatmul limit {limit:.1f} GFLOP/s; micro-batch {args.micro_batch_size}")
    print("| task | task adapter steps | GFLOP | personal steps | GFLOP | seconds at the limit |")
    print("|---|---|---|---|---|---|")
    total = 0.0
    for name, r in rows.items():
        flops = r["task_adapter"] + r["personal"]
        total += flops
        print(
            f"| {name} | {r['task_steps']} | {r['task_adapter'] / 1e9:,.0f} | {r['personal_steps']} | "
            f"{r['personal'] / 1e9:,.0f} | {flops / 1e9 / limit:.0f} |"
        )
    print(f"| all | | | | {total / 1e9:,.0f} in all | **{total / 1e9 / limit:.0f}** |")
    return {"limit_gflops": limit, "tasks": rows, "floor_seconds": total / 1e9 / limit}


if __name__ == "__main__":
    main()
