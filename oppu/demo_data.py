"""Generated per-user demo data for the seven LaMP tasks, each user with a consistent taste."""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from typing import Any

from oppu.tasks import MOVIE_TAGS, NEWS_CATEGORIES, Task
from prompts import render_query_input

Item = tuple[dict[str, str], str, str]  # (history item fields, query input, gold)
# (task, rng, the user's preference, whether the item offers the favourite label) -> Item
Maker = Callable[[Task, random.Random, Any, bool], Item]

# Share of a user's items whose candidate labels include the user's favourite (classification).
FAVOURED_SHARE = 0.8
SHORT_NAMES = {
    "citation": "cite", "news_categorize": "news", "movie_tagging": "movie",
    "product_rating": "rating", "news_headline": "headline", "scholarly_title": "title",
    "tweet_paraphrase": "tweet",
}  # fmt: skip

# Each topic fits several official labels; the first is what a user picks when their
# favourite is not among them.
NEWS_TOPICS = (
    ("a school sports program budget", ("education", "sports", "business")),
    ("a cooking class for new parents", ("food & drink", "parents", "education")),
    ("a church bake sale for flood victims", ("religion", "food & drink")),
    ("a museum exhibit about famous athletes", ("culture & arts", "sports")),
    ("an app that tracks children's screen time", ("science & technology", "parents")),
    ("a fraud trial at a popular restaurant chain", ("crime", "business", "food & drink")),
    ("a plan to fund women's health clinics", ("politics", "women", "healthy living")),
    ("a fashion show of vintage travel clothing", ("style & beauty", "travel")),
    ("a yoga retreat on a remote island", ("healthy living", "travel")),
    ("a film festival for female directors", ("entertainment", "women", "culture & arts")),
    ("a startup building robots for small farms", ("science & technology", "business")),
    ("a pilgrimage route that draws tourists", ("religion", "travel")),
    ("a vote on prayer in public schools", ("politics", "religion", "education")),
    ("a celebrity skincare line", ("style & beauty", "entertainment", "business")),
    ("a marathon for cancer research", ("sports", "healthy living")),
    ("a police program that teaches teens to code", ("crime", "science & technology", "education")),
    ("a stolen painting found after ten years", ("crime", "culture & arts")),
    ("a campaign ad starring a famous comedian", ("politics", "entertainment")),
    ("family meals and children's sleep", ("parents", "healthy living", "science & technology")),
    ("a pay dispute on the women's soccer team", ("women", "sports", "business")),
    ("a hair salon that trains former prisoners", ("style & beauty", "crime", "business")),
    ("a wine festival in a historic old town", ("food & drink", "travel", "culture & arts")),
    ("a mother's blog about raising twins", ("parents", "women")),
    ("a dance show about immigrant families", ("culture & arts", "entertainment", "politics")),
    ("a church summer camp for young kids", ("religion", "parents")),
    ("a makeup channel run by teenage girls", ("style & beauty", "women", "entertainment")),
)  # fmt: skip
MOVIE_PLOTS = (
    ("an android in love with its own inventor", ("sci-fi", "romance", "thought-provoking")),
    ("a retired boxer's last fight, from a bestselling novel", ("action", "based on a book")),
    ("a family of clumsy dragons hiding in a quiet seaside village", ("fantasy", "comedy")),
    ("a detective who slowly realizes she is the one being hunted", ("twist ending", "psychology")),
    ("a city where an app ranks every citizen", ("dystopia", "social commentary", "sci-fi")),
    ("two thieves who kidnap a mob boss's mother", ("dark comedy", "violence", "comedy")),
    ("a lavish 1950s musical about a singer and a sailor", ("classic", "romance")),
    ("a therapist who comes to believe a patient's dreams", ("psychology", "thought-provoking")),
    ("a nurse who smuggled children to safety in the war", ("true story", "thought-provoking")),
    ("a gang war over a desert town's last water supply", ("violence", "action", "dystopia")),
    ("an old courtroom drama about a wrongly accused farmer", ("classic", "social commentary")),
    ("a clerk who learns her life is a TV show", ("twist ending", "comedy", "social commentary")),
    ("a quest for a stolen crown, from a book series", ("fantasy", "based on a book", "action")),
    ("a funeral that goes badly wrong when the body disappears", ("dark comedy", "twist ending")),
    ("the record-breaking climb of two brothers on a frozen mountain", ("true story", "action")),
    ("a lonely astronaut who talks to her plants to stay sane", ("sci-fi", "psychology")),
    ("a teacher's year in a divided town, from her memoir", ("based on a book", "true story")),
    ("a wedding planner who falls for the groom's brother", ("romance", "comedy")),
    ("a soldier haunted by a brutal war he cannot remember", ("violence", "psychology")),
    ("a land that burns books, from a famous novel", ("dystopia", "classic", "based on a book")),
    ("a small-town barber who becomes a reluctant hitman", ("dark comedy", "violence")),
    ("a fairy who loses her wings and must live among humans", ("fantasy", "romance")),
    ("a scientist who asks if time travel should ever be used", ("thought-provoking", "sci-fi")),
    ("steel workers on strike, told without a word of dialogue", ("classic", "social commentary")),
    ("the real rise of a chess prodigy from a poor village", ("true story", "thought-provoking")),
)  # fmt: skip
SENTIMENT_WORDS = {
    1: ("terrible", "useless", "awful"),
    2: ("disappointing", "flimsy", "underwhelming"),
    3: ("decent", "okay", "average"),
    4: ("good", "solid", "reliable"),
    5: ("excellent", "outstanding", "fantastic"),
}
RATING_BIASES = (-2, -1, 0, 1, 2)  # harsh to generous
HEADLINE_EVENTS = (  # (subject, verb, verb base form, object)
    ("the city council", "approves", "approve", "new bike lanes downtown"),
    ("the city council", "rejects", "reject", "a plan to raise parking fees"),
    ("the transit authority", "launches", "launch", "a free evening bus service"),
    ("the library board", "delays", "delay", "the opening of a new branch"),
    ("the county", "expands", "expand", "its recycling program"),
    ("the parks department", "cancels", "cancel", "the summer music festival"),
    ("a regional airline", "announces", "announce", "record hiring for the fall"),
    ("the state university", "tests", "test", "solar panels on campus buildings"),
    ("the school board", "votes", "vote", "to start classes an hour later"),
    ("the national museum", "returns", "return", "a stolen statue to its owners"),
    ("a local tech startup", "raises", "raise", "ten million dollars for delivery robots"),
    ("the health department", "opens", "open", "three new walk-in clinics"),
)
HEADLINE_STYLES = (
    "BREAKING: {core}", "Opinion: {core}", "{CORE}", "{question}", "{core} | Daily Brief",
    "{Title}",
)  # fmt: skip
TITLE_STYLES = (
    "{Method}: A Simple Approach to {Problem}", "{ACR}: {Method} for {Problem}",
    "Towards Better {Problem} with {Method}", "On the {quality} of {Method} for {Problem}",
    "Can {Method} Improve {Problem}?",
)  # fmt: skip
TWEET_ACTIVITIES = (  # (neutral, casual)
    ("I went for a long run by the river", "long run by the river"),
    ("I baked a loaf of sourdough bread", "baked sourdough"),
    ("I finished reading a great mystery novel", "finished a great mystery novel"),
    ("I tried the new ramen place downtown", "tried the new ramen place downtown"),
    ("I spent the afternoon repotting my plants", "spent the afternoon repotting plants"),
    ("I watched the sunrise from the hill", "watched the sunrise from the hill"),
    ("I cleaned out my entire closet", "cleaned out my whole closet"),
    ("I started learning to play the guitar", "started learning guitar"),
)
TWEET_FEELINGS = (  # (neutral, casual)
    ("it was very relaxing", "so relaxing"),
    ("I feel proud of myself", "feeling proud"),
    ("it was better than I expected", "way better than expected"),
    ("I am completely exhausted", "totally wiped out"),
    ("I would recommend it to anyone", "10/10 would recommend"),
)
TWEET_STYLES = (
    "{core} ☕ #mondaymood", "{core} 🌱 #slowliving", "{core} ✨ #smallwins", "{Shout}!!!",
    "{Core}. ~ Sam", "{Core}. -- sent from my porch", "ngl {core} lol", "{Core} 🙌🙌",
)  # fmt: skip
AREAS = {  # research area: (methods, problems)
    "vision": (
        ("vision transformers", "convolutional backbones", "self-supervised pretraining"),
        ("object detection", "semantic segmentation", "video tracking"),
    ),
    "language": (
        ("pretrained language models", "sequence-to-sequence transformers", "subword tokenization"),
        ("machine translation", "question answering", "text summarization"),
    ),
    "robotics": (
        ("model predictive control", "imitation learning", "sim-to-real transfer"),
        ("legged locomotion", "robotic grasping", "drone navigation"),
    ),
    "databases": (
        ("learned indexes", "cost-based query optimizers", "columnar storage"),
        ("join processing", "transaction scheduling", "approximate query answering"),
    ),
    "security": (
        ("fuzz testing", "static taint analysis", "zero-knowledge proofs"),
        ("malware detection", "smart contract auditing", "intrusion detection"),
    ),
    "biology": (
        ("protein language models", "molecular graph networks", "single-cell clustering"),
        ("protein structure prediction", "drug discovery", "gene expression analysis"),
    ),
}
SCHOLAR_METHODS = (
    "sparse graph attention", "contrastive pretraining", "adaptive low-rank adapters",
    "hierarchical memory networks", "diffusion-based augmentation", "federated distillation",
    "curriculum reinforcement learning", "neural program synthesis",
)  # fmt: skip
SCHOLAR_PROBLEMS = (
    "traffic forecasting", "medical image segmentation", "code search", "fact verification",
    "speech emotion recognition", "crop yield prediction", "dialogue summarization",
    "molecule generation",
)  # fmt: skip

# Free placeholders: _fill draws any of these that a template names and the caller leaves open.
_WORDS: dict[str, tuple[str, ...]] = {
    "place": ("Springfield", "Riverton", "Lakeside", "Oak Hill", "Millbrook", "Harbor City"),
    "source": ("A local official", "One longtime resident", "A spokesperson", "The organizer"),
    "reaction": ("had been years in the making", "drew a surprisingly large crowd",
                 "split opinion across town", "could become a model for other cities"),
    "when": ("later this month", "after the holidays", "by the end of the year", "next spring"),
    "opening": ("The film is about", "This movie tells the story of", "The story centres on"),
    "praise": ("Critics praised the lead performance and the striking score.",
               "Audiences called it one of the most talked-about films of the year.",
               "The director spent four years bringing the story to the screen.",
               "It premiered to a standing ovation at a major festival."),
    "product": ("blender", "pair of headphones", "desk lamp", "backpack", "phone case",
                "coffee grinder", "yoga mat", "water bottle"),
    "purpose": ("for my small apartment", "as a gift for my sister", "for daily commuting",
                "to replace an older one"),
    "aspect": ("build quality", "design", "value for money", "ease of use"),
    "span": ("two weeks", "a month", "three months", "a few days"),
    "aside": ("Shipping took about a week.", "It arrived in plain packaging.",
              "I use it almost every day.", "The box included a short manual."),
    "when_tweet": ("this morning", "today", "after work", "this weekend", "last night"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday"),
    "detail": ("The decision followed months of public meetings.",
               "Supporters said the change was long overdue.",
               "Critics warned that costs could rise next year.",
               "Several residents spoke at the packed hearing."),
    "outlook": ("A final vote is expected before the end of the month.",
                "More details will be shared at a press briefing next week.",
                "Officials said they would review the results in the spring."),
    "benefit": ("captures long-range dependencies", "needs far fewer labels",
                "adapts quickly to new domains", "scales to millions of examples"),
    "bonus": ("using less memory", "training twice as fast", "remaining easy to implement"),
    "quality": ("Effectiveness", "Robustness", "Efficiency", "Limits"),
    "finding": ("The approach is simple to implement and scales to large inputs.",
                "It reduces error substantially while using less compute.",
                "It remains robust when training data is scarce."),
    "benchmark": ("three public benchmarks", "a new large-scale dataset", "real-world deployments"),
    # The user's own paper in a citation query has an area-free title, so only the history
    # tells which reference fits.
    "revisit": ("Revisiting", "Rethinking", "A Closer Look at", "Lessons from"),
    "generic": ("Simple Baselines", "Evaluation Protocols", "Scaling Behaviour",
                "Common Assumptions", "Failure Cases"),
}  # fmt: skip
_NEWS_TEXT = (
    "Residents of {place} are talking about {topic}. {source} said the idea {reaction}, while "
    "organizers expect more news {when}."
)
_REVIEW_TEXT = (
    "I bought this {product} {purpose}. The {aspect} is {first}, and after {span} of use I would "
    "call it {second} overall. {aside}"
)
_ARTICLE_TEXT = "{subject} {verb} {obj}, officials confirmed on {day}. {detail} {outlook}"
_ABSTRACT_TEXT = (
    "We study {problem}. We propose {method}, a simple model that {benefit}. Experiments on "
    "{benchmark} show it outperforms strong baselines while {bonus}."
)
_PAPER_TITLES = (
    "{method} for {problem}",
    "improving {problem} with {method}",
    "a study of {method} in {problem}",
)
_PAPER_TEXT = (
    "We study {problem} and propose an approach based on {method}. {finding} Our experiments on "
    "{benchmark} show consistent gains over prior work."
)
_SMALL_WORDS = {"a", "an", "and", "at", "for", "in", "of", "on", "the", "to", "with"}


def _fill(rng: random.Random, template: str, **given: str) -> str:
    """Format ``template``, drawing every placeholder not in ``given`` from ``_WORDS``."""
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f and f not in given]
    return template.format(**given, **{name: rng.choice(_WORDS[name]) for name in names})


def _title(text: str) -> str:
    words = text.split()
    return " ".join(w if i and w in _SMALL_WORDS else w[0].upper() + w[1:] for i, w in enumerate(words))


def _labelled(rng: random.Random, table: tuple, favourite: str, favoured: bool) -> tuple[str, str]:
    """Draw a (phrase, label): the favourite when ``favoured``, else the phrase's first label."""
    phrase, labels = rng.choice([row for row in table if (favourite in row[1]) == favoured])
    return phrase, favourite if favoured else labels[0]


def _news_item(task: Task, rng: random.Random, favourite: str, favoured: bool) -> Item:
    topic, gold = _labelled(rng, NEWS_TOPICS, favourite, favoured)
    place = rng.choice(_WORDS["place"])
    text = _fill(rng, _NEWS_TEXT, place=place, topic=topic)
    fields = {"text": text, "title": f"{place} weighs {topic}", "category": gold}
    return fields, render_query_input(task, text=text), gold


def _movie_item(task: Task, rng: random.Random, favourite: str, favoured: bool) -> Item:
    plot, gold = _labelled(rng, MOVIE_PLOTS, favourite, favoured)
    text = _fill(rng, "{opening} {plot}. {praise}", plot=plot)
    return {"description": text, "tag": gold}, render_query_input(task, text=text), gold


def _rating_item(task: Task, rng: random.Random, bias: int, favoured: bool) -> Item:
    base = rng.randint(1, 5)
    first, second = rng.sample(SENTIMENT_WORDS[base], 2)
    text = _fill(rng, _REVIEW_TEXT, first=first, second=second)
    gold = str(min(5, max(1, base + bias)))
    return {"text": text, "score": gold}, render_query_input(task, text=text), gold


def _headline_item(task: Task, rng: random.Random, style: str, favoured: bool) -> Item:
    subject, verb, base_verb, obj = rng.choice(HEADLINE_EVENTS)
    opening = subject[0].upper() + subject[1:]
    text = _fill(rng, _ARTICLE_TEXT, subject=opening, verb=verb, obj=obj)
    core = f"{re.sub('^(the|a) ', '', subject).capitalize()} {verb} {obj}"
    question = f"Why did {subject} {base_verb} {obj}?"
    title = style.format(core=core, CORE=core.upper(), Title=_title(core), question=question)
    return {"text": text, "title": title}, render_query_input(task, text=text), title


def _scholarly_item(task: Task, rng: random.Random, style: str, favoured: bool) -> Item:
    method, problem = rng.choice(SCHOLAR_METHODS), rng.choice(SCHOLAR_PROBLEMS)
    abstract = _fill(rng, _ABSTRACT_TEXT, problem=problem, method=method)
    acronym = "".join(w[0] for w in method.replace("-", " ").split()).upper()
    title = _fill(rng, style, Method=_title(method), Problem=_title(problem), ACR=acronym)
    return {"abstract": abstract, "title": title}, render_query_input(task, text=abstract), title


def _tweet_item(task: Task, rng: random.Random, style: str, favoured: bool) -> Item:
    act, casual_act = rng.choice(TWEET_ACTIVITIES)
    feel, casual_feel = rng.choice(TWEET_FEELINGS)
    when = rng.choice(_WORDS["when_tweet"])
    core = f"{casual_act} {when}, {casual_feel}"
    capital = core[0].upper() + core[1:]
    tweet = style.format(core=core, Core=capital, Shout=capital.replace(", ", "!! "))
    return {"text": tweet}, render_query_input(task, text=f"{act} {when}, and {feel}."), tweet


def _paper(rng: random.Random, area: str) -> tuple[str, str]:
    """A (title, abstract) of a paper in ``area``."""
    methods, problems = AREAS[area]
    method, problem = rng.choice(methods), rng.choice(problems)
    title = _title(rng.choice(_PAPER_TITLES).format(method=method, problem=problem))
    return title, _fill(rng, _PAPER_TEXT, problem=problem, method=method)


def _citation_item(task: Task, rng: random.Random, area: str, favoured: bool) -> Item:
    """A paper of the user's area; in its query the reference of that area is [1] when
    ``favoured`` (the user's flags are drawn half and half for this task, see ``_GENERATORS``)."""
    title, abstract = _paper(rng, area)
    related = _paper(rng, area)[0]
    unrelated = _paper(rng, rng.choice([a for a in AREAS if a != area]))[0]
    ref1, ref2 = (related, unrelated) if favoured else (unrelated, related)
    query = render_query_input(task, title=_fill(rng, "{revisit} {generic}"), ref1=ref1, ref2=ref2)
    return {"title": title, "abstract": abstract}, query, "[1]" if favoured else "[2]"


# task name -> (the preferences users are spread over, the item maker, the share of favoured
# items). A citation's flag is the gold's position: each user's answers are [1] and [2] half and
# half, so no answer order can be learnt from the other users (a 50/50 draw per query made 14 of
# the 16 test golds [2] under seed 0).
_GENERATORS: dict[str, tuple[tuple, Maker, float]] = {
    "citation": (tuple(AREAS), _citation_item, 0.5),
    "news_categorize": (NEWS_CATEGORIES, _news_item, FAVOURED_SHARE),
    "movie_tagging": (MOVIE_TAGS, _movie_item, FAVOURED_SHARE),
    "product_rating": (RATING_BIASES, _rating_item, FAVOURED_SHARE),
    "news_headline": (HEADLINE_STYLES, _headline_item, FAVOURED_SHARE),
    "scholarly_title": (TITLE_STYLES, _scholarly_item, FAVOURED_SHARE),
    "tweet_paraphrase": (TWEET_STYLES, _tweet_item, FAVOURED_SHARE),
}


def _favoured_flags(rng: random.Random, n: int, share: float) -> list[bool]:
    """Exactly round(share * n) of n items offer the favourite, in random positions."""
    hits = round(share * n)
    return rng.sample([True] * hits + [False] * (n - hits), n)


def _make_user(task: Task, index: int, preference: Any, history_len: int, queries: int, seed: int) -> dict:
    rng = random.Random(f"{seed}:{task.name}:{index}")
    _, maker, share = _GENERATORS[task.name]
    user_id = f"demo-{SHORT_NAMES[task.name]}-{index:03d}"
    flags = _favoured_flags(rng, history_len, share) + _favoured_flags(rng, queries, share)
    items = [maker(task, rng, preference, favoured) for favoured in flags]
    profile = [{"id": f"{user_id}-h{j:03d}", **fields} for j, (fields, _, _) in enumerate(items[:history_len])]
    query = [
        {"id": f"{user_id}-q{j:03d}", "input": text, "gold": gold}
        for j, (_, text, gold) in enumerate(items[history_len:])
    ]
    return {"user_id": user_id, "profile": profile, "query": query}


def make_demo_users(task: Task, num_users: int, history_len: int, queries_per_user: int, seed: int = 0) -> list[dict]:
    """Users in the per-user format, each with one fixed preference (a favourite label, a
    rating bias, a title or tweet style, a research area); preferences cycle over a seeded order
    so that no single one dominates the dataset."""
    preferences = _GENERATORS[task.name][0]
    order = random.Random(f"{seed}:{task.name}").sample(preferences, len(preferences))
    return [_make_user(task, i, order[i % len(order)], history_len, queries_per_user, seed) for i in range(num_users)]


def demo_split(
    task: Task,
    num_test_users: int,
    num_other_users: int,
    history_len: int,
    queries_per_user: int,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """(test users, other users); other users keep half the history, as test users are the
    most active ones in the paper."""
    users = make_demo_users(task, num_test_users + num_other_users, history_len, queries_per_user, seed)
    others = [{**u, "profile": u["profile"][: max(1, history_len // 2)]} for u in users[num_test_users:]]
    return users[:num_test_users], others
