"""The generated demo data: deterministic, valid, with preferences a personal adapter can learn."""

from __future__ import annotations

import re
from collections import Counter
from statistics import mean

import pytest

from oppu.data import validate_users
from oppu.demo_data import AREAS, SENTIMENT_WORDS, demo_split, make_demo_users
from oppu.tasks import TASKS, Task
from prompts import split_query_input

ALL_TASKS = list(TASKS.values())
CLASSIFIERS = [TASKS["news_categorize"], TASKS["movie_tagging"]]


def users_of(task: Task, seed: int = 0) -> list[dict]:
    return make_demo_users(task, num_users=30, history_len=10, queries_per_user=5, seed=seed)


def majority(values: list[str]) -> str:
    return Counter(values).most_common(1)[0][0]


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_same_seed_same_users_and_other_seed_other_users(task):
    assert users_of(task, seed=3) == users_of(task, seed=3)
    assert users_of(task, seed=3) != users_of(task, seed=4)


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_users_are_valid_with_unique_ids_and_exact_fields(task):
    users = users_of(task)
    assert validate_users(task, users, "demo") == users
    ids = [u["user_id"] for u in users]
    ids += [it["id"] for u in users for it in u["profile"] + u["query"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, str) for i in ids)
    assert all(u["user_id"].startswith("demo-") for u in users)
    for item in (it for u in users for it in u["profile"]):
        assert set(item) == {"id", *task.history_fields}
        assert all(isinstance(v, str) for v in item.values())
    assert all(len(u["profile"]) == 10 and len(u["query"]) == 5 for u in users)


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_texts_are_short_natural_sentences_in_the_lamp_query_form(task):
    users = users_of(task)
    for query in (q for u in users for q in u["query"]):
        head, text = split_query_input(task, query["input"])
        assert head or task.name == "citation"
        assert "{" not in query["input"] and "}" not in query["input"]
    field = {
        "news_categorize": "text",
        "movie_tagging": "description",
        "product_rating": "text",
        "news_headline": "text",
        "scholarly_title": "abstract",
        "citation": "abstract",
        "tweet_paraphrase": "text",
    }[task.name]
    lengths = [len(it[field].split()) for u in users for it in u["profile"]]
    upper = 20 if task.name == "tweet_paraphrase" else 40
    assert max(lengths) <= upper and (task.name == "tweet_paraphrase" or min(lengths) >= 15)


@pytest.mark.parametrize("task", [t for t in ALL_TASKS if t.is_classification], ids=lambda t: t.name)
def test_classification_golds_are_official_labels(task):
    users = users_of(task)
    golds = [q["gold"] for u in users for q in u["query"]]
    assert set(golds) <= set(task.labels)
    label_field = {"news_categorize": "category", "movie_tagging": "tag"}.get(task.name)
    if label_field:
        assert {it[label_field] for u in users for it in u["profile"]} <= set(task.labels)


@pytest.mark.parametrize("task", CLASSIFIERS, ids=lambda t: t.name)
def test_each_user_has_a_favourite_label_and_no_label_dominates(task):
    label_field = task.history_fields[-1]
    users = users_of(task)
    agree = [
        majority([it[label_field] for it in u["profile"]]) == majority([q["gold"] for q in u["query"]]) for u in users
    ]
    assert sum(agree) >= 0.8 * len(users)
    golds = [q["gold"] for u in users for q in u["query"]]
    assert Counter(golds).most_common(1)[0][1] < 0.4 * len(golds)
    assert len({majority([q["gold"] for q in u["query"]]) for u in users}) >= 10


def base_score(text: str) -> int:
    words = set(re.findall(r"[a-z]+", text.lower()))
    (score,) = [s for s, names in SENTIMENT_WORDS.items() if words & set(names)]
    return score


def test_ratings_follow_the_review_sentiment_shifted_by_a_per_user_bias():
    task = TASKS["product_rating"]
    users = users_of(task)
    golds = [q["gold"] for u in users for q in u["query"]]
    assert set(golds) <= {"1", "2", "3", "4", "5"}
    shifts = []
    for user in users:
        items = [(it["text"], it["score"]) for it in user["profile"]]
        items += [(split_query_input(task, q["input"])[1], q["gold"]) for q in user["query"]]
        shifts.append(mean(int(gold) - base_score(text) for text, gold in items))
    assert min(shifts) < -0.5 and max(shifts) > 0.5


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_demo_split_keeps_test_users_first_with_the_longer_histories(task):
    test, others = demo_split(task, 3, 5, history_len=8, queries_per_user=2, seed=1)
    assert [u["user_id"] for u in test + others] == [u["user_id"] for u in users_of_split(task)]
    assert all(len(u["profile"]) == 8 for u in test) and all(len(u["profile"]) == 4 for u in others)
    validate_users(task, test + others, "demo")


def users_of_split(task: Task) -> list[dict]:
    return make_demo_users(task, 8, history_len=8, queries_per_user=2, seed=1)


def test_tweets_end_in_the_users_signature_and_paraphrases_are_neutral():
    task = TASKS["tweet_paraphrase"]
    users = users_of(task)
    for user in users:
        tweets = [it["text"] for it in user["profile"]] + [q["gold"] for q in user["query"]]
        assert len({t[-3:] for t in tweets}) == 1
    inputs = [split_query_input(task, q["input"])[1] for u in users for q in u["query"]]
    assert all(text.startswith("I ") and text.endswith(".") for text in inputs)


def test_citation_gold_reference_is_on_the_topics_of_the_users_papers():
    phrases = [p for methods, problems in AREAS.values() for p in methods + problems]
    for user in users_of(TASKS["citation"]):
        papers = " ".join(it["title"] + " " + it["abstract"] for it in user["profile"]).lower()
        for query in user["query"]:
            refs = re.findall(r'\[[12]\]: "([^"]*)"', query["input"].lower())
            gold, other = (refs[0], refs[1]) if query["gold"] == "[1]" else (refs[1], refs[0])
            shared = [sum(p in ref and p in papers for p in phrases) for ref in (gold, other)]
            assert shared[0] >= 1 and shared[1] == 0


def test_citation_answers_are_half_first_half_second_reference_for_every_user():
    users = make_demo_users(TASKS["citation"], num_users=20, history_len=12, queries_per_user=4, seed=0)
    for user in users:
        assert Counter(q["gold"] for q in user["query"]) == {"[1]": 2, "[2]": 2}
