"""Serving many users' PEFTs: mixed batches equal per-user answers, lazy loading stays within its bound."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from oppu.adapters import add_adapter, lora_config, remove_adapter, save_adapter
from oppu.answers import answer as answer_alone
from oppu.generation import DecodeConfig, prompt_ids
from oppu.serving import AdapterPool, Request, adapter_name, answer, plan_waves
from oppu.tasks import get_task
from prompts import render_query_input

TASK = get_task("news_categorize")
ARTICLES = ["a harbour festival", "a stadium opening", "a vote on school prayer", "a vegan bakery award"]


def identity(**settings) -> dict:
    """What serving reads of an exported PEFT's oppu_peft.json (k=0: no history is needed)."""
    return {
        "task_name": TASK.name,
        "base_model": "tiny",
        "k": 0,
        "add_profile": False,
        "profile": None,
        "task_adapter": {"sha256": "same"},
        "settings": settings,
    }


@pytest.fixture(scope="module")
def pefts(tmp_path_factory, tiny_model) -> list[Path]:
    """Three users' random LoRAs (B not zero, so each changes the answers) on the same tiny base."""
    root = tmp_path_factory.mktemp("pefts")
    args = argparse.Namespace(lora_r=8, lora_alpha=8, lora_dropout=0.05)
    model, folders = tiny_model(0), []
    for user in range(3):
        torch.manual_seed(100 + user)
        config = lora_config(args, ("q_proj", "v_proj"))
        config.init_lora_weights = False
        peft_model = add_adapter(model, config)
        folders.append(root / f"user{user}")
        save_adapter(peft_model, folders[-1])
        model = remove_adapter(peft_model)
    return folders


def requests_of(pefts: list[Path]) -> list[Request]:
    """Users interleaved, and the same input sent by every user (rows must not be mixed up)."""
    inputs = [render_query_input(TASK, text=a) for a in ARTICLES]
    return [Request(f"u{u}-q{q}", pefts[u], inputs[q]) for q in range(len(inputs)) for u in (2, 0, 1)]


def alone(tiny_model, tokenizer, folder: Path, prompts: list[str], cfg: DecodeConfig) -> list[str]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_model(0), str(folder)).eval()
    return answer_alone(model, tokenizer, TASK, prompts, cfg, show=False)


@pytest.mark.parametrize("max_loaded", [3, 2])
def test_mixed_batch_answers_equal_per_user_answers(pefts, tiny_model, tokenizer, max_loaded, monkeypatch):
    from oppu.serving import RowAdapters

    requests = requests_of(pefts)
    identities = {f: identity() for f in pefts}
    cfg = DecodeConfig(max_new_tokens=6, batch_size=5)
    batches, real = [], RowAdapters.prefix_cache
    monkeypatch.setattr(RowAdapters, "prefix_cache", lambda self, names: batches.append(names) or real(self, names))
    mixed, pool = answer(tiny_model(0), tokenizer, requests, identities, cfg, max_loaded, show=False)
    assert any(len(set(names)) > 1 for names in batches)  # the shared prefix ran per adapter in mixed batches
    from oppu.serving import build_prompts

    prompts = build_prompts(requests, identities)
    for folder in pefts:
        mine = [i for i, r in enumerate(requests) if r.peft == folder]
        assert [mixed[i] for i in mine] == alone(tiny_model, tokenizer, folder, [prompts[i] for i in mine], cfg)
    by_user = {r.peft: mixed[i] for i, r in enumerate(requests) if r.input == requests[0].input}
    assert len(set(by_user.values())) > 1  # the users' adapters really answer differently
    assert pool.peak <= max_loaded and pool.loads == 3  # each user loaded once: their requests go together


def test_prompts_cut_at_cut_off_are_served_with_their_own_users_adapters(pefts, tiny_model, tokenizer):
    """Prompts longer than --cut_off are cut as generate() cuts them; prompts of different
    lengths that cut to the same tokens still go through their own users' adapters."""
    from oppu.serving import build_prompts
    from oppu.training import template_head

    fillers = {0: 30, 1: 20, 2: 10}  # every user's text ends the same; their lengths differ
    inputs = {u: [render_query_input(TASK, text="x " * n + a) for a in ARTICLES[:2]] for u, n in fillers.items()}
    requests = [Request(f"u{u}-q{q}", pefts[u], inputs[u][q]) for q in range(2) for u in (2, 0, 1)]
    identities = {f: identity() for f in pefts}
    cfg = DecodeConfig(max_new_tokens=6, batch_size=6, cut_off=len(template_head(tokenizer)) + 10 + 6)
    mixed, _ = answer(tiny_model(0), tokenizer, requests, identities, cfg, 3, show=False)
    prompts = build_prompts(requests, identities)
    cut = prompt_ids(tokenizer, prompts, cfg, report=False)
    assert len({tuple(ids) for ids in cut}) == 2 and len(set(prompts)) == 6  # six prompts, two cut prompts
    for folder in pefts:
        mine = [i for i, r in enumerate(requests) if r.peft == folder]
        assert [mixed[i] for i in mine] == alone(tiny_model, tokenizer, folder, [prompts[i] for i in mine], cfg)
    assert len({mixed[i] for i, r in enumerate(requests) if r.input in {v[0] for v in inputs.values()}}) > 1


def test_rows_through_their_loras_equal_peft_s_per_row_selection(pefts, tiny_model):
    """Each row through its own LoRA by stacked products gives peft's per-row logits, and every
    projection has its own forward back afterwards."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from oppu.serving import rows_through_their_loras

    model = PeftModel.from_pretrained(tiny_model(0), str(pefts[0]), adapter_name="a")
    model.load_adapter(str(pefts[1]), adapter_name="b")
    model.eval()
    ids, names = torch.randint(5, 200, (3, 7)), ["b", "a", "b"]
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
        with rows_through_their_loras(model, names):
            got = model(input_ids=ids).logits
        model.set_adapter("a")
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], plain[0])  # row 0 went through b, not the active adapter a
    torch.testing.assert_close(got[1], plain[1], rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, LoraLayer))


def test_rows_of_adapters_of_other_ranks_and_targets_mix_and_others_fall_back_to_peft(tiny_model, tmp_path):
    """Users' LoRAs may differ in rank and in the projections they adapt: the stacked path pads
    ranks with zeros and gives a row no update where its adapter is absent, as peft's per-row
    path does. A LoRA on the embeddings is left to peft's own path."""
    from peft import LoraConfig, PeftModel

    from oppu.serving import rows_through_their_loras

    def saved(name: str, **settings) -> Path:
        torch.manual_seed(len(name))
        config = LoraConfig(init_lora_weights=False, lora_alpha=8, **settings)
        peft_model = add_adapter(tiny_model(0), config)
        save_adapter(peft_model, tmp_path / name)
        return tmp_path / name

    a, b = saved("a", r=8, target_modules=["q_proj", "v_proj"]), saved("bb", r=4, target_modules=["q_proj", "k_proj"])
    model = PeftModel.from_pretrained(tiny_model(0), str(a), adapter_name="a")
    model.load_adapter(str(b), adapter_name="b")
    model.eval()
    ids, names = torch.randint(5, 200, (3, 7)), ["b", "a", "a"]
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
        with rows_through_their_loras(model, names) as extra:
            assert extra == {}
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a batch of a's rows only: k_proj, which only b (loaded, not in the batch) adapts, runs the
    # base alone; peft's own forward there would apply the active adapter b to every row
    model.set_adapter("b")
    with torch.no_grad():
        want = model(input_ids=ids[:2], adapter_names=["a", "a"]).logits
        with rows_through_their_loras(model, ["a", "a"]):
            got = model(input_ids=ids[:2]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    emb = PeftModel.from_pretrained(tiny_model(0), str(saved("ccc", r=4, target_modules=["embed_tokens", "q_proj"])))
    with rows_through_their_loras(emb, ["default", "default"]) as extra:
        assert extra == {"adapter_names": ["default", "default"]}


def test_lazy_loading_respects_the_bound_and_evicts_least_recently_used(pefts, tiny_model):
    a, b, c = pefts
    pool = AdapterPool(tiny_model(0), max_loaded=2)
    assert pool.model is None and pool.loads == 0  # nothing is loaded before it is asked for
    pool.use([a]), pool.use([b]), pool.use([a]), pool.use([c])  # b is the least recently used
    assert list(pool.loaded) == [adapter_name(a), adapter_name(c)] and pool.loads == 3
    pool.use([b, c])  # a goes, c stays because this batch needs it
    assert set(pool.loaded) == {adapter_name(b), adapter_name(c)} and pool.loads == 4 and pool.peak == 2
    assert set(pool.model.peft_config) == set(pool.loaded)  # evicted adapters are really deleted
    with pytest.raises(ValueError, match="more than max_loaded"):
        pool.use([a, b, c])


def test_waves_keep_each_users_requests_together_within_the_bound():
    folders = [Path(x) for x in "abacbdca"]
    assert plan_waves(folders, 2) == [[0, 2, 7, 1, 4], [3, 6, 5]]
    assert plan_waves(folders, 10) == [[0, 2, 7, 1, 4, 3, 6, 5]]


def test_pefts_served_together_must_agree_on_their_kind_and_how_their_runs_answered():
    """The first PEFT's settings decide how a request is served: a PEFT of another kind, or
    whose run answered otherwise, is refused unless the command says it for all."""
    from oppu.ownership import same_stack
    from utils import UserError

    a, b = Path("a"), Path("b")
    assert same_stack({a: identity(), b: identity(answer_mode="generate")}, ["answer_mode"])  # the default
    scored = {a: identity(), b: identity(answer_mode="score", max_new_tokens=4)}
    with pytest.raises(UserError, match="b: answer_mode 'score' differs from a's 'generate'; serve them in separate"):
        same_stack(scored, ["answer_mode", "max_new_tokens"])
    with pytest.raises(UserError, match="b: max_new_tokens 4 differs from a's None"):
        same_stack(scored, ["max_new_tokens"])
    assert same_stack(scored)  # --answer_mode and --max_new_tokens given: one setting for all
    with pytest.raises(UserError, match="b: peft_type 'ia3' differs from a's 'lora'; serve them in separate calls$"):
        same_stack({a: identity(), b: identity(peft_type="ia3")})
    with pytest.raises(UserError, match="b: cut_off 1024 differs from a's 2048; serve them in separate calls$"):
        same_stack({a: identity(cut_off=2048), b: identity(cut_off=1024)}, ["answer_mode"])
