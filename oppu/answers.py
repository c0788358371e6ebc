"""Answering queries: free generation (the paper's way) or scoring the task's fixed answers, and
how many answers are not answers (invalid labels or ratings, which the metrics score as worst)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from oppu.generation import DecodeConfig, generate
from oppu.tasks import Task
from oppu.training import IGNORE_INDEX, MIN_SHARED_PREFIX, Prefix, common_prefix_length, run_prefix, tokenize_and_mask
from prompts import format_target, is_valid_prediction

RATING_ANSWERS = ("1", "2", "3", "4", "5")
WARN_INVALID = 0.10  # above this share of invalid answers a stage prints a warning


def candidates(task: Task) -> tuple[str, ...]:
    """The answers scoring mode chooses among: the label list, or the ratings 1-5."""
    return task.labels if task.is_classification else RATING_ANSWERS


def answer(
    model,
    tokenizer,
    task: Task,
    prompts: Sequence[str],
    decode: DecodeConfig,
    mode: str = "generate",
    desc: str = "answer",
    show: bool = True,
) -> list[str]:
    """The model's raw answer to every prompt: its generation, or (``mode`` "score") the
    candidate answer it finds most likely."""
    if mode == "score":
        return score_answers(model, tokenizer, prompts, candidates(task), desc, show, decode.shared_prefix)
    return generate(model, tokenizer, prompts, decode, desc=desc, show=show)


def answer_rows(tokenizer, prompt: str, answers: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids and each answer's (its tokens and EOS, exactly as training appends them)."""
    encoded = [tokenize_and_mask(tokenizer, prompt, format_target(a), cut_off=1 << 30) for a in answers]
    n_prompt = encoded[0].labels.count(IGNORE_INDEX)
    return encoded[0].input_ids[:n_prompt], [e.input_ids[n_prompt:] for e in encoded]


def extend_prefix(prefix: Prefix, held: int, ids: Sequence[int]) -> Prefix:
    """``prefix`` (``held`` positions: virtual tokens and its text) followed by ``ids`` (one row, at
    least one token), as one Prefix: the shared tokens' keys and values are reused, not computed
    again, and stay untouched."""
    device = prefix.last_logits.device
    positions = torch.arange(held, held + len(ids), device=device).unsqueeze(0)
    ids_t = torch.tensor([list(ids)], device=device, dtype=torch.long)
    out = prefix.model(input_ids=ids_t, cache=prefix.cache(1), position_ids=positions, use_cache=True, logits_to_keep=1)
    return Prefix(prefix.model, [(k, v) for k, v, *_ in out.cache], prefix.virtual, out.logits[0, -1])


def _log_likelihoods(head: Prefix, held: int, tails: Sequence[Sequence[int]], pad_id: int) -> list[float]:
    """Each tail's log-likelihood behind ``head`` (the whole prompt, run; ``held`` positions in its
    cache, virtual tokens included): its rows share the prompt's keys and values."""
    first = torch.log_softmax(head.last_logits.float(), dim=-1)  # predicts each answer's first token
    device = first.device
    width = max(len(t) for t in tails)
    ids = torch.full((len(tails), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(tails), held + width), dtype=torch.long, device=device)
    mask[:, :held] = 1
    for i, tail in enumerate(tails):
        ids[i, : len(tail)] = torch.tensor(tail)
        mask[i, held : held + len(tail)] = 1
    positions = torch.arange(held, held + width, device=device).expand(len(tails), -1)
    logits = head.model(input_ids=ids, attention_mask=mask, cache=head.cache(len(tails)), position_ids=positions).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [float(first[t[0]] + sum(logp[i, j - 1, t[j]] for j in range(1, len(t)))) for i, t in enumerate(tails)]


@torch.no_grad()
def answer_log_likelihoods(model, tokenizer, prompt: str, answers: Sequence[str]) -> list[float]:
    """Log-likelihood of each answer after the prompt. The prompt runs once; its keys and values
    are shared by every answer's row."""
    prompt_ids, tails = answer_rows(tokenizer, prompt, answers)
    device = next(model.parameters()).device
    head = run_prefix(model, torch.tensor([prompt_ids], device=device))
    return _log_likelihoods(head, head.virtual + len(prompt_ids), tails, tokenizer.pad_token_id)


@torch.no_grad()
def score_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    desc: str = "score",
    show: bool = True,
    shared_prefix: bool = True,
) -> list[str]:
    """For every prompt, the answer with the highest log-likelihood (ties: the earlier answer).
    With ``shared_prefix``, the tokens all prompts start with (chat template, instruction, label
    list) run once for the call, as in generate(); each prompt then runs only its own tokens."""
    rows = [answer_rows(tokenizer, p, answers) for p in prompts]
    shared = common_prefix_length([ids for ids, _ in rows]) if shared_prefix and len(rows) > 1 else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    device = next(model.parameters()).device
    base = run_prefix(model, torch.tensor([rows[0][0][:shared]], device=device)) if shared else None
    chosen = []
    for prompt_ids, tails in tqdm(rows, desc=desc, leave=False, disable=not show):
        head = (
            extend_prefix(base, base.virtual + shared, prompt_ids[shared:])
            if base
            else run_prefix(model, torch.tensor([prompt_ids], device=device))
        )
        scores = _log_likelihoods(head, head.virtual + len(prompt_ids), tails, tokenizer.pad_token_id)
        chosen.append(answers[max(range(len(answers)), key=lambda i: (scores[i], -i))])
    return chosen


def invalid_fraction(task: Task, predictions: Mapping[str, str] | Sequence[str]) -> float:
    """Share of predictions that are not a valid answer for the task (0 when there are none)."""
    values = list(predictions.values()) if isinstance(predictions, Mapping) else list(predictions)
    return sum(not is_valid_prediction(task, p) for p in values) / len(values) if values else 0.0


def invalid_warning(task: Task, fraction: float, stage: str, trained: bool = True) -> str | None:
    """A warning naming the likely cause and the flag to change, when too many answers are invalid
    (``trained`` False: the base model, which no training of ours has shown the format)."""
    if fraction <= WARN_INVALID:
        return None
    what = "a label of the task" if task.is_classification else "a rating" if task.kind == "rating" else "any text"
    advice = (
        "the adapter has not learnt the answer format: too few optimiser steps (raise --max_epoch or --min_steps, "
        "or lower --batch_size) or too low a learning rate (raise --learning_rate; the paper's 1e-4 is for 7B "
        "models)"
        if trained
        else "the model without an adapter does not follow the task's answer format"
    )
    if task.kind != "generation":
        advice += ", or answer with --answer_mode score, which always picks a valid answer"
    return f"warning: {stage}: {fraction:.0%} of the answers are not {what}; {advice}"


def answer_stats(task: Task, predictions: Mapping[str, str]) -> dict[str, float | int]:
    """What a stage records beside its predictions about how many are real answers."""
    return {"predictions": len(predictions), "invalid_fraction": round(invalid_fraction(task, predictions), 4)}


def report_answers(task: Task, predictions: Mapping[str, str], path, stage: str, trained: bool = True) -> float:
    """The stage's summary line (and the warning when too many answers are invalid)."""
    fraction = invalid_fraction(task, predictions)
    print(f"{stage}: wrote {len(predictions)} predictions to {path}; {fraction:.1%} are not valid answers")
    warning = invalid_warning(task, fraction, stage, trained)
    if warning:
        print(warning)
    return fraction
