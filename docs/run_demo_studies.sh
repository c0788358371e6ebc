#!/usr/bin/env bash
# The paper's four studies on the demo data, all 7 tasks, after docs/run_demo_grid.sh (whose
# finished rows they reuse: the same data, seed and stage flags). Each study adds its own rows
# (OPPU[ia3], OPPU[prompt_tuning], RAG[least], OPPU+RAG[least], OPPU[plain]) and writes
# W/studies/<study>/<task>/table.md, table.json (and activity.png).
# Usage: bash docs/run_demo_studies.sh [WORK_DIR] [stage flags...]
# Cost: run here for scholarly_title and citation (one thread each, side by side): 35 and 37
# minutes for the four studies (citations again after the generator's change: 44 minutes beside
# other jobs); news categorization 34 minutes (after its grid, rerun: 63 minutes); the other
# four tasks not yet (docs/studies.md, Results).
# Resumable: run it again and it continues where it stopped (finished rows and users are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-demo_grid}
PY=${PYTHON:-.venv/bin/python}
TASKS=(news_categorize product_rating news_headline movie_tagging tweet_paraphrase scholarly_title citation)
STUDIES=(activity shift formats peft_types)
[ -d "$W/data" ] || { echo "no $W/data: run docs/run_demo_grid.sh $W first" >&2 && exit 2; }
for task in "${TASKS[@]}"; do
    for study in "${STUDIES[@]}"; do
        start=$(date +%s)
        $PY studies.py "$study" --task_name "$task" --data_dir "$W/data" --work_dir "$W" -- --seed 0 "${@:2}"
        echo "study $study $task: $(($(date +%s) - start)) s wall"
    done
done
