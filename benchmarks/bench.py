"""Every speed figure of OPPU on this machine, measured in one run, against the paper's
configuration of the same pipeline and against the machine's matmul limit; prints a table and
writes benchmarks/results.json (keys documented in benchmarks/README.md).

Usage:
    python benchmarks/bench.py --quick          # under 5 minutes: 1 user, short histories
    python benchmarks/bench.py                  # the full run: 2 users x 96 items (14 to 21 minutes here on 2026-12-01)
    python benchmarks/bench.py --sections train,decode --output /tmp/results.json

Data: HuffPost authors (news categorization and headlines) made by prepare_data.py from
../shared/data/huffpost-news into a temporary folder; model: the embedded SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere

import torch  # noqa: E402

from oppu.adapters import TASK_TARGETS, USER_TARGETS, add_adapter, lora_config, save_adapter  # noqa: E402
from oppu.answers import PACKED, answer_rows, candidates, decision_points  # noqa: E402
from oppu.cost import Shape, linear_flops, plan_train_flops, train_flops  # noqa: E402
from oppu.data import TEST_USERS_FILE, load_users  # noqa: E402
from oppu.examples import history_pairs, query_prompts  # noqa: E402
from oppu.generation import DecodeConfig, generate  # noqa: E402
from oppu.modeling import ModelSpec, load_model  # noqa: E402
from oppu.tasks import get_task  # noqa: E402
from oppu.training import (  # noqa: E402
    IGNORE_INDEX,
    MIN_SHARED_PREFIX,
    TrainConfig,
    batch_plan,
    common_prefix_length,
    encode_pairs,
    encode_prompt,
    train,
)
from prompts import parse_prediction  # noqa: E402
from utils import read_json, run_cli, write_json  # noqa: E402

HUFFPOST = ROOT.parent / "shared" / "data" / "huffpost-news" / "News_Category_Dataset_v3.head9999.jsonl"
RECORD_FLAGS = {  # prepare_data.py from-records, as docs/run_huffpost.sh
    "news_categorize": ["--output_field", "category", "--title_field", "headline"],
    "news_headline": ["--output_field", "headline"],
}
# Ours = this repository's defaults; paper = the release's settings (REFERENCE.md §1, §4.7, §4.9).
OURS_TRAIN = {"batch_size": 8, "micro_batch_size": 8}
PAPER_TRAIN = {
    "batch_size": 16,
    "micro_batch_size": 16,
    "gradient_checkpointing": True,
    "group_by_length": False,
    "shared_prefix": False,
}
PLAIN_TRAIN = OURS_TRAIN | {"shared_prefix": False}  # ours without the shared prefix: prefix_speedup's base
# each way of serving (and, under --quick, of training) is timed this many times, in turn; the fastest counts
ROUNDS = 2
PAPER_DECODE = {"do_sample": True, "temperature": 0.1, "max_new_tokens": 200, "batch_size": 1, "shared_prefix": False}
OURS_OPPU = ["--batch_size", "8", "--micro_batch_size", "8", "--learning_rate", "1e-3"]
# The paper's batch, epochs and step floor (--paper_defaults), at ours' learning rate: the rate
# costs nothing to train, but at the paper's 1e-4 the embedded model does not learn where an
# answer stops, and sampling up to 200 tokens would then time the rate, not the configuration
# (the decoding section answers with one adapter for both configurations for the same reason).
PAPER_OPPU = [
    "--paper_defaults",
    "--learning_rate",
    "1e-3",
    "--micro_batch_size",
    "16",
    "--gradient_checkpointing",
    "--no_group_by_length",
    "--no_shared_prefix",
    "--do_sample",
    "--temperature",
    "0.1",
    "--max_new_tokens",
    "200",
    "--decode_batch_size",
    "1",
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 user's 16 history items (under 5 minutes)")
    parser.add_argument("--sections", default="matmul,train,decode,serve,e2e", help="comma-separated subset")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--work_dir", default=None, help="data and checkpoints (default: a temporary folder)")
    args = parser.parse_args(argv)
    # Sizes: history items trained on per user, users, queries per user decoded, serving users.
    args.items, args.users = (16, 1) if args.quick else (96, 2)
    args.decode_users, args.queries = 2, 5  # a user's queries share a prefix at decoding
    args.e2e_items, args.e2e_users = (8, 1) if args.quick else (64, 3)
    args.serve_users = 8
    return args


# --- the limit ---------------------------------------------------------------------------------


def matmul_gflops(n: int = 1536, repeats: int = 6) -> float:
    """fp32 GFLOP/s of large square matmuls on all the threads torch uses, best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


# --- FLOP count --------------------------------------------------------------------------------


def example_flops(config, encoded) -> float:
    """Training FLOPs of the examples, each as the plain path computes it without padding."""
    total = 0.0
    for e in encoded:
        first = next((i for i, x in enumerate(e.labels) if x != IGNORE_INDEX), len(e.labels) - 1)
        # the LM head where the loss is: the positions before each target (not the last token)
        total += train_flops(config, len(e.input_ids), len(e.input_ids) - first)
    return total


# --- data --------------------------------------------------------------------------------------


def make_data(work: Path) -> Path:
    """HuffPost authors as users of both tasks, as docs/run_huffpost.sh makes them."""
    import prepare_data

    data = work / "data"
    for task, flags in RECORD_FLAGS.items():
        if not (data / task / TEST_USERS_FILE).is_file():
            prepare_data.main(
                [
                    "from-records",
                    "--input",
                    str(HUFFPOST),
                    "--task_name",
                    task,
                    "--user_field",
                    "authors",
                    "--input_field",
                    "short_description",
                    "--time_field",
                    "date",
                    "--queries_per_user",
                    "5",
                    "--min_history",
                    "10",
                    "--num_test_users",
                    "10",
                    "--output_dir",
                    str(data),
                    *flags,
                ]
            )
    return data


def lora_args(dropout: float = 0.05) -> argparse.Namespace:
    return argparse.Namespace(lora_r=8, lora_alpha=8, lora_dropout=dropout)


# --- training and decoding ---------------------------------------------------------------------


def measure_train(model, tokenizer, encoded, settings: dict, limit: float) -> tuple[dict, object]:
    """One epoch over ``encoded`` with a fresh user LoRA; the figures and the trained PEFT model."""
    torch.manual_seed(0)
    peft = add_adapter(model, lora_config(lora_args(), USER_TARGETS))
    cfg = TrainConfig(**({"learning_rate": 1e-3, "max_epoch": 1} | settings))
    warm_up = settings | {"batch_size": 2, "micro_batch_size": 2, "max_epoch": 1}  # first-call costs out of the timing
    train(peft, tokenizer, encoded[:2], TrainConfig(**warm_up))
    start = time.perf_counter()
    fit = train(peft, tokenizer, encoded, cfg)
    seconds = time.perf_counter() - start
    flops = example_flops(model.config, encoded)
    figures = {
        "examples_per_s": len(encoded) / seconds,
        "tokens_per_s": fit.tokens / seconds,
        "gflops_per_s": flops / seconds / 1e9,
        "mfu": flops / seconds / 1e9 / limit,  # against the run's best limit in the end (apply_limit)
        "padding_fraction": fit.padded_tokens / (fit.padded_tokens + fit.tokens),
        # the same over the positions computed: a shared prefix runs once per batch, not per example
        "padding_of_computed": fit.padded_tokens / (fit.padded_tokens + fit.tokens - fit.shared_prefix_tokens),
        "shared_prefix_tokens": fit.shared_prefix_tokens,
        "seconds": seconds,
        "examples": len(encoded),
    }
    return figures, peft


def forward_flops(config, tokens: int, logit_positions: int) -> float:
    """A lower bound on the model FLOPs of a forward pass: the projections of ``tokens`` tokens
    and the vocabulary projection at ``logit_positions``; attention left out."""
    shape = Shape.from_config(config)
    return 2.0 * (linear_flops(shape, tokens) + shape.hidden * shape.vocab * logit_positions)


def own_tokens(tokenizer, prompts: list[str], shared_prefix: bool = True) -> int:
    """Prompt tokens to run at least once: the prompts' common first tokens once, the rest each
    (``shared_prefix`` False: every prompt's tokens, as a mixed batch of users runs them)."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    shared = common_prefix_length(encoded) if shared_prefix else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0  # as generate() and score_answers() decide
    return shared + sum(len(e) - shared for e in encoded)


def new_tokens(tokenizer, outputs: Sequence[str], max_new_tokens: int) -> int:
    """New tokens of these answers, re-counted from their text, plus the EOS that ends an answer
    shorter than the cap."""
    return sum(min(len(tokenizer(o, add_special_tokens=False)["input_ids"]) + 1, max_new_tokens) for o in outputs)


def answer_floor_gflop(
    config, tokenizer, prompts: list[str], outputs: Sequence[str], max_new_tokens: int, shared_prefix: bool = True
) -> float:
    """The least work of answering ``prompts`` with ``outputs``: the prompts' tokens (``own_tokens``:
    their common first tokens once) and each new token but the last through the model, every new
    token with its logits. No decoder of these answers does less (with ``shared_prefix`` False:
    none that runs every prompt in full)."""
    new = new_tokens(tokenizer, outputs, max_new_tokens)
    return forward_flops(config, own_tokens(tokenizer, prompts, shared_prefix) + new - len(prompts), new) / 1e9


def measure_decode(model, tokenizer, prompts: list[str], settings: dict, limit: float) -> dict:
    cfg = DecodeConfig(**({"max_new_tokens": 32} | settings))
    generate(model, tokenizer, prompts[:1], replace(cfg, max_new_tokens=2), show=False)  # first-call costs out
    torch.manual_seed(0)
    start = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, cfg, show=False)
    seconds = time.perf_counter() - start
    new = new_tokens(tokenizer, outputs, cfg.max_new_tokens)
    floor = answer_floor_gflop(model.config, tokenizer, prompts, outputs, cfg.max_new_tokens)  # at the limit below
    return {
        "queries_per_s": len(prompts) / seconds,
        "answers": outputs,
        "new_tokens_per_s": new / seconds,
        "seconds": seconds,
        "queries": len(prompts),
        "new_tokens": new,
        "floor_gflop": floor,
        "floor_seconds": floor / limit,
    }


def measure_packed(model, tokenizer, task, prompts: list[str], limit: float, mode: str) -> dict:
    """--answer_mode score (every candidate answer's likelihood) or constrained (greedy decoding
    kept to the candidates: the model runs only where they branch), prompts and what runs behind
    them packed into forward passes behind the shared prefix; no decoding loop."""
    pick = PACKED[mode]
    pick(model, tokenizer, prompts[:1], candidates(task), show=False)  # first-call costs out of the timing
    start = time.perf_counter()
    chosen = pick(model, tokenizer, prompts, candidates(task), show=False)
    seconds = time.perf_counter() - start
    # The floor at the matmul limit: the prompts, then (score) every answer's tokens but its
    # last, with logits at each, or (constrained) each decision point's path, with logits behind it.
    _, tails = answer_rows(tokenizer, prompts[0], candidates(task))  # the same for every prompt
    if mode == "score":  # logits at the prompt's last token (once) and at every answer token but the last
        behind = sum(len(t) - 1 for t in tails)
        logits = 1 + behind
    else:
        points = decision_points(tails)
        behind, logits = sum(len(p) for p in points), len(points)
    n = len(prompts)
    flops = forward_flops(model.config, own_tokens(tokenizer, prompts) + n * behind, n * logits)
    return {
        "queries_per_s": len(prompts) / seconds,
        "seconds": seconds,
        "queries": len(chosen),
        "answers": chosen,
        "floor_gflop": flops / 1e9,
        "floor_seconds": flops / 1e9 / limit,
    }


def planned_padding(lengths: Sequence[Sequence[int]], settings: dict, epochs: int = 2) -> float:
    """Padded positions over all positions of training on every user's full history (one list of
    example lengths per user), from the batch plan training follows: tokenizer only, no model."""
    cfg = TrainConfig(**({"max_epoch": epochs} | settings))
    pad = real = 0
    for user in lengths:
        for step in batch_plan(len(user), cfg, user if cfg.group_by_length else None):
            for i in range(0, len(step), cfg.micro_batch_size):
                micro = [user[j] for j in step[i : i + cfg.micro_batch_size]]
                pad += max(micro) * len(micro) - sum(micro)
                real += sum(micro)
    return pad / (pad + real)


def bench_task(model, tokenizer, task_name: str, data: Path, args, limit: float, samples: list[float]) -> dict:
    """Training (paper, plain, ours) and decoding (paper, ours) figures on one task's users; a
    matmul measurement after each timed epoch is appended to ``samples``."""
    task = get_task(task_name)
    all_users = load_users(task, data / task.name / TEST_USERS_FILE)
    users = all_users[: args.users]
    out: dict = {"train": {}, "decode": {}}
    encoded = [e for u in users for e in encode_pairs(tokenizer, history_pairs(task, u)[: args.items], 2048)]
    # --quick decodes 2 headline queries: the paper's configuration samples up to 200 tokens each
    n_users, n_queries = (1, 2) if args.quick and task.name == "news_headline" else (args.decode_users, args.queries)
    prompts = [p for u in all_users[:n_users] for p in query_prompts(task, u)[:n_queries]]
    every = [[len(e.input_ids) for e in encode_pairs(tokenizer, history_pairs(task, u), 2048)] for u in all_users]
    out["planned_padding"] = {"paper": planned_padding(every, PAPER_TRAIN), "ours": planned_padding(every, OURS_TRAIN)}
    trained = None
    # --quick's epochs are short (2 steps each), so every configuration trains twice, in turn, and
    # the faster epoch counts: one slow moment of a shared machine then does not decide a ratio
    rounds = ROUNDS if args.quick else 1
    for r in range(rounds):
        for name, settings in (("paper", PAPER_TRAIN), ("plain", PLAIN_TRAIN), ("ours", OURS_TRAIN)):
            print(f"[{task.name}] training, {name} configuration ({len(encoded)} examples)", flush=True)
            figures, peft = measure_train(model, tokenizer, encoded, settings, limit)
            samples.append(matmul_gflops())  # the limit measured again beside every timed epoch
            kept = out["train"].get(name)
            times = [*(kept["round_seconds"] if kept else []), figures["seconds"]]
            out["train"][name] = figures if kept is None or figures["seconds"] < kept["seconds"] else kept
            out["train"][name]["round_seconds"] = times
            if name == "ours" and r == rounds - 1:
                trained = peft
            else:
                model = peft.unload()
    for name, settings in (("paper", PAPER_DECODE), ("ours", {"max_new_tokens": task.max_new_tokens})):
        print(f"[{task.name}] decoding, {name} configuration ({len(prompts)} queries)", flush=True)
        out["decode"][name] = measure_decode(trained, tokenizer, prompts, settings, limit)
    if task.is_classification:
        for mode, how in (("score", "scoring"), ("constrained", "greedy decoding kept to")):
            print(
                f"[{task.name}] answering by {how} the {len(task.labels)} labels ({len(prompts)} queries)", flush=True
            )
            out["decode"][mode] = measure_packed(trained, tokenizer, task, prompts, limit, mode)
        # constrained answers against free greedy ones, where those are a label
        greedy = [parse_prediction(task, a) for a in out["decode"]["ours"]["answers"]]
        valid = [(g, c) for g, c in zip(greedy, out["decode"]["constrained"]["answers"]) if g in task.labels]
        out["decode"]["constrained"]["greedy_valid"] = len(valid)
        out["decode"]["constrained"]["same_as_valid_greedy"] = sum(g == c for g, c in valid)
    trained.unload()
    return out


# --- serving -----------------------------------------------------------------------------------


def bench_serving(model, tokenizer, data: Path, args) -> dict:
    """8 users' queries with 8 personal LoRAs: one mixed batch (each row through its own LoRA,
    oppu.serving.RowAdapters), one adapter for the whole batch, and user after user. The LoRAs are
    random (non-zero B) so every row really goes through its own weights. No shared prefix in
    any of the three: a prefix's keys and values differ per adapter."""
    from peft import get_peft_model

    print(f"[serving] {args.serve_users} users' LoRAs: mixed batch, one adapter, user after user", flush=True)
    task = get_task("news_categorize")
    users = load_users(task, data / task.name / TEST_USERS_FILE)[: args.serve_users]
    per_user = 1 if args.quick else 2
    prompts = [(u["user_id"], p) for u in users for p in query_prompts(task, u)[:per_user]]
    names = [f"u{i}" for i in range(len(users))]
    torch.manual_seed(0)
    peft = get_peft_model(model, lora_config(lora_args(0.0), USER_TARGETS), adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, lora_config(lora_args(0.0), USER_TARGETS))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    peft.eval()
    owner = {u["user_id"]: name for u, name in zip(users, names)}
    cfg = DecodeConfig(max_new_tokens=task.max_new_tokens, batch_size=len(prompts), shared_prefix=False)
    texts = [p for _, p in prompts]
    rows = [(encode_prompt(tokenizer, p), owner[uid]) for uid, p in prompts]
    from oppu.serving import RowAdapters

    answers: list[str] = []

    def mixed() -> None:  # a fresh RowAdapters each time: it hands each prompt to its adapter once
        answers[:] = generate(RowAdapters(peft, rows), tokenizer, texts, cfg, show=False)

    def prompt_pass() -> None:  # the mixed batch's prompt pass (and its first new token) alone
        generate(RowAdapters(peft, rows), tokenizer, texts, replace(cfg, max_new_tokens=1), show=False)

    def single() -> None:
        peft.set_adapter(names[0])
        generate(peft, tokenizer, texts, cfg, show=False)

    def sequential() -> None:
        for uid, name in owner.items():
            peft.set_adapter(name)
            generate(peft, tokenizer, [p for u, p in prompts if u == uid], cfg, show=False)

    generate(peft, tokenizer, texts[:1], cfg, show=False)  # first-call costs out of the timings
    # every way twice, in turn, and the faster of its two: one slow moment of a shared machine
    # then does not decide a ratio
    seconds: dict[str, list[float]] = {"mixed": [], "single": [], "sequential": [], "prompt_pass": []}
    for _ in range(ROUNDS):
        for name, way in (
            ("mixed", mixed),
            ("single", single),
            ("sequential", sequential),
            ("prompt_pass", prompt_pass),
        ):
            start = time.perf_counter()
            way()
            seconds[name].append(time.perf_counter() - start)
    qps = {k: len(prompts) / min(v) for k, v in seconds.items() if k != "prompt_pass"}
    # The mixed batch's floor: each user's prompts, their common first tokens once (a mixed batch
    # can share a prefix per adapter, not across adapters), and every answer's new tokens.
    per_user: dict[str, list[int]] = {}
    for i, (uid, _) in enumerate(prompts):
        per_user.setdefault(uid, []).append(i)
    floor = sum(
        answer_floor_gflop(
            model.config, tokenizer, [texts[i] for i in at], [answers[i] for i in at], cfg.max_new_tokens
        )
        for at in per_user.values()
    )
    prefix = serve_prefix(peft, tokenizer, task, users[:4], names[:4], queries=4)
    peft.unload()
    return {
        "queries": len(prompts),
        "users": len(users),
        "via": "oppu.serving.RowAdapters",
        "queries_per_s": qps,
        "seconds": seconds,
        "mixed_new_tokens": new_tokens(tokenizer, answers, cfg.max_new_tokens),
        "floor_gflop": floor,
        "prefix": prefix,
    }


def serve_prefix(peft, tokenizer, task, users, names, queries: int) -> dict:
    """A mixed batch of several queries per user, with the shared prefix run once per adapter
    (the default) against not at all: queries/s of each and whether the answers agree."""
    from oppu.serving import RowAdapters

    prompts = [(name, p) for u, name in zip(users, names) for p in query_prompts(task, u)[:queries]]
    rows = [(encode_prompt(tokenizer, p), name) for name, p in prompts]
    out, qps = {}, {}
    for shared in (False, True):
        cfg = DecodeConfig(max_new_tokens=task.max_new_tokens, batch_size=len(prompts), shared_prefix=shared)
        start = time.perf_counter()
        out[shared] = generate(RowAdapters(peft, rows), tokenizer, [p for _, p in prompts], cfg, show=False)
        qps["shared_prefix" if shared else "no_prefix"] = len(prompts) / (time.perf_counter() - start)
    return {"users": len(users), "queries": len(prompts), "queries_per_s": qps, "same_answers": out[True] == out[False]}


# --- end to end --------------------------------------------------------------------------------


def short_histories(data: Path, dest: Path, users: int, items: int) -> Path:
    """The first ``users`` news_categorize test users with their first ``items`` history items."""
    task = get_task("news_categorize")
    (dest / task.name).mkdir(parents=True, exist_ok=True)
    cut = [u | {"profile": u["profile"][:items]} for u in read_json(data / task.name / TEST_USERS_FILE)[:users]]
    write_json(dest / task.name / TEST_USERS_FILE, cut)
    return dest


def high_water_rss_gb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM). Not ru_maxrss: a child started by fork
    and exec inherits in it the parent's resident size at the fork, here the bench's loaded model."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone (or not Linux)
        return 0.0
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return kib / 1024**2


def run_oppu(work: Path, data: Path, task_lora: Path, name: str, flags: list[str]) -> dict:
    """OPPU.py in a child process: its wall time, peak RSS (VmHWM, sampled every 0.1 s), and
    per-user seconds."""
    ckpt = work / f"ckpt-{name}"
    argv = [
        sys.executable,
        str(ROOT / "OPPU.py"),
        "--task_name",
        "news_categorize",
        "--data_dir",
        str(data),
        "--ckpt_dir",
        str(ckpt),
        "--output_dir",
        str(work / f"output-{name}"),
        "--task_lora",
        str(task_lora),
        "--max_epoch",
        "2",
        "--min_steps",
        "0",
        *flags,
    ]
    print(f"[e2e] OPPU.py, {name} configuration", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, high_water_rss_gb(proc.pid))
            time.sleep(0.1)
        out.seek(0)
        log = out.read()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"OPPU.py ({name}) failed:\n{log[-3000:]}")
    manifest_file = next(ckpt.rglob("manifest.jsonl"))
    manifest = [json.loads(line) for line in manifest_file.read_text().splitlines()]
    adapter = next(p for p in ckpt.rglob("adapter_model.safetensors"))
    answers = [
        answer
        for result in manifest_file.parent.rglob("result.json")
        for answer in read_json(result)["raw_generations"].values()
    ]
    return {
        "answers": answers,  # each query's generated text, for its length (answer_tokens_per_query)
        "wall_seconds": seconds,
        "seconds_per_user": sum(m["seconds"] for m in manifest) / len(manifest),
        "train_seconds_per_user": sum(m["train_seconds"] for m in manifest) / len(manifest),
        "answer_seconds_per_user": sum(m["answer_seconds"] for m in manifest) / len(manifest),
        "users": len(manifest),
        "peak_rss_gb": peak,
        "peft_mb": sum(f.stat().st_size for f in adapter.parent.iterdir()) / 1024**2,
    }


def e2e_floor_gflop(config, tokenizer, run_dir: Path) -> dict[str, float]:
    """The work per user of a finished OPPU.py run on CPU in one process (its folder, ``run_dir``),
    with the settings it saved, over the users it finished: each user's training as it ran (its
    batches, each micro-batch's shared prefix once: oppu.cost's ``plan_train_flops`` on
    ``OPPU.user_training``) and the least work of the answers it wrote (``answer_floor_gflop``;
    prompts uncut, as the bench's are far below ``--cut_off``). Returns ``train``, ``answer`` and
    their sum, in GFLOP. Profiles and retrieval's index are not counted (the bench uses neither)."""
    import OPPU
    from oppu import cli
    from oppu.runs import user_result_dir

    args = argparse.Namespace(**read_json(run_dir / "run_config.json"))
    if args.answer_mode != "generate":
        raise ValueError(f"{run_dir}: answer_mode {args.answer_mode}; the floor counts generated answers only")
    task = get_task(args.task_name)
    _, decode_cfg = cli.personal_configs(args, task)
    shape = Shape.from_config(config)
    train_gflop, answer_gflop = [], []
    for user in load_users(task, Path(args.data_dir) / task.name / TEST_USERS_FILE):
        done = user_result_dir(run_dir, user["user_id"]) / "result.json"
        if not done.exists():  # not in this run (--max_users, --user_stride) or not finished
            continue
        result = read_json(done)
        encoded, cfg = OPPU.user_training(tokenizer, task, user, None, args)
        flops, _ = plan_train_flops(shape, encoded, cfg)
        prompts = query_prompts(task, user, args.k, None, args.retrieval)
        outputs = [result["raw_generations"][q["id"]] for q in user["query"]]
        train_gflop.append(flops / 1e9)
        answer_gflop.append(
            answer_floor_gflop(config, tokenizer, prompts, outputs, decode_cfg.max_new_tokens, decode_cfg.shared_prefix)
        )
    train, answer = sum(train_gflop) / len(train_gflop), sum(answer_gflop) / len(answer_gflop)
    return {"train": train, "answer": answer, "total": train + answer}


def bench_e2e(model, tokenizer, data: Path, work: Path, args) -> dict:
    """OPPU end to end (train + answer per user) in ours and the paper's configuration. The task
    adapter is a fresh LoRA (B = 0, so merging it changes nothing): speed does not depend on it."""
    torch.manual_seed(0)
    peft = add_adapter(model, lora_config(lora_args(), TASK_TARGETS))
    save_adapter(peft, work / "task_adapter")
    peft.unload()
    short = short_histories(data, work / "data-e2e", args.e2e_users, args.e2e_items)
    out = {"ours": run_oppu(work, short, work / "task_adapter", "ours", OURS_OPPU)}
    ours_run = next((work / "ckpt-ours").rglob("manifest.jsonl")).parent
    floor = e2e_floor_gflop(model.config, tokenizer, ours_run)  # per user; in seconds at the limit: apply_limit
    out["ours"] |= {
        "floor_gflop": floor["total"],
        "floor_train_gflop": floor["train"],
        "floor_answer_gflop": floor["answer"],
    }
    # the same PEFTs answering by greedy decoding kept to the labels: OPPU.py --reuse_adapters
    # loads them and only answers; a user's seconds are then ours' training and this answering
    reused = ["--answer_mode", "constrained", "--reuse_adapters", str(ours_run)]
    constrained = run_oppu(work, short, work / "task_adapter", "ours_constrained", [*OURS_OPPU, *reused])
    constrained["seconds_per_user"] = out["ours"]["train_seconds_per_user"] + constrained["answer_seconds_per_user"]
    out["ours_constrained"] = constrained
    out["paper"] = run_oppu(work, short, work / "task_adapter", "paper", PAPER_OPPU)
    caps = {"ours": get_task("news_categorize").max_new_tokens, "paper": PAPER_DECODE["max_new_tokens"]}
    for name, cap in caps.items():  # the answers' lengths: the two configurations' answering differs by them too
        answers = out[name].pop("answers")
        out[name]["answer_tokens_per_query"] = new_tokens(tokenizer, answers, cap) / len(answers)
    out["ours_constrained"].pop("answers")
    return out


# --- report ------------------------------------------------------------------------------------


def apply_limit(r: dict) -> None:
    """The machine's limit is the best of the run's matmul measurements (start, after every timed
    training epoch, after training, end): a shared machine sometimes gives less for a while (one
    --quick run measured 124 to 138 GFLOP/s in its three samples, others up to 191), and a low
    limit would inflate every utilisation. Utilisations and floors are recomputed against it."""
    limit = r["matmul_gflops"] = max(r["matmul_samples"])
    for task in r.get("train", {}).values():
        for figures in task["train"].values():
            figures["mfu"] = figures["gflops_per_s"] / limit
        for figures in task["decode"].values():
            if "floor_gflop" in figures:
                figures["floor_seconds"] = figures["floor_gflop"] / limit
    for figures in (r.get("serve"), r.get("e2e", {}).get("ours")):
        if figures and "floor_gflop" in figures:
            figures["floor_seconds"] = figures["floor_gflop"] / limit


def headline(r: dict) -> dict:
    """The top-level figures of results.json (README: benchmarks/README.md)."""
    out = {"matmul_gflops": r.get("matmul_gflops")}
    if "train" in r:
        nc = r["train"]["news_categorize"]["train"]
        out |= {
            "train_tokens_per_s": nc["ours"]["tokens_per_s"],
            "train_mfu": nc["plain"]["mfu"],
            "prefix_speedup": nc["ours"]["examples_per_s"] / nc["plain"]["examples_per_s"],
            "padding_fraction": r["train"]["news_categorize"]["planned_padding"]["ours"],
            "train_speedup_vs_paper": nc["ours"]["examples_per_s"] / nc["paper"]["examples_per_s"],
        }
        dec = r["train"]["news_categorize"]["decode"]
        out["decode_speedup_vs_paper"] = dec["ours"]["queries_per_s"] / dec["paper"]["queries_per_s"]
        # the most any decoder could gain: the paper's seconds over ours' floor (same queries)
        out["decode_ceiling_vs_paper"] = dec["paper"]["seconds"] / dec["ours"]["floor_seconds"]
        for mode in ("score", "constrained"):
            if mode in dec:
                out[f"{mode}_speedup_vs_paper"] = dec[mode]["queries_per_s"] / dec["paper"]["queries_per_s"]
                out[f"{mode}_ceiling_vs_paper"] = dec["paper"]["seconds"] / dec[mode]["floor_seconds"]
    if "serve" in r:
        q = r["serve"]["queries_per_s"]
        out |= {
            "mixed_vs_single_adapter": q["mixed"] / q["single"],
            "mixed_vs_sequential": q["mixed"] / q["sequential"],
        }
        if "floor_seconds" in r["serve"]:
            # the most a mixed batch could gain on user after user: the latter's time over the
            # mixed batch's floor (each user's prompts, their common first tokens once, and every
            # new token, at the matmul limit)
            out["mixed_vs_sequential_ceiling"] = min(r["serve"]["seconds"]["sequential"]) / r["serve"]["floor_seconds"]
        if r["serve"].get("prefix"):
            pq = r["serve"]["prefix"]["queries_per_s"]
            out["mixed_prefix_speedup"] = pq["shared_prefix"] / pq["no_prefix"]
    if "e2e" in r:
        e = r["e2e"]
        out |= {
            "e2e_seconds_per_user": e["ours"]["seconds_per_user"],
            "e2e_speedup_vs_paper": e["paper"]["seconds_per_user"] / e["ours"]["seconds_per_user"],
            **(
                {"e2e_constrained_speedup_vs_paper": e["paper"]["seconds_per_user"] / c["seconds_per_user"]}
                if (c := e.get("ours_constrained"))
                else {}
            ),
            "peak_rss_gb": e["ours"]["peak_rss_gb"],
            "peft_mb": e["ours"]["peft_mb"],
        }
        if "floor_seconds" in e["ours"]:
            # the paper's seconds per user over ours' floor: its training and answers at the limit
            out["e2e_ceiling_vs_paper"] = e["paper"]["seconds_per_user"] / e["ours"]["floor_seconds"]
    return out


def table(r: dict) -> str:
    lines = ["| figure | paper config | plain (no shared prefix) | ours |", "|---|---|---|---|"]
    for task, t in r.get("train", {}).items():
        for key, fmt, label in (
            ("examples_per_s", ".2f", "examples_per_s"),
            ("tokens_per_s", ".0f", "tokens_per_s"),
            # every example's FLOPs counted in full: ours skips the shared prefix's, so above the
            # plain path's it is a FLOP-equivalent rate, not a utilisation
            ("mfu", ".3f", "mfu (full examples' FLOPs)"),
            ("padding_fraction", ".3f", "padding_fraction (of real + padded tokens)"),
            ("padding_of_computed", ".3f", "padding of the positions computed"),
        ):
            if any(key not in t["train"][c] for c in ("paper", "plain", "ours")):
                continue  # a results.json from before the figure
            cells = " | ".join(format(t["train"][c][key], fmt) for c in ("paper", "plain", "ours"))
            lines.append(f"| {task} train {label} | {cells} |")
        pp = t["planned_padding"]
        lines.append(f"| {task} padding, all test users' full histories | {pp['paper']:.3f} | | {pp['ours']:.3f} |")
        d = t["decode"]
        for key in ("queries_per_s", "new_tokens_per_s"):
            lines.append(f"| {task} decode {key} | {d['paper'][key]:.2f} | | {d['ours'][key]:.2f} |")
        per = {c: d[c]["new_tokens"] / d[c]["queries"] for c in ("paper", "ours")}  # ours stops at the task's cap
        lines.append(f"| {task} decode new tokens per query | {per['paper']:.1f} | | {per['ours']:.1f} |")
        for mode, how in (("score", "scoring"), ("constrained", "greedy decoding kept to the labels")):
            if mode in t["decode"]:
                q = t["decode"][mode]["queries_per_s"]
                lines.append(f"| {task} answered by {how} (--answer_mode {mode}): queries/s | | | {q:.2f} |")
    if "e2e" in r:
        for key in (
            "seconds_per_user",
            "train_seconds_per_user",
            "answer_seconds_per_user",
            "answer_tokens_per_query",
            "peak_rss_gb",
            "peft_mb",
        ):
            if key not in r["e2e"]["paper"]:
                continue  # a results.json from before the figure
            lines.append(f"| OPPU end to end {key} | {r['e2e']['paper'][key]:.2f} | | {r['e2e']['ours'][key]:.2f} |")
        if "floor_seconds" in r["e2e"]["ours"]:
            f = r["e2e"]["ours"]["floor_seconds"]
            lines.append(
                f"| OPPU end to end: ours' floor per user (its training and answers at the limit), s | | | {f:.2f} |"
            )
        if "ours_constrained" in r["e2e"]:
            c = r["e2e"]["ours_constrained"]
            lines.append(
                f"| OPPU end to end, --answer_mode constrained: seconds_per_user (train + answer) | | | "
                f"{c['seconds_per_user']:.2f} ({c['train_seconds_per_user']:.2f} + {c['answer_seconds_per_user']:.2f}) |"
            )
    if "serve" in r:
        q = r["serve"]["queries_per_s"]
        lines.append(
            f"| serving queries/s: mixed 8 users / one adapter / user after user | "
            f"{q['mixed']:.2f} / {q['single']:.2f} / {q['sequential']:.2f} | | |"
        )
        if "floor_seconds" in r["serve"]:
            sv = r["serve"]
            lines.append(
                f"| serving: user after user / the mixed batch / its prompt pass alone / its floor at the limit, s | "
                f"{min(sv['seconds']['sequential']):.2f} / {min(sv['seconds']['mixed']):.2f} / "
                f"{min(sv['seconds']['prompt_pass']):.2f} / {sv['floor_seconds']:.2f} | | |"
            )
        if r["serve"].get("prefix"):
            pr = r["serve"]["prefix"]
            pq = pr["queries_per_s"]
            lines.append(
                f"| serving {pr['users']} users x {pr['queries'] // pr['users']} queries in one mixed batch: queries/s "
                f"| | {pq['no_prefix']:.2f} | {pq['shared_prefix']:.2f} (same answers: {pr['same_answers']}) |"
            )
    lines += ["", *(f"- {k}: {v:.3f}" for k, v in r["headline"].items() if v is not None)]
    return "\n".join(lines)


def save(results: dict, path: Path, start: float) -> dict:
    """results.json: the headline figures first, then everything measured so far."""
    apply_limit(results)
    results["headline"] = headline(results)
    results["seconds"] = time.perf_counter() - start
    out = results["headline"] | {k: v for k, v in results.items() if k != "headline"}
    write_json(path, out)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    sections = set(args.sections.split(","))
    start = time.perf_counter()
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="oppu-bench-")
    work = Path(args.work_dir or tmp.name)
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "config": vars(args)
        | {
            "ours_train": OURS_TRAIN,
            "paper_train": PAPER_TRAIN,
            "paper_decode": PAPER_DECODE,
            "ours_oppu": OURS_OPPU,
            "ours_constrained_oppu": [*OURS_OPPU, "--answer_mode", "constrained", "--reuse_adapters", "<ours' run>"],
            "paper_oppu": PAPER_OPPU,
        },
    }
    limit = matmul_gflops()
    results["matmul_samples"] = [limit]
    print(f"matmul limit: {limit:.1f} GFLOP/s (fp32, {torch.get_num_threads()} threads)", flush=True)
    data = make_data(work)
    model, tokenizer = load_model(ModelSpec())
    # Written after every section, so a long run stopped half-way keeps what it measured.
    if sections & {"train", "decode"}:
        samples = results["matmul_samples"]
        results["train"] = {t: bench_task(model, tokenizer, t, data, args, limit, samples) for t in RECORD_FLAGS}
        results["matmul_samples"].append(matmul_gflops())
        save(results, Path(args.output), start)
    if "serve" in sections:
        results["serve"] = bench_serving(model, tokenizer, data, args)
        save(results, Path(args.output), start)
    if "e2e" in sections:
        results["e2e"] = bench_e2e(model, tokenizer, data, work, args)
    results["matmul_samples"].append(matmul_gflops())
    out = save(results, Path(args.output), start)
    print(table(results))
    print(f"wrote {args.output} in {results['seconds']:.0f} s")
    if tmp:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    run_cli(main)
