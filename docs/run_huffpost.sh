#!/usr/bin/env bash
# The real-data experiment of docs/results.md: HuffPost authors as users, news categorization,
# the embedded model, both stages, scored next to two trivial predictors.
# Usage: bash docs/run_huffpost.sh [WORK_DIR]   (about half an hour on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-huffpost_run}
PY=${PYTHON:-.venv/bin/python}
M=SmolLM2-135M-Instruct
RUN=k0-news_categorize-$M
$PY prepare_data.py from-records \
    --input ../shared/data/huffpost-news/News_Category_Dataset_v3.head9999.jsonl \
    --task_name news_categorize --user_field authors --input_field short_description \
    --output_field category --time_field date --title_field headline \
    --queries_per_user 5 --min_history 10 --num_test_users 10 --output_dir "$W/data"
DIRS=(--data_dir "$W/data" --ckpt_dir "$W/ckpt" --output_dir "$W/output")
# No hyperparameter flags: the defaults for the embedded model's size (docs/defaults.md).
# Extra flags for both stages may follow the work dir, e.g. `bash docs/run_huffpost.sh W --paper_defaults`.
$PY task_LoRA.py --task_name news_categorize "${DIRS[@]}" --predict_base "${@:2}"
$PY OPPU.py --task_name news_categorize "${DIRS[@]}" "${@:2}" \
    --task_lora "$W/ckpt/news_categorize/$RUN-task_LoRA_ckpt"
$PY eval/trivial_baselines.py --task_name news_categorize --data_dir "$W/data" --output_dir "$W/output"
# The stages' golds hold the users they ran (--max_users, --user_stride); the trivial predictors
# answer every test user, so they are scored on every test user's golds.
for m in $RUN-base $RUN-task_LoRA $RUN-OPPU trivial-majority trivial-user_majority; do
    golds="$W/output/news_categorize/$RUN-OPPU.golds.json"
    [[ $m == trivial-* ]] && golds="$W/data/news_categorize/test_golds.json"
    $PY eval/eval_task.py --golds_json "$golds" \
        --preds_json "$W/output/news_categorize/$m.json" --task_name LaMP_2N \
        --output_file "$W/results/$m.json" --per_user "$W/data/news_categorize/user_top_100_history.json" >/dev/null
    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{sys.argv[2]:32s} accuracy {r[\"accuracy\"]:.3f}  f1 {r[\"f1\"]:.3f}')" "$W/results/$m.json" "$m"
done
