#!/usr/bin/env bash
# Issue-7 scale check: every HuffPost author with at least 20 news-categorization articles (the
# last 5 are queries, the rest history) personalized end to end: the paper's 2 epochs over the
# full history (--min_steps 0), train + answer, the task adapter of docs/run_huffpost.sh reused,
# users split over 2 CPU processes of one thread each (accelerate, gloo).
# Usage: bash docs/run_all_authors.sh TASK_ADAPTER [WORK_DIR]
# The task adapter was trained on the queries of the authors outside docs/run_huffpost.sh's 10
# test users, many of whom are test users here: this run measures time, not accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK_LORA=$1
W=${2:-all_authors_run}
PY=${PYTHON:-.venv/bin/python}
$PY prepare_data.py from-records \
    --input ../shared/data/huffpost-news/News_Category_Dataset_v3.head9999.jsonl \
    --task_name news_categorize --user_field authors --input_field short_description \
    --output_field category --time_field date --title_field headline \
    --queries_per_user 5 --min_history 15 --num_test_users 1000 --output_dir "$W/data"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ACCELERATE_USE_CPU=1
start=$(date +%s)
$PY -m accelerate.commands.launch --multi_gpu --num_processes 2 OPPU.py --task_name news_categorize \
    --data_dir "$W/data" --ckpt_dir "$W/ckpt" --output_dir "$W/output" --task_lora "$TASK_LORA" --min_steps 0
echo "all authors: $(( $(date +%s) - start )) s wall"
