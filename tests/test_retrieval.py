"""BM25 retrieval: tokenization, ranking, deterministic ties, and no look into the future."""

from __future__ import annotations

import math
import re

import pytest

from oppu.examples import history_pairs, query_prompts
from oppu.retrieval import BM25, retrieve, retrieve_before, tokenize
from oppu.tasks import TASKS
from prompts import render_query_input

CORPUS = [
    "the cat sat on the mat",
    "dogs chase cats in the park",
    "a cat and another cat and a third cat",
    "stock markets fell sharply today",
    "the weather is sunny",
]


def test_tokenize_is_lower_case_and_ignores_punctuation():
    assert tokenize("Cat,") == tokenize("cat") == ["cat"]
    assert tokenize("Hello, World! It's a snake_case-word.") == [
        "hello",
        "world",
        "it",
        "s",
        "a",
        "snake",
        "case",
        "word",
    ]
    assert tokenize("Café 42") == ["café", "42"]
    assert tokenize(" ... ") == []


def test_bm25_ranks_the_obvious_match_first():
    assert retrieve("cat", CORPUS, 5)[:2] == [2, 0]  # three cats beat one; "cats" is another word
    assert retrieve("stock markets", CORPUS, 1) == [3]
    assert retrieve("sunny weather", CORPUS, 2)[0] == 4
    assert retrieve("Dogs, CATS!", CORPUS, 1) == [1]


def test_bm25_scores_are_zero_without_shared_words_and_never_negative():
    scores = BM25(CORPUS).scores("zebra")
    assert scores == [0.0] * len(CORPUS)
    # "the" is in 3 of 5 documents: the Lucene idf keeps it positive.
    assert all(s >= 0 for s in BM25(CORPUS).scores("the"))
    assert all(s > 0 for s in BM25(["x y", "x z"]).scores("x"))


def test_ties_go_to_the_later_document_and_are_stable():
    docs = ["same words here", "other text", "same words here", "same words here"]
    assert retrieve("same words", docs, 4) == [3, 2, 0, 1]
    assert all(retrieve("same words", docs, 4) == [3, 2, 0, 1] for _ in range(5))
    # No word in common: every score is 0, so the order is simply latest first.
    assert retrieve("unrelated", docs, 4) == [3, 2, 1, 0]


def test_k_larger_than_the_corpus_returns_all_and_k_zero_returns_none():
    assert sorted(retrieve("cat", CORPUS, 50)) == list(range(len(CORPUS)))
    assert retrieve("cat", CORPUS, 0) == []
    assert retrieve("cat", CORPUS, -1) == []
    assert retrieve("cat", [], 3) == []


def test_retrieve_before_only_returns_earlier_items():
    docs = CORPUS + ["the cat again", "cats and dogs and the mat"]
    for j in range(len(docs)):
        for k in (1, 2, 3, 10):
            hits = retrieve_before(docs, j, k)
            assert all(i < j for i in hits), (j, k, hits)
            assert len(hits) == min(k, j)
            assert hits == retrieve(docs[j], docs[:j], k)
    assert retrieve_before(docs, 0, 5) == []
    assert retrieve_before(docs, 3, 0) == []


# --- retrieval inside the model inputs (oppu/examples.py) -------------------------------------

MARK = re.compile(r"mark(\d+)x")


def marker_user(n: int = 8) -> dict:
    """A news_categorize user whose history items share words and each carry a marker word."""
    profile = [
        {"id": str(j), "text": f"shared story words mark{j}x", "title": f"headline {j}", "category": "sports"}
        for j in range(n)
    ]
    query = {"id": "q", "input": render_query_input(TASKS["news_categorize"], text="story mark7x"), "gold": "sports"}
    return {"user_id": "u", "profile": profile, "query": [query]}


@pytest.mark.parametrize("k", [1, 2, 3, 20])
def test_history_pairs_retrieve_only_from_earlier_items(k):
    user = marker_user()
    pairs = history_pairs(TASKS["news_categorize"], user, k)
    assert len(pairs) == len(user["profile"])
    for j, (prompt, target) in enumerate(pairs):
        assert target == " sports"
        marks = [int(m) for m in MARK.findall(prompt)]
        retrieved = sorted(m for m in marks if m != j)
        assert marks.count(j) == 1, "item j appears once: as the query input, never retrieved"
        assert all(i < j for i in retrieved), (j, retrieved)
        assert len(retrieved) == min(k, j)
        assert ("Past items of this user:" in prompt) == (j > 0)


def test_history_pairs_without_retrieval_have_no_context():
    for prompt, _ in history_pairs(TASKS["news_categorize"], marker_user(), 0):
        assert "Past items" not in prompt and len(MARK.findall(prompt)) == 1


def test_query_prompts_retrieve_from_the_whole_history():
    user = marker_user()
    (prompt,) = query_prompts(TASKS["news_categorize"], user, 1)
    past = prompt.split("Past items of this user:\n")[1].split("\n")[0]
    assert past == 'the category for the article: "shared story words mark7x" is "sports"'
    (prompt,) = query_prompts(TASKS["news_categorize"], user, 20)
    assert sorted(int(m) for m in MARK.findall(prompt)) == sorted([*range(8), 7])  # the query's own mark7x too


# --- least relevant (the behaviour-shift setting) ---------------------------------------------


def test_least_relevant_are_the_lowest_bm25_scores_hand_computed():
    docs = ["a b", "a c c", "d"]  # lengths 2, 3, 1: average 2
    idf_a, idf_c = math.log(1 + 1.5 / 2.5), math.log(1 + 2.5 / 1.5)  # "a" in 2 of 3 documents, "c" in 1
    norm = [1.5 * (0.25 + 0.75 * n / 2) for n in (2, 3, 1)]  # k1 (1 - b + b * length / average)
    want = [idf_a * 2.5 / (1 + norm[0]), idf_a * 2.5 / (1 + norm[1]) + idf_c * 2 * 2.5 / (2 + norm[1]), 0.0]
    assert BM25(docs).scores("a c") == pytest.approx(want)
    assert want == pytest.approx([0.4700, 1.5908, 0.0], abs=1e-4)
    assert retrieve("a c", docs, 3) == [1, 0, 2]
    assert retrieve("a c", docs, 3, "least") == [2, 0, 1]
    assert retrieve("a c", docs, 1, "least") == [2]
    assert retrieve("a c", docs, 0, "least") == [] and retrieve("a c", [], 2, "least") == []


def test_least_relevant_ties_go_to_the_earlier_document():
    docs = ["same words here", "other text", "same words here", "same words here"]
    assert retrieve("same words", docs, 4, "least") == [1, 0, 2, 3]
    assert retrieve("unrelated", docs, 4, "least") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="retrieval mode"):
        retrieve("same", docs, 1, "random")


@pytest.mark.parametrize("k", [1, 2, 3, 20])
def test_least_relevant_history_pairs_still_never_look_into_the_future(k):
    user = marker_user()
    docs = [f"headline {j} shared story words mark{j}x" for j in range(8)]
    for j, (prompt, _) in enumerate(history_pairs(TASKS["news_categorize"], user, k, retrieval="least")):
        retrieved = [int(m) for m in MARK.findall(prompt)][:-1]  # the last mark is item j's own text
        assert retrieved == retrieve_before(docs, j, k, f"shared story words mark{j}x", "least")
        assert all(i < j for i in retrieved) and len(retrieved) == min(k, j), (j, retrieved)


def test_query_prompts_with_least_retrieval_skip_the_matching_item():
    (most,) = query_prompts(TASKS["news_categorize"], marker_user(), 1)
    (least,) = query_prompts(TASKS["news_categorize"], marker_user(), 1, retrieval="least")
    assert 'mark7x" is' in most  # the item that shares the query's rare word
    assert 'the category for the article: "shared story words mark0x" is "sports"' in least  # a tie: the oldest
