"""Model inputs of a user: query prompts (retrieval over the whole history) and history
training pairs (retrieval for item j among items before j only)."""

from __future__ import annotations

from collections.abc import Sequence

from oppu.data import User
from oppu.retrieval import retrieve, retrieve_before
from oppu.tasks import Task
from prompts import (
    build_prompt,
    format_target,
    history_example,
    history_item_text,
    retrieval_query,
    rewrite_prompt,
    split_query_input,
)


def _documents(task: Task, user: User) -> list[str]:
    return [history_item_text(task, item) for item in user["profile"]]


def query_prompts(task: Task, user: User, k: int = 0, profile: str | None = None, retrieval: str = "most") -> list[str]:
    """One prompt per query of the user, with the ``k`` most (or least, ``retrieval``) relevant
    history items and the profile."""
    docs = _documents(task, user) if k > 0 else []
    prompts = []
    for query in user["query"]:
        hits = retrieve(retrieval_query(task, query["input"]), docs, k, retrieval)
        prompts.append(build_prompt(task, query["input"], [user["profile"][i] for i in hits], profile))
    return prompts


def query_pairs(
    task: Task, user: User, k: int = 0, profile: str | None = None, retrieval: str = "most"
) -> list[tuple[str, str]]:
    """(prompt, target) for each query with a gold answer: the task adapter's training data."""
    prompts = query_prompts(task, user, k, profile, retrieval)
    return [(p, format_target(q["gold"])) for p, q in zip(prompts, user["query"])]


def history_pairs(
    task: Task,
    user: User,
    k: int = 0,
    profile: str | None = None,
    retrieval: str = "most",
    history_format: str = "query",
    inputs: Sequence[str] | None = None,
) -> list[tuple[str, str]]:
    """(prompt, target) for each history item: the personal adapter's training data, written in
    ``history_format`` (prompts.HISTORY_FORMATS). ``inputs`` (one per item) replace the items'
    own inputs (the rewriter's, oppu/rewriter.py). Item j retrieves only among the items before it, so it never
    sees its own future."""
    if inputs is not None and len(inputs) != len(user["profile"]):
        raise ValueError(f"{len(inputs)} inputs for {len(user['profile'])} history items")
    docs = _documents(task, user) if k > 0 else []
    pairs = []
    for j, item in enumerate(user["profile"]):
        own = None if inputs is None else inputs[j]
        query_input, target = history_example(task, item, text=own)
        # Search with the same text a test query would use (its article), for the same ranking,
        # whichever form the item is written in.
        hits = retrieve_before(docs, j, k, retrieval_query(task, query_input), retrieval) if k > 0 else []
        text = query_input if history_format == "query" else history_example(task, item, history_format, own)[0]
        prompt = build_prompt(task, text, [user["profile"][i] for i in hits], profile, history_format)
        pairs.append((prompt, format_target(target)))
    return pairs


def rewrite_prompts(task: Task, user: User) -> list[str]:
    """The rewriter's prompt for each history item of the user (oppu/rewriter.py)."""
    return [rewrite_prompt(task, str(item[task.text_field])) for item in user["profile"]]


def rewrite_pairs(task: Task, users: Sequence[User]) -> list[tuple[str, str]]:
    """The rewriter's training data: each query with a gold answer in reverse, (the rewrite
    prompt for the gold, the query's input text without its instruction)."""
    return [
        (rewrite_prompt(task, str(q["gold"])), format_target(split_query_input(task, q["input"])[1]))
        for user in users
        for q in user["query"]
        if q.get("gold") is not None
    ]
