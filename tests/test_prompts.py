"""Prompt templates of the seven tasks as golden strings, truncation, and output parsing."""

from __future__ import annotations

import pytest

from oppu.tasks import TASKS, get_task
from prompts import (
    ANSWER_CUE,
    INPUT_WORDS,
    RETRIEVED_WORDS,
    build_prompt,
    format_target,
    history_example,
    history_item_text,
    parse_prediction,
    profile_prefix,
    render_history_item,
    render_query_input,
    retrieval_query,
    split_query_input,
    truncate_words,
)

# The LaMP query instructions, written out in full (the marker ends each one).
CITATION_QUERY = (
    'For an author who has written the paper with the title "My Paper", which reference is related? '
    'Just answer with [1] or [2] without explanation. [1]: "Ref One" [2]: "Ref Two"'
)
NEWS_HEAD = (
    "Which category does this article relate to among the following categories? Just answer with the "
    "category name without further explanation. categories: [food & drink, sports, education, parents, "
    "religion, travel, business, crime, science & technology, culture & arts, entertainment, politics, "
    "women, style & beauty, healthy living] article: "
)
MOVIE_HEAD = (
    "Which tag does this movie relate to among the following tags? Just answer with the tag name "
    "without further explanation. tags: [sci-fi, based on a book, comedy, action, twist ending, "
    "dystopia, dark comedy, classic, psychology, fantasy, romance, thought-provoking, social commentary, "
    "violence, true story] description: "
)
RATING_HEAD = (
    "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
    "without further explanation. review: "
)
HEADLINE_HEAD = "Generate a headline for the following article: "
TITLE_HEAD = "Generate a title for the following abstract of a paper: "
TWEET_HEAD = "Paraphrase the following tweet without any explanation before or after it: "
HEADS = {
    "news_categorize": NEWS_HEAD,
    "movie_tagging": MOVIE_HEAD,
    "product_rating": RATING_HEAD,
    "news_headline": HEADLINE_HEAD,
    "scholarly_title": TITLE_HEAD,
    "tweet_paraphrase": TWEET_HEAD,
}
MARKER_TASKS = list(HEADS)

# Two history items per task, and the golden renderings of each.
ITEMS = {
    "citation": [
        {"id": "1", "title": "Graph Nets", "abstract": "We study graphs."},
        {"id": "2", "title": "Deep Sets", "abstract": "Sets are fun."},
    ],
    "news_categorize": [
        {"id": "1", "text": "The team won the cup.", "title": "Cup win", "category": "sports"},
        {"id": "2", "text": "New pasta recipes.", "title": "Pasta", "category": "food & drink"},
    ],
    "movie_tagging": [
        {"id": "1", "description": "A robot falls in love.", "tag": "sci-fi"},
        {"id": "2", "description": "Two friends laugh.", "tag": "comedy"},
    ],
    "product_rating": [
        {"id": "1", "text": "Great blender.", "score": "5"},
        {"id": "2", "text": "Broke in a week.", "score": "1"},
    ],
    "news_headline": [
        {"id": "1", "text": "Rain fell all day in Paris.", "title": "Paris Soaked"},
        {"id": "2", "text": "Stocks rose sharply.", "title": "Markets Rally"},
    ],
    "scholarly_title": [
        {"id": "1", "abstract": "We propose a new optimizer.", "title": "Fast Adam"},
        {"id": "2", "abstract": "We study attention.", "title": "Attention Maps"},
    ],
    "tweet_paraphrase": [
        {"id": "1", "text": "loving the sun today"},
        {"id": "2", "text": "coffee first, then code"},
    ],
}
RENDERED = {
    "citation": ['"Graph Nets"', '"Deep Sets"'],
    "news_categorize": [
        'the category for the article: "The team won the cup." is "sports"',
        'the category for the article: "New pasta recipes." is "food & drink"',
    ],
    "movie_tagging": [
        'the tag for the movie: "A robot falls in love." is "sci-fi"',
        'the tag for the movie: "Two friends laugh." is "comedy"',
    ],
    "product_rating": ['5 is the score for "Great blender."', '1 is the score for "Broke in a week."'],
    "news_headline": [
        '"Paris Soaked" is the title for "Rain fell all day in Paris."',
        '"Markets Rally" is the title for "Stocks rose sharply."',
    ],
    "scholarly_title": [
        '"Fast Adam" is the title for "We propose a new optimizer."',
        '"Attention Maps" is the title for "We study attention."',
    ],
    "tweet_paraphrase": ['"loving the sun today"', '"coffee first, then code"'],
}
HISTORY_EXAMPLES = {
    "citation": [
        ('Write the abstract of the paper with the title "Graph Nets"', "We study graphs."),
        ('Write the abstract of the paper with the title "Deep Sets"', "Sets are fun."),
    ],
    "news_categorize": [
        (
            "Which category does this article relate to among the following categories? Just answer with the "
            "category name without further explanation. categories: [food & drink, sports, education, parents, "
            "religion, travel, business, crime, science & technology, culture & arts, entertainment, politics, "
            "women, style & beauty, healthy living] article: The team won the cup.",
            "sports",
        ),
        (
            "Which category does this article relate to among the following categories? Just answer with the "
            "category name without further explanation. categories: [food & drink, sports, education, parents, "
            "religion, travel, business, crime, science & technology, culture & arts, entertainment, politics, "
            "women, style & beauty, healthy living] article: New pasta recipes.",
            "food & drink",
        ),
    ],
    "movie_tagging": [
        (
            "Which tag does this movie relate to among the following tags? Just answer with the tag name "
            "without further explanation. tags: [sci-fi, based on a book, comedy, action, twist ending, "
            "dystopia, dark comedy, classic, psychology, fantasy, romance, thought-provoking, social commentary, "
            "violence, true story] description: A robot falls in love.",
            "sci-fi",
        ),
        (
            "Which tag does this movie relate to among the following tags? Just answer with the tag name "
            "without further explanation. tags: [sci-fi, based on a book, comedy, action, twist ending, "
            "dystopia, dark comedy, classic, psychology, fantasy, romance, thought-provoking, social commentary, "
            "violence, true story] description: Two friends laugh.",
            "comedy",
        ),
    ],
    "product_rating": [
        (
            "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
            "without further explanation. review: Great blender.",
            "5",
        ),
        (
            "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
            "without further explanation. review: Broke in a week.",
            "1",
        ),
    ],
    "news_headline": [
        ("Generate a headline for the following article: Rain fell all day in Paris.", "Paris Soaked"),
        ("Generate a headline for the following article: Stocks rose sharply.", "Markets Rally"),
    ],
    "scholarly_title": [
        ("Generate a title for the following abstract of a paper: We propose a new optimizer.", "Fast Adam"),
        ("Generate a title for the following abstract of a paper: We study attention.", "Attention Maps"),
    ],
    "tweet_paraphrase": [
        (
            "Paraphrase the following tweet without any explanation before or after it: loving the sun today",
            "loving the sun today",
        ),
        (
            "Paraphrase the following tweet without any explanation before or after it: coffee first, then code",
            "coffee first, then code",
        ),
    ],
}
QUERIES = {
    "citation": CITATION_QUERY,
    "news_categorize": NEWS_HEAD + "Some text here.",
    "movie_tagging": MOVIE_HEAD + "Some text here.",
    "product_rating": RATING_HEAD + "Some text here.",
    "news_headline": "Generate a headline for the following article: Some text here.",
    "scholarly_title": "Generate a title for the following abstract of a paper: Some text here.",
    "tweet_paraphrase": "Paraphrase the following tweet without any explanation before or after it: Some text here.",
}
PROMPTS_WITH_CONTEXT = {
    "citation": (
        "User profile: Likes short answers.\n"
        "Past items of this user:\n"
        '"Graph Nets"\n'
        '"Deep Sets"\n'
        'For an author who has written the paper with the title "My Paper", which reference is related? '
        'Just answer with [1] or [2] without explanation. [1]: "Ref One" [2]: "Ref Two"\n'
        "Answer:"
    ),
    "news_categorize": (
        "User profile: Likes short answers.\n"
        "Past items of this user:\n"
        'the category for the article: "The team won the cup." is "sports"\n'
        'the category for the article: "New pasta recipes." is "food & drink"\n'
        "Which category does this article relate to among the following categories? Just answer with the "
        "category name without further explanation. categories: [food & drink, sports, education, parents, "
        "religion, travel, business, crime, science & technology, culture & arts, entertainment, politics, "
        "women, style & beauty, healthy living] article: Some text here.\n"
        "Answer:"
    ),
    "movie_tagging": (
        "User profile: Likes short answers.\n"
        "Past items of this user:\n"
        'the tag for the movie: "A robot falls in love." is "sci-fi"\n'
        'the tag for the movie: "Two friends laugh." is "comedy"\n'
        "Which tag does this movie relate to among the following tags? Just answer with the tag name "
        "without further explanation. tags: [sci-fi, based on a book, comedy, action, twist ending, "
        "dystopia, dark comedy, classic, psychology, fantasy, romance, thought-provoking, social commentary, "
        "violence, true story] description: Some text here.\n"
        "Answer:"
    ),
    "product_rating": (
        "User profile: Likes short answers.\n"
        "Past items of this user:\n"
        '5 is the score for "Great blender."\n'
        '1 is the score for "Broke in a week."\n'
        "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
        "without further explanation. review: Some text here.\n"
        "Answer:"
    ),
    "news_headline": (
        "User profile: Likes short answers.\n"
        "Past items of this user:\n"
        '"Paris Soaked" is the title for "Rain fell all day in Paris."\n'
        '"Markets Rally" is the title for "Stocks rose sharply."\n'
        "Generate a headline for the following article: Some text here.\n"
        "Answer:"
    ),
    "scholarly_title": (
        "User profile: Likes short answers.\n"
        "Past items of this user:\n"
        '"Fast Adam" is the title for "We propose a new optimizer."\n'
        '"Attention Maps" is the title for "We study attention."\n'
        "Generate a title for the following abstract of a paper: Some text here.\n"
        "Answer:"
    ),
    "tweet_paraphrase": (
        "User profile: Likes short answers.\n"
        "Past items of this user:\n"
        '"loving the sun today"\n'
        '"coffee first, then code"\n'
        "Paraphrase the following tweet without any explanation before or after it: Some text here.\n"
        "Answer:"
    ),
}
RETRIEVAL_QUERIES = {name: "Some text here." for name in TASKS} | {"citation": "My Paper Ref One Ref Two"}
ALL = list(TASKS)


def query_of(name: str) -> str:
    return render_query_input(TASKS[name], text="Some text here.", title="My Paper", ref1="Ref One", ref2="Ref Two")


def words(n: int, stem: str = "w") -> str:
    return " ".join(f"{stem}{i}" for i in range(n))


# --- templates -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_render_query_input_is_the_lamp_form(name):
    assert query_of(name) == QUERIES[name]


def test_query_inputs_carry_the_lamp_markers():
    assert QUERIES["movie_tagging"].startswith("Which tag does this movie")
    assert "tags: [sci-fi, based on a book," in QUERIES["movie_tagging"]
    assert QUERIES["movie_tagging"].endswith("true story] description: Some text here.")
    assert QUERIES["news_categorize"].endswith("healthy living] article: Some text here.")
    assert QUERIES["product_rating"].endswith("without further explanation. review: Some text here.")
    assert QUERIES["citation"].startswith('For an author who has written the paper with the title "My Paper"')
    assert QUERIES["citation"].endswith('[1]: "Ref One" [2]: "Ref Two"')


@pytest.mark.parametrize("name", MARKER_TASKS)
def test_split_query_input_cuts_at_the_marker(name):
    assert split_query_input(TASKS[name], QUERIES[name]) == (HEADS[name], "Some text here.")
    assert split_query_input(TASKS[name], "custom text without a marker") == ("", "custom text without a marker")


@pytest.mark.parametrize("name", ALL)
def test_build_prompt_without_context(name):
    assert build_prompt(TASKS[name], query_of(name)) == QUERIES[name] + "\nAnswer:"


@pytest.mark.parametrize("name", ALL)
def test_build_prompt_with_two_retrieved_items_and_a_profile(name):
    prompt = build_prompt(TASKS[name], query_of(name), ITEMS[name], profile=" Likes short answers. ")
    assert prompt == PROMPTS_WITH_CONTEXT[name]


@pytest.mark.parametrize("name", ALL)
def test_history_example(name):
    assert [history_example(TASKS[name], it) for it in ITEMS[name]] == HISTORY_EXAMPLES[name]


@pytest.mark.parametrize("name", ALL)
def test_render_history_item(name):
    assert [render_history_item(TASKS[name], it) for it in ITEMS[name]] == RENDERED[name]


def test_history_item_text_indexes_inputs_never_labels():
    texts = {name: history_item_text(TASKS[name], ITEMS[name][0]) for name in ALL}
    assert texts == {
        "citation": "Graph Nets We study graphs.",
        "news_categorize": "Cup win The team won the cup.",
        "movie_tagging": "A robot falls in love.",
        "product_rating": "Great blender.",
        "news_headline": "Rain fell all day in Paris.",
        "scholarly_title": "We propose a new optimizer.",
        "tweet_paraphrase": "loving the sun today",
    }


@pytest.mark.parametrize("name", ALL)
def test_retrieval_query_is_the_article_not_the_instruction(name):
    assert retrieval_query(TASKS[name], query_of(name)) == RETRIEVAL_QUERIES[name]


def test_a_citation_history_item_searches_with_its_title():
    """Personal training on citation history items retrieves earlier papers by the item's
    title, as a query does by its title and references, not by the instruction's words
    ("abstract", "paper", "title"), which favoured papers about writing abstracts."""
    task = TASKS["citation"]
    query_input, _ = history_example(task, {"title": "Message passing networks for molecule graphs", "abstract": "x"})
    assert retrieval_query(task, query_input) == "Message passing networks for molecule graphs"


def test_retrieval_query_of_custom_input_is_all_of_it():
    assert retrieval_query(TASKS["news_headline"], "just an article") == "just an article"
    assert retrieval_query(TASKS["citation"], "no citation template") == "no citation template"


def test_profile_prefix_and_format_target():
    assert profile_prefix("  Likes cats.\n") == "User profile: Likes cats.\n"
    assert format_target(" sports \n") == " sports"
    assert format_target(4) == " 4"
    assert ANSWER_CUE == "\nAnswer:"


# --- truncation ------------------------------------------------------------------------------


def test_truncate_words():
    assert truncate_words("  a  b   c ", 5) == "a  b   c"
    assert truncate_words("a  b\n c d", 3) == "a b c"
    assert truncate_words("", 3) == ""


@pytest.mark.parametrize("name", MARKER_TASKS)
def test_input_text_is_cut_to_768_words_and_the_instruction_never(name):
    task = TASKS[name]
    prompt = build_prompt(task, render_query_input(task, text=words(INPUT_WORDS + 50)))
    assert INPUT_WORDS == 768
    assert prompt == HEADS[name] + words(INPUT_WORDS) + ANSWER_CUE
    head, text = split_query_input(task, prompt[: -len(ANSWER_CUE)])
    assert head == HEADS[name] and len(text.split()) == INPUT_WORDS
    # A text at the limit is kept whole.
    assert build_prompt(task, render_query_input(task, text=words(INPUT_WORDS))) == prompt


# The fields each task renders for a retrieved item (labels are never cut).
RENDERED_FIELDS = {
    "citation": ("title",),
    "news_categorize": ("text",),
    "movie_tagging": ("description",),
    "product_rating": ("text",),
    "news_headline": ("title", "text"),
    "scholarly_title": ("title", "abstract"),
    "tweet_paraphrase": ("text",),
}


@pytest.mark.parametrize("name", ALL)
def test_retrieved_items_are_cut_to_368_words(name):
    task = TASKS[name]
    long_item = {field: words(RETRIEVED_WORDS + 40, stem=field[:2]) for field in task.history_fields}
    long_item |= {"id": "9", "category": "sports", "tag": "comedy", "score": "3"}
    line = render_history_item(task, long_item)
    assert RETRIEVED_WORDS == 368
    for field in RENDERED_FIELDS[name]:
        kept = [w for w in line.replace('"', " ").split() if w.startswith(field[:2]) and w[2:].isdigit()]
        assert kept == words(RETRIEVED_WORDS, stem=field[:2]).split(), field
    assert line in build_prompt(task, query_of(name), [long_item])


# --- parsing generations ---------------------------------------------------------------------

CLASSIFICATION_CASES = [
    ("movie_tagging", "Dark comedy.", "dark comedy"),
    ("movie_tagging", "it is comedy", "comedy"),
    ("movie_tagging", "it is a dark comedy", "dark comedy"),
    ("movie_tagging", "\n\n  Comedy  \nsci-fi", "comedy"),
    ("movie_tagging", "Sci-Fi", "sci-fi"),
    ("movie_tagging", "thought-provoking drama", "thought-provoking"),
    ("movie_tagging", "horror", "horror"),
    ("news_categorize", "food & drink", "food & drink"),
    ("news_categorize", "Category: Food & Drink.", "food & drink"),
    ("news_categorize", '"science & technology"', "science & technology"),
    ("news_categorize", "sports\npolitics", "sports"),
    ("news_categorize", "Nothing I know", "Nothing I know"),
    ("citation", "[2]", "[2]"),
    ("citation", "2", "[2]"),
    ("citation", "Answer: [1]", "[1]"),
    ("citation", " [1]\n[2]", "[1]"),
    ("citation", "neither", "neither"),
]


@pytest.mark.parametrize(("name", "generation", "expected"), CLASSIFICATION_CASES)
def test_parse_classification(name, generation, expected):
    assert parse_prediction(get_task(name), generation) == expected


@pytest.mark.parametrize(
    ("generation", "expected"),
    [("4", "4"), (" 4.0 stars", "4.0"), ("The score is 3", "3"), ("\n5\n4", "5"), ("no idea", "no idea")],
)
def test_parse_rating(generation, expected):
    assert parse_prediction(TASKS["product_rating"], generation) == expected


@pytest.mark.parametrize("name", ["news_headline", "scholarly_title", "tweet_paraphrase"])
def test_parse_generation_keeps_the_first_non_empty_line(name):
    assert parse_prediction(TASKS[name], "\n  Markets Rally Again \nA second line\n") == "Markets Rally Again"
    assert parse_prediction(TASKS[name], "   \n") == ""


def test_inputs_with_another_label_order_still_split_at_the_article():
    task = TASKS["news_categorize"]
    text = "Police arrested two men downtown."
    other_order = "Which category does this article relate to among the following categories? Just answer with the category name without further explanation. categories: [women, religion, politics, sports] article: "
    assert split_query_input(task, other_order + text) == (other_order, text)
    assert retrieval_query(task, other_order + text) == text


# --- history formats (query prompt or plain "input -> output") --------------------------------

PLAIN_EXAMPLES = {
    "citation": [("Graph Nets", "We study graphs."), ("Deep Sets", "Sets are fun.")],
    "news_categorize": [("The team won the cup.", "sports"), ("New pasta recipes.", "food & drink")],
    "movie_tagging": [("A robot falls in love.", "sci-fi"), ("Two friends laugh.", "comedy")],
    "product_rating": [("Great blender.", "5"), ("Broke in a week.", "1")],
    "news_headline": [("Rain fell all day in Paris.", "Paris Soaked"), ("Stocks rose sharply.", "Markets Rally")],
    "scholarly_title": [("We propose a new optimizer.", "Fast Adam"), ("We study attention.", "Attention Maps")],
    "tweet_paraphrase": [
        ("loving the sun today", "loving the sun today"),
        ("coffee first, then code", "coffee first, then code"),
    ],
}


@pytest.mark.parametrize("name", ALL)
def test_plain_history_example_is_the_bare_input_and_the_target(name):
    assert [history_example(TASKS[name], it, "plain") for it in ITEMS[name]] == PLAIN_EXAMPLES[name]
    assert [history_example(TASKS[name], it, "query") for it in ITEMS[name]] == HISTORY_EXAMPLES[name]


def test_both_history_formats_as_training_pairs_golden():
    from oppu.examples import history_pairs

    user = {"user_id": "u", "profile": ITEMS["news_categorize"], "query": []}
    query = history_pairs(TASKS["news_categorize"], user, history_format="query")
    assert query == [
        (NEWS_HEAD + "The team won the cup.\nAnswer:", " sports"),
        (NEWS_HEAD + "New pasta recipes.\nAnswer:", " food & drink"),
    ]
    plain = history_pairs(TASKS["news_categorize"], user, history_format="plain")
    assert plain == [("The team won the cup. ->", " sports"), ("New pasta recipes. ->", " food & drink")]
    # With retrieval and a profile, the context is written as for queries; only the item's line changes.
    plain = history_pairs(TASKS["news_categorize"], user, k=1, profile="Likes sport.", history_format="plain")
    assert plain[1] == (
        "User profile: Likes sport.\n"
        "Past items of this user:\n"
        'the category for the article: "The team won the cup." is "sports"\n'
        "New pasta recipes. ->",
        " food & drink",
    )


def test_plain_prompt_never_splits_at_a_marker_and_keeps_768_words():
    task = TASKS["news_categorize"]
    assert build_prompt(task, "Read this article: a cup win.", form="plain") == "Read this article: a cup win. ->"
    assert build_prompt(task, words(INPUT_WORDS + 5), form="plain") == words(INPUT_WORDS) + " ->"


def test_tweet_pairs_with_rewritten_inputs_golden():
    """A tweet item holds only the tweet: the rewriter is asked for its neutral input, and that
    rewrite is the training pair's input; the tweet stays the target; retrieval searches with the
    rewrite among the earlier tweets."""
    from oppu.examples import history_pairs, rewrite_prompts

    task = TASKS["tweet_paraphrase"]
    user = {"user_id": "u", "profile": ITEMS["tweet_paraphrase"], "query": []}
    rewrite = "Rewrite the following tweet in plain, neutral words without any explanation before or after it: "
    assert rewrite_prompts(task, user) == [
        rewrite + "loving the sun today\nAnswer:",
        rewrite + "coffee first, then code\nAnswer:",
    ]
    with pytest.raises(ValueError, match="news_categorize has no rewrite prompt"):
        rewrite_prompts(TASKS["news_categorize"], {"user_id": "u", "profile": ITEMS["news_categorize"], "query": []})
    rewrites = ["I love the sun today.", "First coffee, then code."]
    assert history_pairs(task, user, inputs=rewrites) == [
        (TWEET_HEAD + "I love the sun today.\nAnswer:", " loving the sun today"),
        (TWEET_HEAD + "First coffee, then code.\nAnswer:", " coffee first, then code"),
    ]
    assert history_pairs(task, user, k=1, inputs=rewrites)[1] == (
        'Past items of this user:\n"loving the sun today"\n' + TWEET_HEAD + "First coffee, then code.\nAnswer:",
        " coffee first, then code",
    )
    assert history_pairs(task, user, history_format="plain", inputs=rewrites)[0] == (
        "I love the sun today. ->",
        " loving the sun today",
    )
    with pytest.raises(ValueError, match="1 inputs for 2 history items"):
        history_pairs(task, user, inputs=rewrites[:1])


def test_citation_answer_prefers_a_bracketed_reference():
    """A bracketed [1] or [2] wins over a digit elsewhere (a year, "1st"); a 1 or 2 standing alone
    is read when nothing is bracketed; other numbers are not references."""
    citation = get_task("citation")
    cases = {
        "[2]": "[2]",
        "Answer: 2019 paper [1]": "[1]",
        "The 1st reference is unrelated, so [2]": "[2]",
        "2": "[2]",
        "1. the first one": "[1]",
        "(2)": "[2]",
        "1.5": "1.5",
        "version 2.0": "version 2.0",
    }
    assert {text: parse_prediction(citation, text) for text in cases} == cases
