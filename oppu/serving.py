"""Answering (user, input) pairs with each user's saved PEFT: users mixed in one batch, each row
through its own LoRA, adapters loaded on first use and at most N kept in memory."""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict, defaultdict, deque
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from oppu import answers, ownership
from oppu.adapters import merge_adapter
from oppu.examples import query_prompts
from oppu.generation import DecodeConfig, prompt_ids
from oppu.modeling import ModelSpec, load_model
from oppu.tasks import get_task
from oppu.training import Prefix
from utils import UserError


@dataclass(frozen=True)
class Request:
    id: str
    peft: Path  # an exported PEFT folder (export_user.py, OPPU.py --user_file)
    input: str  # the query input, as in the per-user format


def adapter_name(folder: Path) -> str:
    """A name for a PEFT inside the serving model (peft module keys cannot hold dots)."""
    return "peft_" + hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:12]


class AdapterPool:
    """Personal adapters on one shared model, loaded on first use; when ``max_loaded`` are in
    memory, the least recently used one that the next batch does not need is deleted first."""

    def __init__(self, base_model, max_loaded: int) -> None:
        if max_loaded < 1:
            raise UserError("--max_loaded_adapters must be >= 1")
        self.base, self.model, self.max_loaded = base_model, None, max_loaded
        self.loaded: OrderedDict[str, Path] = OrderedDict()
        self.loads = 0
        self.peak = 0

    def use(self, folders: Sequence[Path]) -> list[str]:
        """Make every folder's adapter resident (at most ``max_loaded`` distinct); their names."""
        names = [adapter_name(f) for f in folders]
        wanted = dict(zip(names, folders))
        if len(wanted) > self.max_loaded:
            raise ValueError(f"{len(wanted)} adapters in one batch, more than max_loaded {self.max_loaded}")
        for name, folder in wanted.items():
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            while len(self.loaded) >= self.max_loaded:
                victim = next(n for n in self.loaded if n not in wanted)
                with warnings.catch_warnings():  # peft warns when the active adapter goes; the next batch sets its own
                    warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                    self.model.delete_adapter(victim)
                del self.loaded[victim]
            self._load(name, folder)
        return names

    def _load(self, name: str, folder: Path) -> None:
        from peft import PeftModel

        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name, use_safetensors=True)
        else:
            self.model.load_adapter(str(folder), adapter_name=name, use_safetensors=True)
        self.model.eval()
        self.loaded[name] = folder
        self.loads += 1
        self.peak = max(self.peak, len(self.loaded))


def _stackable(module, names: Sequence[str]) -> bool:
    """Whether a LoRA layer's update for these adapters is plain x A B (scaled) on a Linear."""
    mine = [n for n in dict.fromkeys(names) if n in module.lora_A]
    return (
        isinstance(module.base_layer, torch.nn.Linear)
        and not module.merged
        and not module.disable_adapters
        and not any(module.use_dora.get(n) for n in mine)
        and not any(getattr(module, "lora_bias", {}).get(n) for n in mine)
    )


def _row_weights(module, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' A (rows, in, r) and scaled B (rows, r, out), every rank zero-padded to the
    largest (the padding adds nothing); a row whose adapter leaves this layer alone gets zeros."""
    # sizes from the layer, not the base weight, which a quantized base stores packed
    like = next(module.lora_A[n].weight for n in names if n in module.lora_A)
    rank = max(module.lora_A[n].weight.size(0) for n in names if n in module.lora_A)
    a = like.new_zeros((len(names), module.in_features, rank))
    b = like.new_zeros((len(names), rank, module.out_features))
    for row, name in enumerate(names):
        if name in module.lora_A:
            r = module.lora_A[name].weight.size(0)
            a[row, :, :r] = module.lora_A[name].weight.t()
            b[row, :r] = (module.lora_B[name].weight * module.scaling[name]).t()
    return a, b


@contextmanager
def rows_through_their_loras(peft_model, names: Sequence[str]):
    """Inside, each row of a batch goes through its own LoRA (``names``, one per row): for every
    adapted projection the rows' A and B (scaled) are stacked once, and all rows' updates are
    two batched products. peft's ``adapter_names`` loops over the adapters in every projection
    instead, which cost a decoding step of 8 users half as much again as one adapter's (0.57 s
    against 0.37 s, 1 thread). LoRA dropout is off: serving runs in eval mode.

    Yields the keyword arguments the model's call needs: none, or, where some layer is not a
    plain LoRA on a Linear (an embedding, DoRA, a LoRA bias), ``adapter_names`` for peft's own
    per-row path, untouched."""
    from peft.tuners.lora import LoraLayer

    def holds(m, wanted) -> bool:  # lora_A/B, or lora_embedding_A/B in an embedding layer
        return any(n in getattr(m, attr) for attr in m.adapter_layer_names for n in wanted)

    lora_layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    layers = [m for m in lora_layers if holds(m, names)]
    # a layer that only other loaded adapters adapt (PEFTs of other target modules) would run
    # peft's forward, which applies the active adapter to every row: it runs the base layer alone
    others = [m for m in lora_layers if not holds(m, names) and any(getattr(m, a) for a in m.adapter_layer_names)]
    if not all(_stackable(m, names) for m in layers):
        yield {"adapter_names": list(names)}
        return
    patched = []
    try:
        for module in others:
            module.forward = module.base_layer.forward
            patched.append(module)
        for module in layers:
            a, b = _row_weights(module, names)

            def forward(x, *args, _base=module.base_layer, _a=a, _b=b, **kwargs):
                if x.size(0) != _a.size(0):
                    raise RuntimeError(f"{x.size(0)} rows in a batch of {_a.size(0)} users' adapters")
                out = _base(x, *args, **kwargs)
                return out + torch.bmm(torch.bmm(x.to(_a.dtype), _a), _b).to(out.dtype)

            module.forward = forward
            patched.append(module)
        yield {}
    finally:
        for module in patched:
            del module.forward


class RowPrefix(Prefix):
    """The prompts' shared prefix under several users' adapters: its keys and values differ per
    adapter (a LoRA on v changes them), so RowAdapters computes them once a batch's rows are known."""

    def cache(self, rows: int):
        return None


class RowAdapters:
    """The serving model as generate() sees it: each row of a batch is answered with its own
    adapter. Rows are matched to their request by their unpadded token ids (identical prompts
    of several users are taken in request order, which generate()'s stable sort keeps). A shared
    prefix runs once per adapter and each row gets its adapter's keys and values."""

    def __init__(self, peft_model, rows: Sequence[tuple[list[int], str]]) -> None:
        self.peft_model = peft_model
        self.queues: dict[tuple[int, ...], deque[str]] = defaultdict(deque)
        for ids, name in rows:
            self.queues[tuple(ids)].append(name)
        self.prefix_ids: torch.Tensor | None = None
        self.prefix_kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per adapter, batch 1

    def parameters(self):
        return self.peft_model.parameters()

    @property
    def config(self):
        return self.peft_model.config

    def run_prefix(self, prefix_ids: torch.Tensor) -> RowPrefix:
        """Called by generate() for the prompts' shared prefix (see oppu.training.run_prefix)."""
        self.prefix_ids = prefix_ids
        return RowPrefix(self, [], 0, prefix_ids.new_zeros(0))

    def prefix_cache(self, names: list[str]):
        """Each row's prefix keys and values under its own adapter. The prefix runs once per adapter
        for the whole call (one row per adapter not seen yet), not again in every batch."""
        from transformers import DynamicCache

        new = [n for n in dict.fromkeys(names) if n not in self.prefix_kv]
        if new:
            ids = self.prefix_ids.expand(len(new), -1)
            with rows_through_their_loras(self.peft_model, new) as extra:
                out = self.peft_model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra)
            layers = [(k, v) for k, v, *_ in out.cache]
            for i, name in enumerate(new):
                self.prefix_kv[name] = [(k[i : i + 1], v[i : i + 1]) for k, v in layers]
        per_layer = zip(*(self.prefix_kv[n] for n in names))
        return DynamicCache(ddp_cache_data=[tuple(torch.cat(t) for t in zip(*layer)) for layer in per_layer])

    def generate(self, input_ids, attention_mask, **kwargs):
        names = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            key = tuple(i for i, m in zip(ids, mask) if m)
            if not self.queues.get(key):
                raise RuntimeError("a decoded row matches no request: generate() changed how it encodes prompts")
            names.append(self.queues[key].popleft())
        if self.prefix_ids is not None:
            kwargs["cache"] = self.prefix_cache(names)
        if len(set(names)) == 1:  # one user: the plain single-adapter path
            self.peft_model.set_adapter(names[0])
            return self.peft_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        with rows_through_their_loras(self.peft_model, names) as extra:
            return self.peft_model.generate(input_ids=input_ids, attention_mask=attention_mask, **extra, **kwargs)


def plan_waves(folders: Sequence[Path], max_loaded: int) -> list[list[int]]:
    """Request indices in groups of at most ``max_loaded`` users, each user's requests together
    and users in order of first appearance: every group is decoded with all its adapters resident."""
    by_user: dict[Path, list[int]] = defaultdict(list)
    for i, folder in enumerate(folders):
        by_user[folder].append(i)
    users = list(by_user)
    return [[i for u in users[s : s + max_loaded] for i in by_user[u]] for s in range(0, len(users), max_loaded)]


def build_prompts(requests: Sequence[Request], identities: dict[Path, dict]) -> list[str]:
    """Each request's prompt as its PEFT was trained: retrieval from the user's own history when
    k > 0, the profile when trained with one (oppu.examples.query_prompts)."""
    prompts = [""] * len(requests)
    for folder, identity in identities.items():
        task = get_task(identity["task_name"])
        mine = [i for i, r in enumerate(requests) if r.peft == folder]
        user = ownership.read_history(folder, identity) if identity["k"] > 0 else {"profile": []}
        user = user | {"query": [{"id": requests[i].id, "input": requests[i].input} for i in mine]}
        profile = identity["profile"] if identity["add_profile"] else None
        retrieval = ownership.prompt_setting(identity, "retrieval")
        for i, prompt in zip(mine, query_prompts(task, user, identity["k"], profile, retrieval)):
            prompts[i] = prompt
    return prompts


def answer(
    model,
    tokenizer,
    requests: Sequence[Request],
    identities: dict[Path, dict],
    cfg: DecodeConfig,
    max_loaded: int,
    mode: str | None = None,
    show: bool = True,
) -> tuple[list[str], AdapterPool]:
    """The raw answer to every request, in order, each with its user's PEFT on ``model`` (the
    base with the task adapter merged in), and the pool that held the adapters. LoRA PEFTs that
    generate are batched across users; other kinds (and --answer_mode score or constrained) go user by user.
    Greedy answers equal answering each user alone."""
    stack = ownership.same_stack(identities)
    task = get_task(stack["task_name"])
    mode = mode or ownership.prompt_setting(stack, "answer_mode")
    mixed = mode == "generate" and ownership.prompt_setting(stack, "peft_type") == "lora"
    pool = AdapterPool(model, max_loaded if mixed else 1)
    prompts = build_prompts(requests, identities)
    outputs = [""] * len(requests)
    waves = plan_waves([r.peft for r in requests], pool.max_loaded)
    for w, wave in enumerate(waves):
        names = pool.use([requests[i].peft for i in wave])
        if mixed and len(set(names)) > 1:
            ids = prompt_ids(tokenizer, [prompts[i] for i in wave], cfg, report=False)  # as generate() cuts them
            rows = list(zip(ids, names))
            serving, wave_cfg = RowAdapters(pool.model, rows), cfg
        else:  # one user: exactly the path their training run answered with
            pool.model.set_adapter(names[0])
            serving, wave_cfg = pool.model, cfg
        texts = answers.answer(
            serving,
            tokenizer,
            task,
            [prompts[i] for i in wave],
            wave_cfg,
            mode,
            desc=f"answer (users group {w + 1}/{len(waves)})",
            show=show,
        )
        for i, text in zip(wave, texts):
            outputs[i] = text
    return outputs, pool


def load_serving_model(identity: dict, spec: ModelSpec, task_lora: Path | None, where: str):
    """(model, tokenizer): the PEFTs' base with their task adapter merged in, after checking both
    against the PEFTs' identity. ``spec.name`` may be a merged base from export_user.py."""
    merged = (Path(spec.name) / ownership.MERGED_FILE).is_file()
    ownership.check_base(identity, spec, where)
    if merged and task_lora is not None:  # it is in the merged base already
        raise UserError(
            f"--task_lora {task_lora}: {spec.name} is a merged base that holds its task adapter; leave --task_lora out"
        )
    if merged:
        ownership.check_merged_base(identity, Path(spec.name), where)
    else:
        task_lora = Path(task_lora or identity["task_adapter"]["path"])
        ownership.check_task_adapter(identity, task_lora, where)
    model, tokenizer = load_model(spec)
    return (model if merged else merge_adapter(model, task_lora)), tokenizer
