"""Model-free reference points for headline generation on a per-user data folder: the first N
words of the query's article (a "lead" headline) and the headline of the user's history item
that BM25 finds most similar to the query's article. Scored with the official LaMP-4 ROUGE.

Usage: python docs/headline_baselines.py DATA_DIR   (DATA_DIR/news_headline/user_top_100_history.json)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.metrics import generation_metrics
from oppu.data import TEST_USERS_FILE, load_users
from oppu.retrieval import retrieve
from oppu.tasks import get_task


def article(query_input: str) -> str:
    """The article of a LaMP-4 query ("Generate a headline for the following article: ...")."""
    return query_input.split("article:", 1)[-1].strip()


def main(data_dir: str) -> None:
    task = get_task("news_headline")
    users = load_users(task, Path(data_dir) / task.name / TEST_USERS_FILE)
    queries = [(u, q) for u in users for q in u["query"]]
    golds = [q["gold"] for _, q in queries]
    for n in (8, 12):
        preds = [" ".join(article(q["input"]).split()[:n]) for _, q in queries]
        print(f"first {n} words of the article: {generation_metrics(golds, preds)}")
    nearest = []
    for u, q in queries:
        i = retrieve(article(q["input"]), [it["text"] for it in u["profile"]], 1)[0]
        nearest.append(u["profile"][i]["title"])
    print(f"the user's most similar history headline (BM25): {generation_metrics(golds, nearest)}")
    print(f"{len(users)} users, {len(queries)} queries")


if __name__ == "__main__":
    main(sys.argv[1])
