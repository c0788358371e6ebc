"""Prompt templates for the seven LaMP tasks and the inverse: parsing a generation.

Every prompt the project builds comes from here: the LaMP query inputs, the per-user history
examples, retrieved history items, the profile prefix, and the truncation of long texts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from oppu.tasks import MOVIE_TAGS, NEWS_CATEGORIES, Task

# The paper's limits: the input's article text keeps its first 768 words, each retrieved
# history item its first 368.
INPUT_WORDS = 768
RETRIEVED_WORDS = 368
ANSWER_CUE = "\nAnswer:"
# How personal training writes a history item: "query" in the task's query prompt (the paper's
# way), "plain" as a bare "input -> output" line with no instruction and no answer cue, to see
# whether a personal adapter learns the user or the template (queries are always asked as "query").
HISTORY_FORMATS = ("query", "plain")
PLAIN_CUE = " ->"

_CITATION = (
    'For an author who has written the paper with the title "{title}", which reference is '
    'related? Just answer with [1] or [2] without explanation. [1]: "{ref1}" [2]: "{ref2}"'
)
_QUERY_TEMPLATES = {
    "news_categorize": (
        "Which category does this article relate to among the following categories? Just "
        "answer with the category name without further explanation. categories: ["
        + ", ".join(NEWS_CATEGORIES) + "] article: {text}"
    ),
    "movie_tagging": (
        "Which tag does this movie relate to among the following tags? Just answer with the "
        "tag name without further explanation. tags: [" + ", ".join(MOVIE_TAGS)
        + "] description: {text}"
    ),
    "product_rating": (
        "What is the score of the following review on a scale of 1 to 5? just answer with "
        "1, 2, 3, 4, or 5 without further explanation. review: {text}"
    ),
    "news_headline": "Generate a headline for the following article: {text}",
    "scholarly_title": "Generate a title for the following abstract of a paper: {text}",
    "tweet_paraphrase": (
        "Paraphrase the following tweet without any explanation before or after it: {text}"
    ),
}  # fmt: skip
# What the rewriter (oppu/rewriter.py) is asked for tasks whose history items hold only the user's
# output: the query's input, written from the output. It ends with the task's marker.
_REWRITE_TEMPLATES = {
    "tweet_paraphrase": "Rewrite the following tweet in plain, neutral words without any explanation before or after it: {text}",
}
# The words that end each instruction; the article text follows them. Short on purpose: LaMP
# inputs whose label list is ordered or worded otherwise still split at the right place.
_MARKERS = {
    "news_categorize": "article: ", "movie_tagging": "description: ", "product_rating": "review: ",
    "news_headline": "following article: ", "scholarly_title": "abstract of a paper: ",
    "tweet_paraphrase": "before or after it: ",
}  # fmt: skip
_CITATION_HISTORY_RE = re.compile(r'^Write the abstract of the paper with the title "(?P<title>.*)"\s*$', re.S)
_CITATION_RE = re.compile(r'the title "(?P<title>.*)", which reference.*\[1\]: "(?P<ref1>.*)" \[2\]: "(?P<ref2>.*)"\s*$', re.S)  # fmt: skip


def truncate_words(text: str, max_words: int) -> str:
    """Keep the first ``max_words`` whitespace-separated words of ``text``."""
    words = text.split()
    return text.strip() if len(words) <= max_words else " ".join(words[:max_words])


def render_query_input(task: Task, text: str = "", title: str = "", ref1: str = "", ref2: str = "") -> str:
    """Render a query input in the LaMP form of ``task`` (citation uses title, ref1, ref2)."""
    if task.name == "citation":
        return _CITATION.format(title=title, ref1=ref1, ref2=ref2)
    return _QUERY_TEMPLATES[task.name].format(text=text)


def rewrite_prompt(task: Task, output: str) -> str:
    """The rewriter's prompt for one output of a user (a tweet): asks for its neutral input."""
    if task.name not in _REWRITE_TEMPLATES:
        raise ValueError(f"{task.name} has no rewrite prompt: its history items have inputs")
    return build_prompt(task, _REWRITE_TEMPLATES[task.name].format(text=output))


def split_query_input(task: Task, query_input: str) -> tuple[str, str]:
    """Split a LaMP query input into (instruction up to its marker, article text).

    Inputs without the task's marker (custom data) are all article text.
    """
    if task.name == "citation":
        return "", query_input
    marker = _MARKERS[task.name]
    at = query_input.find(marker)
    if at < 0:
        return "", query_input
    cut = at + len(marker)
    return query_input[:cut], query_input[cut:]


def history_example(
    task: Task, item: Mapping[str, str], form: str = "query", text: str | None = None
) -> tuple[str, str]:
    """Turn one history item into a (query input, target) pair shaped like the task's queries,
    or with ``form`` "plain" into (the item's bare input text, target). ``text`` replaces the
    item's input (a tweet's neutral rewrite: its item has no input but the target itself).

    Citation history items are the user's own papers, which carry no reference options, so
    they teach the user's topics by asking for the abstract of each paper from its title.
    """
    text = str(item[task.text_field]) if text is None else text
    target = str(item[task.target_field])
    if form == "plain":
        return text, target
    if task.name == "citation":
        return f'Write the abstract of the paper with the title "{text}"', target
    return render_query_input(task, text=text), target


def render_history_item(task: Task, item: Mapping[str, str]) -> str:
    """Render a retrieved history item as one line of prompt context."""

    def cut(field: str) -> str:
        return truncate_words(str(item[field]), RETRIEVED_WORDS)

    return {
        "citation": lambda: f'"{cut("title")}"',
        "news_categorize": lambda: f'the category for the article: "{cut("text")}" is "{item["category"]}"',
        "movie_tagging": lambda: f'the tag for the movie: "{cut("description")}" is "{item["tag"]}"',
        "product_rating": lambda: f'{item["score"]} is the score for "{cut("text")}"',
        "news_headline": lambda: f'"{cut("title")}" is the title for "{cut("text")}"',
        "scholarly_title": lambda: f'"{cut("title")}" is the title for "{cut("abstract")}"',
        "tweet_paraphrase": lambda: f'"{cut("text")}"',
    }[task.name]()  # fmt: skip


def history_item_text(task: Task, item: Mapping[str, str]) -> str:
    """The text of a history item that retrieval indexes (its inputs, never its label)."""
    fields = {"citation": ("title", "abstract"), "news_categorize": ("title", "text")}
    return " ".join(str(item.get(f, "")) for f in fields.get(task.name, (task.text_field,)))


def retrieval_query(task: Task, query_input: str) -> str:
    """The text a query searches the user's history with: its article, not the instruction."""
    if task.name == "citation":  # a query (title and both references) or a history item (its title)
        match = _CITATION_RE.search(query_input) or _CITATION_HISTORY_RE.search(query_input)
        return " ".join(match.groups()) if match else query_input
    return split_query_input(task, query_input)[1]


def profile_prefix(profile: str) -> str:
    """The line that puts a user's textual profile in front of a prompt."""
    return f"User profile: {profile.strip()}\n"


# What gen_profile.py asks an LLM to write about a user after a sample of their history: the
# facts a task's answers depend on (favourite labels, rating habits, topics and style). The ask
# comes after the items: small instruction-tuned models otherwise continue the list.
PROFILE_INSTRUCTIONS = {
    "citation": "In two or three sentences, describe the research topics of this author.",
    "news_categorize": "In two or three sentences, describe which categories and topics this journalist writes about most.",
    "movie_tagging": "In two or three sentences, describe which tags and kinds of movies this user prefers.",
    "product_rating": "In two or three sentences, describe how this user tends to rate products and what they care about.",
    "news_headline": "In two or three sentences, describe the topics of this journalist and the style of their headlines.",
    "scholarly_title": "In two or three sentences, describe the topics of this author and how they title their papers.",
    "tweet_paraphrase": "In two or three sentences, describe the topics and the writing style of this user.",
}


def profile_prompt(task: Task, items: Sequence[Mapping[str, str]]) -> str:
    """The prompt that asks for a user's profile from some of their history items."""
    lines = "\n".join(f"{i + 1}. {render_history_item(task, item)}" for i, item in enumerate(items))
    return f"Past items of one user, most recent first:\n{lines}\n\n{PROFILE_INSTRUCTIONS[task.name]} Answer with the description only."


def parse_profile(generation: str) -> str:
    """A generated profile as one line (a profile is prepended to prompts as one line)."""
    return " ".join(generation.split())


def build_prompt(
    task: Task,
    query_input: str,
    retrieved: Sequence[Mapping[str, str]] = (),
    profile: str | None = None,
    form: str = "query",
) -> str:
    """The full model prompt: [profile] [retrieved history] query input, then the answer cue;
    with ``form`` "plain", the bare input (no instruction is looked for) and the plain cue."""
    head, text = split_query_input(task, query_input) if form == "query" else ("", query_input)
    parts = []
    if profile:
        parts.append(profile_prefix(profile))
    if retrieved:
        lines = "\n".join(render_history_item(task, it) for it in retrieved)
        parts.append(f"Past items of this user:\n{lines}\n")
    parts.append(head + truncate_words(text, INPUT_WORDS) + (ANSWER_CUE if form == "query" else PLAIN_CUE))
    return "".join(parts)


def format_target(target: str) -> str:
    """The text the model learns to produce after the answer cue (EOS is added by the tokenizer step)."""
    return " " + str(target).strip()


def _first_line(generation: str) -> str:
    for line in generation.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _named_label(labels: Sequence[str], text: str) -> str | None:
    """The label ``text`` names: an exact match, else the earliest (then longest) mention."""
    norm = text.strip().strip(".\"'`").strip().lower()
    if norm in labels:
        return norm
    best = None
    for label in labels:
        found = re.search(r"(?<![\w&-])" + re.escape(label) + r"(?![\w&-])", norm)
        if found and (best is None or (found.start(), -len(label)) < best[0]):
            best = ((found.start(), -len(label)), label)
    return best[1] if best else None


def parse_prediction(task: Task, generation: str) -> str:
    """Turn a raw generation into a prediction: first non-empty line, stripped; for
    classification the label it names (else the line as is, which scores as wrong); for
    rating the first number it contains."""
    line = _first_line(generation)
    if task.name == "citation":  # a bracketed [1] or [2] first, else a 1 or 2 standing alone
        found = re.search(r"\[([12])\]", line) or re.search(r"(?<![\w.])([12])(?!\w|\.\d)", line)
        return f"[{found.group(1)}]" if found else line
    if task.is_classification:
        return _named_label(task.labels, line) or line
    if task.kind == "rating":
        found = re.search(r"-?\d+(?:\.\d+)?", line)
        return found.group(0) if found else line
    return line


def is_valid_prediction(task: Task, prediction: str) -> bool:
    """Whether the metric scores ``prediction`` as an answer, not as its worst case: a label of
    the task, a finite number for ratings, any non-empty text for generation."""
    text = prediction.strip()
    if task.kind == "classification":
        return text in task.labels
    if task.kind == "rating":
        try:
            return math.isfinite(float(text))
        except ValueError:
            return False
    return bool(text)
