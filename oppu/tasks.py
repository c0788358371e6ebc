"""The seven LaMP tasks: names, ids, label sets, history fields and decoding lengths."""

from __future__ import annotations

from dataclasses import dataclass

from utils import UserError


@dataclass(frozen=True)
class Task:
    name: str  # the paper's task_name, e.g. "news_categorize"
    lamp_id: str  # e.g. "LaMP_2N"
    kind: str  # "classification" | "rating" | "generation"
    history_fields: tuple[str, ...]  # fields every history item carries besides "id"
    labels: tuple[str, ...] = ()  # official label order (classification only)
    max_new_tokens: int = 32  # default decoding budget
    text_field: str = "text"  # the history field that plays the query's input
    target_field: str = "text"  # the history field that plays the query's gold

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    @property
    def history_has_input(self) -> bool:
        """Whether a history item holds an input besides its output (a tweet holds only itself)."""
        return self.text_field != self.target_field


NEWS_CATEGORIES = (
    "food & drink", "sports", "education", "parents", "religion", "travel", "business",
    "crime", "science & technology", "culture & arts", "entertainment", "politics", "women",
    "style & beauty", "healthy living",
)  # fmt: skip
MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)  # fmt: skip

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        # citation history items are the user's papers: title in, abstract out (see prompts.py)
        Task("citation", "LaMP_1", "classification", ("title", "abstract"), ("[1]", "[2]"), 8, "title", "abstract"),
        Task("news_categorize", "LaMP_2N", "classification", ("text", "title", "category"),
             NEWS_CATEGORIES, 8, "text", "category"),
        Task("movie_tagging", "LaMP_2M", "classification", ("description", "tag"), MOVIE_TAGS, 8,
             "description", "tag"),
        Task("product_rating", "LaMP_3", "rating", ("text", "score"), (), 4, "text", "score"),
        Task("news_headline", "LaMP_4", "generation", ("text", "title"), (), 32, "text", "title"),
        Task("scholarly_title", "LaMP_5", "generation", ("abstract", "title"), (), 32, "abstract", "title"),
        # tweet history items are only the user's tweets: the tweet is both input and target
        Task("tweet_paraphrase", "LaMP_7", "generation", ("text",), (), 48, "text", "text"),
    )
}  # fmt: skip
BY_LAMP_ID = {t.lamp_id: t for t in TASKS.values()}


def get_task(name: str) -> Task:
    """Look a task up by its task_name or its LaMP id (``news_categorize`` or ``LaMP_2N``)."""
    if name in TASKS:
        return TASKS[name]
    if name in BY_LAMP_ID:
        return BY_LAMP_ID[name]
    known = ", ".join(f"{t.name} ({t.lamp_id})" for t in TASKS.values())
    raise UserError(f"unknown task name {name!r}; known tasks: {known}")
