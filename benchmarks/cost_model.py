"""OPPU's cost model (oppu/cost.py) applied: per-user training FLOPs and seconds, storage per
personal PEFT and serving throughput, for the embedded model on this machine and for Llama-2-7b
on one GPU and on many; then its predictions for this machine checked against the figures of
the last bench run (benchmarks/results.json). Writes benchmarks/cost.json; docs/cost.md reads it.

Usage:
    python benchmarks/cost_model.py                   # after python benchmarks/bench.py [--quick]
    python benchmarks/cost_model.py --results other.json --min_articles 20

Workload: the HuffPost news-categorization authors of docs/results.md's data (prepare_data.py
from ../shared/data/huffpost-news), tokenized with the embedded model's tokenizer; the
machine's matmul limit and the bench's workload come from results.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere

import torch  # noqa: E402

from oppu.adapters import USER_TARGETS  # noqa: E402
from oppu.cost import (  # noqa: E402
    History,
    Machine,
    Shape,
    decode_seconds,
    lora_parameters,
    recompute_factor,
    train_seconds,
    user_train_flops,
    users_wall_seconds,
)
from oppu.data import TEST_USERS_FILE, load_users  # noqa: E402
from oppu.examples import history_pairs, query_prompts  # noqa: E402
from oppu.modeling import EMBEDDED_MODEL, ModelSpec, load_tokenizer, resolve_model_path  # noqa: E402
from oppu.tasks import get_task  # noqa: E402
from oppu.training import (  # noqa: E402
    IGNORE_INDEX,
    MIN_SHARED_PREFIX_ACCELERATOR,
    common_prefix_length,
    encode_pairs,
    encode_prompt,
)
from utils import read_json, run_cli, write_json  # noqa: E402

# Llama-2-7b's config (meta-llama/Llama-2-7b-hf config.json): all the cost model reads from it.
LLAMA2_7B = Shape(hidden=4096, layers=32, intermediate=11008, kv=4096, vocab=32000, parameters=6.74e9)
# Datasheet peaks (dense bf16 matmul, memory bandwidth) and efficiencies (docs/cost.md). On one
# H200 (benchmarks/gpu_results.json, 2026-11-29) LoRA training of the Llama-2-7b shape ran at
# 0.47 of the measured bf16 peak (754 of the datasheet's 989 TFLOP/s): 0.355 of the datasheet, so
# 0.35 stands; a new-token step of 8 rows on one adapter took 44 ms, bound by kernel launches, not
# by reading the weights (3 ms). The A100's figures are the same fractions, assumed (no A100 was lent).
# On a GPU a training prefix is shared only from MIN_SHARED_PREFIX_ACCELERATOR tokens.
GPU_STEP_SECONDS = 0.044
GPUS = {
    "A100-80GB": Machine("A100-80GB", 312.0, 0.35, 2039.0, 2, 0.5, GPU_STEP_SECONDS, MIN_SHARED_PREFIX_ACCELERATOR),
    "H200": Machine("H200", 989.0, 0.35, 4800.0, 2, 0.5, GPU_STEP_SECONDS, MIN_SHARED_PREFIX_ACCELERATOR),
}
CPU_EFFICIENCY = 0.55  # the plain path measured 0.51 and 0.66 of the limit in two bench runs (benchmarks/README.md)
CPU_DECODE_EFFICIENCY = 0.40
# The pipeline's two configurations (benchmarks/README.md): ours = the defaults, paper = the release's.
# Padding: the bench's planned padding when results.json has it, else these (measured earlier).
# Ours' planned padding counts every pass padded; passes that run packed (oppu.training) compute
# none, so for ours it overstates the work by at most that share (2.2 % in run 20).
# "answers": the key of the configuration's new tokens per answer in query_stats (ours stops at
# the task's cap, the paper's samples up to 200)
OURS = {
    "batch_size": 8,
    "shared_prefix": True,
    "padding": 0.006,
    "recompute": False,
    "decode_batch": 8,
    "answers": "new_tokens",
}
PAPER = {
    "batch_size": 16,
    "shared_prefix": False,
    "padding": 0.094,
    "recompute": True,
    "decode_batch": 1,
    "answers": "new_tokens_paper",
}


def configurations(bench: dict) -> dict[str, dict]:
    planned = bench.get("train", {}).get("news_categorize", {}).get("planned_padding", {})
    return {name: c | {"padding": planned.get(name, c["padding"])} for name, c in (("ours", OURS), ("paper", PAPER))}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results.json"), help="a bench run's figures")
    parser.add_argument(
        "--gpu_results", default=str(ROOT / "benchmarks" / "gpu_results.json"), help="a gpu_bench run's"
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "cost.json"))
    parser.add_argument("--min_articles", type=int, default=20, help="authors with at least this many articles")
    parser.add_argument("--epochs", type=int, default=2, help="the paper's epochs over the full history")
    parser.add_argument("--gpus", type=int, default=8, help="processes for the many-GPU row")
    parser.add_argument(
        "--memory_gbs",
        type=float,
        default=None,
        help="this machine's copy bandwidth in GB/s (default: measured now; give an idle measurement on a busy machine)",
    )
    return parser.parse_args(argv)


def measure_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (read + write), best of ``repeats``."""
    a = torch.empty(mb * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() * 4 / best / 1e9


def history_of(tokenizer, task, user: dict, items: int | None = None) -> History:
    """A user's personal training examples (the first ``items``) as the cost model's averages."""
    encoded = encode_pairs(tokenizer, history_pairs(task, user)[:items], 2048)
    answers = [sum(x != IGNORE_INDEX for x in e.labels) for e in encoded]
    return History(
        items=len(encoded),
        tokens=statistics.fmean(len(e.input_ids) for e in encoded),
        answer_tokens=statistics.fmean(answers),
        prefix=common_prefix_length([e.input_ids for e in encoded]),
    )


def as_trained(h: History, config: dict, machine: Machine | None = None) -> History:
    """The history as a configuration trains it on ``machine``: without a shared prefix (off, or
    shorter than the machine shares), every token runs per example."""
    shared = config["shared_prefix"] and h.prefix >= (machine.min_shared_prefix if machine else 0)
    return h if shared else History(h.items, h.tokens, h.answer_tokens)


def user_figures(shape: Shape, machine: Machine, h: History, config: dict, epochs: int, queries: int, q: dict) -> dict:
    flops = user_train_flops(
        shape,
        as_trained(h, config, machine),
        epochs=epochs,
        batch_size=config["batch_size"],
        padding=config["padding"],
        recompute=config["recompute"],
    )
    # A user's queries share their prefix once per call; each configuration's answers are as long
    # as the bench measured them (ours capped at the task's max_new_tokens, the paper's at 200).
    prompt = q["prompt_tokens"]
    if config["shared_prefix"]:
        prompt -= q["prefix_tokens"] * (1 - 1 / queries)
    decode = decode_seconds(
        shape,
        machine,
        queries=queries,
        prompt_tokens=prompt,
        new_tokens=q[config["answers"]],
        batch=config["decode_batch"],
    )
    return {"train_flops": flops, "train_seconds": train_seconds(flops, machine), "answer_seconds": decode}


def predict(
    shape: Shape, machine: Machine, histories: list[History], queries: list[int], q: dict, epochs: int, configs: dict
) -> dict:
    out = {}
    for name, config in configs.items():
        per_user = [user_figures(shape, machine, h, config, epochs, n, q) for h, n in zip(histories, queries)]
        seconds = [u["train_seconds"] + u["answer_seconds"] for u in per_user]
        out[name] = {
            "train_tflops_per_user": statistics.fmean(u["train_flops"] for u in per_user) / 1e12,
            "seconds_per_user": statistics.fmean(seconds),
            "all_users_seconds": sum(seconds),
            "per_user_seconds": seconds,
        }
    return out


def serving_queries_per_s(shape: Shape, machine: Machine, q: dict, batch: int) -> float:
    return batch / decode_seconds(
        shape, machine, queries=batch, prompt_tokens=q["prompt_tokens"], new_tokens=q["new_tokens"], batch=batch
    )


def check_against_bench(shape: Shape, machine: Machine, tokenizer, data: Path, bench: dict) -> dict:
    """The cost model's seconds for the bench's own workload next to the bench's measured ones."""
    task = get_task("news_categorize")
    cfg = bench["config"]
    users = load_users(task, data / task.name / TEST_USERS_FILE)
    rows = {}
    train = bench.get("train", {}).get(task.name)
    if train:
        h = [history_of(tokenizer, task, u, cfg["items"]) for u in users[: cfg["users"]]]
        configs = configurations(bench)
        plain = configs["ours"] | {"shared_prefix": False}
        for name, config in (("paper", configs["paper"]), ("plain", plain), ("ours", configs["ours"])):
            flops = sum(
                user_train_flops(
                    shape,
                    as_trained(x, config),
                    epochs=1,
                    batch_size=config["batch_size"],
                    padding=train["train"][name]["padding_fraction"],  # as measured on these examples
                    recompute=config["recompute"],
                )
                for x in h
            )
            rows[f"train {name} (s)"] = (train_seconds(flops, machine), train["train"][name]["seconds"])
        decoded = users[: cfg.get("decode_users", cfg["users"])]
        encoded = [encode_prompt(tokenizer, p) for u in decoded for p in query_prompts(task, u)[: cfg["queries"]]]
        dec = train["decode"]["ours"]
        shared = common_prefix_length(encoded)  # computed once for the whole call
        predicted = decode_seconds(
            shape,
            machine,
            queries=len(encoded),
            prompt_tokens=statistics.fmean(len(e) for e in encoded) - shared * (1 - 1 / len(encoded)),
            new_tokens=dec["new_tokens"] / dec["queries"],
            batch=8,
        )
        rows["decode ours (s)"] = (predicted, dec["seconds"])
    e2e = bench.get("e2e", {}).get("ours")
    if e2e:
        h = [history_of(tokenizer, task, u, cfg["e2e_items"]) for u in users[: cfg["e2e_users"]]]
        q = query_stats(tokenizer, task, users[: cfg["e2e_users"]], bench)
        n = [len(u["query"]) for u in users[: cfg["e2e_users"]]]
        pred = predict(shape, machine, h, n, q, 2, configurations(bench))
        rows["OPPU end to end per user (s)"] = (pred["ours"]["seconds_per_user"], e2e["seconds_per_user"])
    return {k: {"predicted": p, "measured": m, "predicted_over_measured": p / m} for k, (p, m) in rows.items()}


def check_against_gpu_bench(gpu: dict, machine: Machine) -> dict:
    """The cost model's seconds for benchmarks/gpu_bench.py's workload (Llama-2-7b shape) next to
    the seconds it measured. The bench's model FLOPs are its MFU x seconds x measured peak; the
    paper's configuration adds gradient checkpointing's recomputation (``recompute_factor``)."""
    rows = {}
    s = gpu["settings"]
    recomputed = recompute_factor(LLAMA2_7B, s.get("length", 256), s.get("answer", 4) + 1)
    for name, recompute in (("plain", False), ("paper", True)):
        r = gpu["train"][name]
        flops = r["mfu"] * r["seconds"] * gpu["matmul_tflops"] * 1e12 * (recomputed if recompute else 1.0)
        rows[f"train {name}, {gpu['settings']['examples']} examples (s)"] = (
            train_seconds(flops, machine),
            r["seconds"],
        )
    dec = gpu["decode"]
    rows_n = dec["rows"]
    predicted = decode_seconds(
        LLAMA2_7B,
        machine,
        queries=rows_n,
        prompt_tokens=s["prompt_length"],
        new_tokens=dec["new_tokens_per_row"],
        batch=rows_n,
    )
    measured = rows_n * dec["new_tokens_per_row"] / dec["new_tokens_per_s"]["single_adapter"]
    rows[f"decode {rows_n} rows x {dec['new_tokens_per_row']} new tokens, one adapter (s)"] = (predicted, measured)
    return {k: {"predicted": p, "measured": m, "predicted_over_measured": p / m} for k, (p, m) in rows.items()}


def query_stats(tokenizer, task, users: list[dict], bench: dict) -> dict:
    """Mean prompt tokens of a query, mean prefix a user's queries share, and new tokens per answer
    in each configuration (the bench's trained adapter's, greedy and capped at the task's
    max_new_tokens, and sampled as the paper does; 5 when results.json has none)."""
    encoded = [[encode_prompt(tokenizer, p) for p in query_prompts(task, u)] for u in users]
    decode = bench.get("train", {}).get(task.name, {}).get("decode", {})

    def per_answer(name: str) -> float:
        dec = decode.get(name)
        return dec["new_tokens"] / dec["queries"] if dec else 5.0

    return {
        "prompt_tokens": statistics.fmean(len(e) for user in encoded for e in user),
        "prefix_tokens": statistics.fmean(common_prefix_length(user) for user in encoded),
        "new_tokens": per_answer("ours"),
        "new_tokens_paper": per_answer("paper"),
    }


def make_authors(work: Path, min_articles: int) -> Path:
    """Every HuffPost author with at least ``min_articles`` news-categorization articles: the last
    5 are queries, the rest history."""
    import prepare_data
    from benchmarks.bench import HUFFPOST

    prepare_data.main(
        ["from-records", "--input", str(HUFFPOST), "--task_name", "news_categorize", "--user_field", "authors"]
        + ["--input_field", "short_description", "--output_field", "category", "--title_field", "headline"]
        + ["--time_field", "date", "--queries_per_user", "5", "--min_history", str(min_articles - 5)]
        + ["--num_test_users", "1000", "--output_dir", str(work)]
    )
    return work


def table(out: dict) -> str:
    lines = [
        "| model, machine | config | training TFLOPs per user | seconds per user | all users (min) |",
        "|---|---|---|---|---|",
    ]
    for key, p in out["predictions"].items():
        for name in ("ours", "paper"):
            r = p[name]
            lines.append(
                f"| {key} | {name} | {r['train_tflops_per_user']:.2f} | {r['seconds_per_user']:.1f} | "
                f"{r['all_users_seconds'] / 60:.1f} |"
            )
    lines += ["", "| storage per personal LoRA (r=8, q and v) | MB |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in out["peft_mb"].items()]
    lines += ["", "| serving (mixed batch of 32 users' queries) | queries/s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in out["serving_queries_per_s"].items()]
    lines += ["", "| check against the bench (this machine) | predicted | measured | ratio |", "|---|---|---|---|"]
    lines += [
        f"| {k} | {v['predicted']:.1f} | {v['measured']:.1f} | {v['predicted_over_measured']:.2f} |"
        for k, v in out["check"].items()
    ]
    if "check_gpu" in out:
        lines += ["", f"| check against gpu_bench ({out['check_gpu']['device']}) | predicted | measured | ratio |"]
        lines += ["|---|---|---|---|"]
        lines += [
            f"| {k} | {v['predicted']:.2f} | {v['measured']:.2f} | {v['predicted_over_measured']:.2f} |"
            for k, v in out["check_gpu"]["rows"].items()
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    bench = read_json(Path(args.results))
    from transformers import AutoConfig

    tokenizer = load_tokenizer(ModelSpec())
    config = AutoConfig.from_pretrained(resolve_model_path(EMBEDDED_MODEL))
    small = Shape.from_config(config)
    cpu = Machine(
        "this machine (fp32)",
        bench["matmul_gflops"] / 1000,
        CPU_EFFICIENCY,
        args.memory_gbs or measure_bandwidth_gbs(),
        4,
        CPU_DECODE_EFFICIENCY,
    )
    task = get_task("news_categorize")
    configs = configurations(bench)
    with tempfile.TemporaryDirectory(prefix="oppu-cost-") as tmp:
        data = make_authors(Path(tmp) / "authors", args.min_articles)
        users = load_users(task, data / task.name / TEST_USERS_FILE)
        histories = [history_of(tokenizer, task, u) for u in users]
        queries = [len(u["query"]) for u in users]
        q = query_stats(tokenizer, task, users, bench)
        with tempfile.TemporaryDirectory(prefix="oppu-cost-bench-") as btmp:
            from benchmarks.bench import make_data

            check = check_against_bench(small, cpu, tokenizer, make_data(Path(btmp)), bench)
    predictions = {f"SmolLM2-135M, {cpu.name}": predict(small, cpu, histories, queries, q, args.epochs, configs)}
    # The bench's limit is for its torch threads: the machine's other cores can run more processes.
    processes = max(1, (bench["machine"]["cores"] or 1) // bench["machine"]["torch_threads"])
    if processes > 1:
        split = predict(small, cpu, histories, queries, q, args.epochs, configs)
        for config in split.values():
            config["all_users_seconds"] = users_wall_seconds(config["per_user_seconds"], processes)
        predictions[f"SmolLM2-135M, this machine, {processes} processes"] = split
    for name, gpu in GPUS.items():
        predictions[f"Llama-2-7b, 1 x {name}"] = predict(LLAMA2_7B, gpu, histories, queries, q, args.epochs, configs)
    many = predict(LLAMA2_7B, GPUS["H200"], histories, queries, q, args.epochs, configs)
    for config in many.values():
        config["all_users_seconds"] = users_wall_seconds(config["per_user_seconds"], args.gpus)
    predictions[f"Llama-2-7b, {args.gpus} x H200 (accelerate)"] = many
    lora = {
        "SmolLM2-135M": lora_parameters(small, 8, USER_TARGETS),
        "Llama-2-7b": lora_parameters(LLAMA2_7B, 8, USER_TARGETS),
    }
    out = {
        "machine": {"cpu_matmul_gflops": bench["matmul_gflops"], "cpu_bandwidth_gbs": cpu.memory_gbs},
        "workload": {
            "users": len(users),
            "history_items": [h.items for h in histories],
            "mean_example_tokens": statistics.fmean(h.tokens for h in histories),
            "mean_prefix_tokens": statistics.fmean(h.prefix for h in histories),
            "queries": sum(queries),
            "epochs": args.epochs,
            "query": q,
        },
        "assumptions": {"cpu_efficiency": CPU_EFFICIENCY, "gpus": {k: vars(v) for k, v in GPUS.items()}},
        "predictions": predictions,
        "lora_parameters": lora,
        "peft_mb": {
            "SmolLM2-135M (fp32)": lora["SmolLM2-135M"] * 4 / 2**20,
            "Llama-2-7b (bf16)": lora["Llama-2-7b"] * 2 / 2**20,
            "Llama-2-7b (fp32)": lora["Llama-2-7b"] * 4 / 2**20,
        },
        "serving_queries_per_s": {
            f"SmolLM2-135M, {cpu.name}": serving_queries_per_s(small, cpu, q, 32),
            **{f"Llama-2-7b, {k}": serving_queries_per_s(LLAMA2_7B, g, q, 32) for k, g in GPUS.items()},
        },
        "check": check,
    }
    gpu_results = Path(args.gpu_results)
    if gpu_results.is_file():
        gpu = read_json(gpu_results)
        out["check_gpu"] = {"device": gpu["device"], "rows": check_against_gpu_bench(gpu, GPUS["H200"])}
    write_json(Path(args.output), out)
    print(table(out))
    print(f"wrote {args.output}")
    return out


if __name__ == "__main__":
    run_cli(main)
