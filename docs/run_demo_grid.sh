#!/usr/bin/env bash
# The paper's table on the demo data, all 7 tasks (the README's demo grid): demo.py's data sizes
# and seed (4 test users with 12 history items and 4 queries each, 16 other users), every row of
# run_grid.py on the stages' defaults for the embedded model, then one overview table.
# Usage: bash docs/run_demo_grid.sh [WORK_DIR] [stage flags...]
# Cost: every task has run here, one thread each beside other jobs: 0.9 to 2.2 hours a task,
# about 10.9 hours of one thread for the 7 (docs/grid.md, "The demo grid, task by task").
# Resumable: run it again and it continues where it stopped (finished rows and users are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-demo_grid}
PY=${PYTHON:-.venv/bin/python}
TASKS=(news_categorize product_rating news_headline movie_tagging tweet_paraphrase scholarly_title citation)
$PY prepare_data.py demo --output_dir "$W/data" --seed 0 \
    --num_test_users 4 --num_other_users 16 --history_len 12 --queries_per_user 4
for task in "${TASKS[@]}"; do
    start=$(date +%s)
    $PY run_grid.py --task_name "$task" --data_dir "$W/data" --work_dir "$W" -- --seed 0 "${@:2}"
    echo "grid $task: $(($(date +%s) - start)) s wall"
done
$PY eval/grid_overview.py --work_dir "$W"
