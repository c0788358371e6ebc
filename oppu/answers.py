"""Answering queries: free generation (the paper's way), scoring the task's fixed answers, or
greedy decoding kept to them, and how many answers are not answers (invalid labels or ratings, which the metrics score as worst)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from oppu.generation import DecodeConfig, generate
from oppu.tasks import Task
from oppu.training import (
    IGNORE_INDEX,
    MIN_SHARED_PREFIX,
    Prefix,
    additive_mask,
    attention_window,
    common_prefix_length,
    encode_prompts,
    packed_rows,
    prompt_tuned,
    run_prefix,
    shares_prefix,
    tokenize_and_mask,
    virtual_tokens,
)
from prompts import format_target, is_valid_prediction

RATING_ANSWERS = ("1", "2", "3", "4", "5")
# generate: free text (the paper's way); score: the most likely answer; constrained: greedy decoding
# kept to the task's answers. The last two are for tasks with fixed answers only.
ANSWER_MODES = ("generate", "score", "constrained")
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
    """The model's raw answer to every prompt: its generation, the candidate answer it finds most
    likely (``mode`` "score"), or its greedy generation kept to the candidates ("constrained")."""
    if mode in PACKED:
        pick = PACKED[mode]
        return pick(
            model, tokenizer, prompts, candidates(task), desc, show, decode.shared_prefix, cut_off=decode.cut_off
        )
    return generate(model, tokenizer, prompts, decode, desc=desc, show=show)


def answer_rows(tokenizer, prompt: str, answers: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids and each answer's (its tokens and EOS, exactly as training appends them)."""
    encoded = [tokenize_and_mask(tokenizer, prompt, format_target(a), cut_off=1 << 30) for a in answers]
    n_prompt = encoded[0].labels.count(IGNORE_INDEX)
    return encoded[0].input_ids[:n_prompt], [e.input_ids[n_prompt:] for e in encoded]


SCORE_TOKENS = 512  # packed tokens per forward pass in scoring mode (memory; attention grows with it)


def packed_log_probs(
    model, prefix: Prefix | None, rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]
) -> tuple[torch.Tensor, dict[int, int], list[list[list[int]]]]:
    """One forward pass over ``rows`` packed (see ``packed_rows``) behind ``prefix``'s cached keys
    and values, which stay untouched; without a prefix the rows hold whole prompts. Returns the
    next-token log-probabilities at the positions that predict an answer's token, the row of each
    packed position among them, and ``packed_rows``'s indices per prompt and answer."""
    held = prefix.kv[0][0].size(-2) if prefix else 0  # virtual tokens and shared text
    ids, positions, mask, where = packed_rows(rows, held)
    device = next(model.parameters()).device
    keep = sorted({i for per_answer in where for idx in per_answer for i in idx})
    runner = prefix.model if prefix else model
    dtype = next(runner.parameters()).dtype
    out = runner(
        input_ids=torch.tensor([ids], device=device),
        attention_mask=additive_mask(mask, dtype)[None, None].to(device),
        position_ids=torch.tensor([positions], device=device),
        cache=prefix.cache(1) if prefix else None,
        use_cache=bool(prefix),
        logits_to_keep=torch.tensor(keep, device=device),
    )
    return torch.log_softmax(out.logits[0].float(), dim=-1), {i: n for n, i in enumerate(keep)}, where


def packed_log_likelihoods(
    model, prefix: Prefix | None, rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]
) -> list[list[float]]:
    """Every answer's log-likelihood behind its prompt, all ``rows`` in one forward pass (see
    ``packed_log_probs``)."""
    logp, column, where = packed_log_probs(model, prefix, rows)
    return [likelihoods(logp, column, per_answer, tails) for per_answer, (_, tails) in zip(where, rows)]


def likelihoods(
    logp: torch.Tensor, column: Mapping[int, int], per_answer: Sequence[Sequence[int]], tails: Sequence[Sequence[int]]
) -> list[float]:
    """Each answer's log-likelihood behind one prompt, from ``packed_log_probs``'s rows."""
    return [sum(float(logp[column[i], t]) for i, t in zip(idx, tail)) for idx, tail in zip(per_answer, tails)]


@torch.no_grad()
def answer_log_likelihoods(model, tokenizer, prompt: str, answers: Sequence[str]) -> list[float]:
    """Log-likelihood of each answer after the prompt: the prompt's tokens run once and every
    answer sees them (see ``packed_rows``)."""
    prompt_ids, tails = answer_rows(tokenizer, prompt, answers)
    device = next(model.parameters()).device
    prefix = run_prefix(model, torch.tensor([[]], device=device, dtype=torch.long)) if prompt_tuned(model) else None
    return packed_log_likelihoods(model, prefix, [(prompt_ids, tails)])[0]


def packed_passes(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    probes: Callable[[list[list[int]]], Sequence[Sequence[int]]],
    desc: str,
    show: bool,
    shared_prefix: bool,
    max_tokens: int,
    cut_off: int | None,
) -> Iterator[tuple[list[list[int]], torch.Tensor, dict[int, int], list[list[list[int]]]]]:
    """The forward passes both scoring and constrained decoding run: every prompt with the token
    rows ``probes`` makes of the answers' tails (each answer's tokens and EOS) packed behind it,
    in passes of about ``max_tokens`` tokens, in the prompts' order; per pass, the tails and
    ``packed_log_probs``'s output. With ``shared_prefix``, the tokens all prompts start with (chat
    template, instruction, label list) run once for the call, as in generate(), and every pass
    sees them. A prompt longer than ``cut_off`` less the longest answer loses its oldest text
    first, so that any answer fits behind it."""
    tails = answer_rows(tokenizer, prompts[0], answers)[1]  # an answer's tokens do not depend on the prompt
    behind = probes(tails)
    budget = DecodeConfig(cut_off=cut_off).prompt_budget(max(len(t) for t in tails))
    rows = [(ids, behind) for ids in encode_prompts(tokenizer, prompts, budget)]
    longest = max(len(ids) for ids, _ in rows) + max(len(t) for t in tails) + virtual_tokens(model)
    if not shares_prefix(model, longest):  # packed passes mask rows apart, not a sliding window
        raise ValueError(
            f"scoring packs answers behind their prompt, which a sliding attention window of "
            f"{attention_window(model)} tokens does not allow for sequences of {longest}: answer by generation"
        )
    shared = common_prefix_length([ids for ids, _ in rows]) if shared_prefix else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    device = next(model.parameters()).device
    # A prompt-tuning adapter's virtual tokens always run once, ahead of whatever text is shared.
    cached = bool(shared) or prompt_tuned(model)
    prefix = run_prefix(model, torch.tensor([rows[0][0][:shared]], device=device, dtype=torch.long)) if cached else None
    passes: list[list[tuple[list[int], Sequence[Sequence[int]]]]] = [[]]
    filled = 0  # tokens in the last pass
    for ids, probe in rows:
        size = len(ids) - shared + sum(len(t) - 1 for t in probe)
        if passes[-1] and filled + size > max_tokens:
            passes.append([])
            filled = 0
        passes[-1].append((ids[shared:], probe))
        filled += size
    for batch in tqdm(passes, desc=desc, leave=False, disable=not show):
        yield (tails, *packed_log_probs(model, prefix, batch))


@torch.no_grad()
def score_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    desc: str = "score",
    show: bool = True,
    shared_prefix: bool = True,
    max_tokens: int = SCORE_TOKENS,
    cut_off: int | None = None,
) -> list[str]:
    """For every prompt, the answer with the highest log-likelihood (ties: the earlier answer),
    each answer packed behind its prompt (see ``packed_passes``)."""
    if not prompts:  # e.g. a user file with a history and no queries
        return []
    chosen = []
    passes = packed_passes(
        model, tokenizer, prompts, answers, lambda tails: tails, desc, show, shared_prefix, max_tokens, cut_off
    )
    for tails, logp, column, where in passes:
        for per_answer in where:
            scores = likelihoods(logp, column, per_answer, tails)
            chosen.append(answers[max(range(len(answers)), key=lambda i: (scores[i], -i))])
    return chosen


def decision_points(tails: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The token paths after which greedy decoding restricted to these answers (each its tokens
    and EOS) has a choice to make: every path that two answers continue with different tokens,
    the empty path first when they differ in their first token. After any other path the next
    token is forced."""
    points, seen = [], set()
    for tail in tails:
        for n in range(len(tail)):
            path = tuple(tail[:n])
            if path in seen:
                continue
            seen.add(path)
            if len({t[n] for t in tails if len(t) > n and tuple(t[:n]) == path}) > 1:
                points.append(path)
    return points


def greedy_choice(tails: Sequence[Sequence[int]], next_logp: Mapping[tuple[int, ...], torch.Tensor]) -> int:
    """The index of the answer greedy decoding restricted to ``tails`` writes: at each decision
    point (``next_logp``: its next-token log-probabilities) the most likely token that some answer
    still possible continues with (ties: the earlier answer's), a forced token elsewhere."""
    alive, n = list(range(len(tails))), 0
    while len(alive) > 1 and all(len(tails[i]) > n for i in alive):
        if len({tails[i][n] for i in alive}) > 1:
            scores = next_logp[tuple(tails[alive[0]][:n])]
            best = max(alive, key=lambda i: (float(scores[tails[i][n]]), -i))
            alive = [i for i in alive if tails[i][n] == tails[best][n]]
        n += 1
    return alive[0]


def decision_probes(tails: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each decision point's path with one placeholder token behind it: packed behind a prompt
    (``packed_rows`` drops a tail's last token), its last packed position is the one whose logits
    predict the token after the path."""
    return [[*path, 0] for path in decision_points(tails)]


@torch.no_grad()
def constrained_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    desc: str = "constrained",
    show: bool = True,
    shared_prefix: bool = True,
    max_tokens: int = SCORE_TOKENS,
    cut_off: int | None = None,
) -> list[str]:
    """For every prompt, what greedy decoding writes when each step may only continue one of
    ``answers`` (a label, then EOS), without the steps whose token is forced: the model runs only
    where the answers branch. With SmolLM2's tokenizer the news categories, the movie tags and
    the ratings 1-5 branch at their first token, so only each prompt's last position is needed;
    citation's "[1]" and "[2]" only behind their common "[". Every prompt and its decision
    points are packed into forward passes as in scoring (see ``packed_passes``)."""
    if not prompts:
        return []
    chosen = []
    passes = packed_passes(
        model, tokenizer, prompts, answers, decision_probes, desc, show, shared_prefix, max_tokens, cut_off
    )
    for tails, logp, column, where in passes:
        points = decision_points(tails)
        for per_point in where:
            next_logp = {path: logp[column[idx[-1]]] for path, idx in zip(points, per_point)}
            chosen.append(answers[greedy_choice(tails, next_logp)])
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
        advice += ", or answer with --answer_mode score or constrained, which always pick a valid answer"
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


# the answer modes that pack prompts and answers into forward passes instead of decoding freely
PACKED: dict[str, Callable[..., list[str]]] = {"score": score_answers, "constrained": constrained_answers}
