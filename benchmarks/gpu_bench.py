"""OPPU's training and serving on a Llama-2-7b-shaped model with random weights (no weights can
be downloaded on a lent GPU machine), against the matmul peak measured in the same run.

Figures, written to --output as JSON and printed as a table:
- ``matmul_tflops``: the best of several large square matmuls in --dtype (the limit);
- training one personal LoRA (r 8 on q and v, the base frozen) with this repository's loop
  (oppu.training.train) on classification-shaped examples: a prompt prefix every example shares,
  a tail of its own, the loss on the last few tokens only. Tokens/s and model FLOPs utilisation
  (oppu.cost.train_flops: forward, activation gradients, attention, the LM head only where the
  loss is) for the plain path, the shared-prefix path and the paper's configuration (gradient
  checkpointing on), and their ratios;
- decoding with one personal LoRA per row: a batch of --users rows, each with its own adapter
  (each row through its own LoRA: ``oppu.serving.rows_through_their_loras``), against peft's own
  per-row path (``adapter_names``), the same batch on one adapter and user after user; new
  tokens/s, a fixed number of new tokens per row, the best of 3 after a warm-up;
- peak accelerator memory.

Usage:
    python benchmarks/gpu_bench.py                       # Llama-2-7b shape, bf16, on the GPU
    python benchmarks/gpu_bench.py --shape tiny --device cpu --dtype fp32   # the CPU check (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere

import torch  # noqa: E402

from oppu.adapters import USER_TARGETS, add_adapter, lora_config  # noqa: E402
from oppu.cost import train_flops  # noqa: E402
from oppu.modeling import check_transformers, prepare_model  # noqa: E402
from oppu.serving import rows_through_their_loras  # noqa: E402
from oppu.training import IGNORE_INDEX, MIN_SHARED_PREFIX, Encoded, TrainConfig, _summed_loss, collate, train  # noqa: E402
from utils import UserError, run_cli, write_json  # noqa: E402

# Llama-2-7b (its config.json) and a tiny shape of the same architecture for the CPU check
SHAPES = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--matmul_n", type=int, default=8192, help="side of the square matmuls of the limit")
    parser.add_argument("--examples", type=int, default=64, help="training examples (one epoch)")
    parser.add_argument("--length", type=int, default=256, help="tokens per training example")
    parser.add_argument("--prefix", type=int, default=192, help="of which every example shares the first N")
    parser.add_argument("--answer", type=int, default=4, help="tokens with a loss at the end of each example")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per optimiser step")
    parser.add_argument("--micro_batch_size", type=int, default=16)
    parser.add_argument("--users", type=int, default=8, help="personal LoRAs in the decoding batch")
    parser.add_argument("--prompt_length", type=int, default=256, help="decoding: prompt tokens per row")
    parser.add_argument("--new_tokens", type=int, default=32, help="decoding: new tokens per row")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "gpu_results.json"))
    parser.add_argument("--profile", help="also write torch.profiler tables of one training step per path here")
    parser.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """The best of ``repeats`` n x n matmuls, in TFLOP/s (after one warm-up)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = min(timed(device, lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e12


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A LlamaForCausalLM of the shape with random weights, built directly in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    check_transformers()
    config = LlamaConfig(**SHAPES[shape], vocab_size=32000, max_position_embeddings=4096, pad_token_id=0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None  # random weights: every row decodes exactly --new_tokens
    model.generation_config.pad_token_id = 0
    prepare_model(model)  # as load_model does
    return model.eval()


def make_examples(n: int, length: int, prefix: int, answer: int, vocab: int, seed: int = 0) -> list[Encoded]:
    """Classification-shaped examples: the same ``prefix`` tokens, a tail of their own, labels on
    the last ``answer`` tokens only."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(1, vocab, (prefix,), generator=g).tolist()
    examples = []
    for _ in range(n):
        ids = shared + torch.randint(1, vocab, (length - prefix,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (length - answer) + ids[length - answer :]
        examples.append(Encoded(ids, labels, truncated=False))
    return examples


# the training paths compared. "shared_prefix": the library's default, which on an accelerator
# shares only prefixes of MIN_SHARED_PREFIX_ACCELERATOR tokens or more; "shared_prefix_forced":
# shared from MIN_SHARED_PREFIX on, as on CPU (to find where it pays); "paper": the paper's
# configuration (gradient checkpointing on, no length grouping, no shared prefix). The examples
# are all of one length, so length grouping would change nothing but which examples meet in a
# batch: every path takes the plain shuffle, and all four train on the same batches (their
# losses must agree).
TRAIN_PATHS = {
    "plain": {"shared_prefix": False, "group_by_length": False},
    "shared_prefix": {"shared_prefix": True, "group_by_length": False},
    "shared_prefix_forced": {"shared_prefix": True, "min_shared_prefix": MIN_SHARED_PREFIX, "group_by_length": False},
    "paper": {"shared_prefix": False, "group_by_length": False, "gradient_checkpointing": True},
}


def measure_training(model, examples: list[Encoded], args, path: dict, peak: float) -> dict:
    """One epoch of a fresh personal LoRA (a warm-up step first) on one of TRAIN_PATHS; tokens/s
    and utilisation (the FLOPs of the model's work, so recomputation counts as lost time)."""
    peft = add_adapter(model, lora_config(argparse.Namespace(lora_r=8, lora_alpha=8, lora_dropout=0.0), USER_TARGETS))
    cfg = TrainConfig(
        learning_rate=1e-3,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        max_epoch=1,
        **path,
    )
    pad = SimpleNamespace(pad_token_id=0)
    train(peft, pad, examples[: args.micro_batch_size], TrainConfig(**(vars(cfg) | {"max_step": 1})))
    device = next(model.parameters()).device
    synchronize(device)
    result = train(peft, pad, examples, cfg)
    synchronize(device)
    peft.unload()
    flops = sum(train_flops(model.config, len(e.input_ids), args.answer + 1) for e in examples)
    return {
        "tokens_per_s": result.tokens / result.seconds,
        "examples_per_s": len(examples) / result.seconds,
        "mfu": flops / result.seconds / 1e12 / peak,
        "seconds": result.seconds,
        "steps": result.steps,
        "losses": result.losses,
    }


def profile_training(model, examples: list[Encoded], args, folder: Path) -> dict:
    """One micro-batch's forward and backward on the plain and the forced shared-prefix path:
    mean milliseconds over 5 (after 2 warm-ups), and torch.profiler's table of one more, sorted by
    device time, in ``folder/train_<path>.txt``. Where the device is idle for most of a step, the
    step is bound by the CPU launching kernels."""
    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    peft = add_adapter(model, lora_config(argparse.Namespace(lora_r=8, lora_alpha=8, lora_dropout=0.0), USER_TARGETS))
    peft.train()
    chunk = examples[: args.micro_batch_size]
    batch = {k: v.to(device) for k, v in collate(chunk, 0).items()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, prefix in (("plain", None), ("shared_prefix_forced", args.prefix)):

        def step(prefix=prefix):
            loss, _, _ = _summed_loss(peft, batch, prefix, MIN_SHARED_PREFIX)
            loss.backward()

        for _ in range(2):
            step()
        out[name] = 1000 * timed(device, lambda step=step: [step() for _ in range(5)]) / 5
        with profile(activities=activities) as prof:
            step()
            synchronize(device)
        (folder / f"train_{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
    peft.unload()
    return {"step_ms": out, "micro_batch": len(chunk), "folder": str(folder)}


def measure_decoding(model, args, device: torch.device) -> dict:
    """--users rows with one random personal LoRA each: mixed in one batch, all on one adapter,
    and user after user; new tokens/s of each."""
    from peft import get_peft_model

    names = [f"u{i}" for i in range(args.users)]
    config = lora_config(argparse.Namespace(lora_r=8, lora_alpha=8, lora_dropout=0.0), USER_TARGETS)
    torch.manual_seed(0)
    peft = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, config)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)  # every row really goes through its own weights
    peft.eval()
    ids = torch.randint(1, model.config.vocab_size, (args.users, args.prompt_length), device=device)
    mask = torch.ones_like(ids)
    new = args.new_tokens

    def run(rows: slice, adapter_names: list[str] | None = None, ours: bool = True):
        if adapter_names and not ours:  # peft's own per-row path, for comparison
            mixed = contextlib.nullcontext({"adapter_names": adapter_names})
        else:
            mixed = rows_through_their_loras(peft, adapter_names) if adapter_names else contextlib.nullcontext({})
        with torch.no_grad(), mixed as extra:
            peft.generate(
                input_ids=ids[rows],
                attention_mask=mask[rows],
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                **extra,
            )

    def one_by_one():
        for i, name in enumerate(names):
            peft.set_adapter(name)
            run(slice(i, i + 1))

    def single():
        peft.set_adapter(names[0])
        run(slice(None))

    modes = {
        "mixed": lambda: run(slice(None), names),
        "peft_adapter_names": lambda: run(slice(None), names, ours=False),
        "single_adapter": single,
        "sequential": one_by_one,
    }
    seconds = {}
    for mode, fn in modes.items():  # one warm-up each (new shapes, stacked weights), then the best of 3
        fn()
        seconds[mode] = min(timed(device, fn) for _ in range(3))
    peft.unload()
    tokens = args.users * new
    per_s = {k: tokens / v for k, v in seconds.items()}
    return {
        "new_tokens_per_s": per_s,
        "mixed_vs_single_adapter": per_s["mixed"] / per_s["single_adapter"],
        "mixed_vs_sequential": per_s["mixed"] / per_s["sequential"],
        "mixed_vs_peft_adapter_names": per_s["mixed"] / per_s["peft_adapter_names"],
        "rows": args.users,
        "new_tokens_per_row": new,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if not 0 < args.answer < args.length or not 0 <= args.prefix < args.length - 1:
        raise UserError("need 0 < --answer < --length and --prefix < --length - 1")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peak = matmul_tflops(device, dtype, args.matmul_n)
    print(f"[limit] {args.dtype} matmul {args.matmul_n}^2: {peak:.2f} TFLOP/s", flush=True)
    start = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    print(f"[model] {args.shape}: {model.num_parameters() / 1e9:.2f} B parameters, {time.perf_counter() - start:.0f} s")
    examples = make_examples(args.examples, args.length, args.prefix, args.answer, model.config.vocab_size)
    training = {name: measure_training(model, examples, args, path, peak) for name, path in TRAIN_PATHS.items()}
    decoding = measure_decoding(model, args, device)
    profiled = profile_training(model, examples, args, Path(args.profile)) if args.profile else None
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "shape": args.shape,
        "dtype": args.dtype,
        "parameters": model.num_parameters(),
        "matmul_tflops": peak,
        "train": training,
        "train_mfu": training["plain"]["mfu"],
        "prefix_speedup": training["shared_prefix"]["examples_per_s"] / training["plain"]["examples_per_s"],
        "prefix_speedup_forced": training["shared_prefix_forced"]["examples_per_s"]
        / training["plain"]["examples_per_s"],
        "train_speedup_vs_paper": training["shared_prefix"]["examples_per_s"] / training["paper"]["examples_per_s"],
        "decode": decoding,
        "mixed_vs_single_adapter": decoding["mixed_vs_single_adapter"],
        "mixed_vs_sequential": decoding["mixed_vs_sequential"],
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "profile": profiled,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "debug")},
    }
    write_json(Path(args.output), results)
    for name, r in training.items():
        print(f"train {name:20s} {r['tokens_per_s']:10.0f} tokens/s  MFU {r['mfu']:.2f}  ({r['steps']} steps)")
    print(
        f"shared prefix over plain: {results['prefix_speedup']:.2f}x, "
        f"over the paper's configuration: {results['train_speedup_vs_paper']:.2f}x"
    )
    if profiled:
        print(f"one step (ms): {profiled['step_ms']}; profiler tables in {profiled['folder']}")
    for name, v in decoding["new_tokens_per_s"].items():
        print(f"decode {name:14s} {v:10.1f} new tokens/s")
    print(
        f"mixed vs one adapter {results['mixed_vs_single_adapter']:.2f}x, vs user after user "
        f"{results['mixed_vs_sequential']:.2f}x; written {args.output}"
    )
    return results


if __name__ == "__main__":
    run_cli(main)
