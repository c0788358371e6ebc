#!/usr/bin/env bash
# The paper's four studies on a HuffPost grid folder made by docs/run_huffpost_grid.sh (whose
# finished rows they reuse: the same data and stage flags). Each study adds its own rows
# (OPPU[ia3], OPPU[prompt_tuning], RAG[least], OPPU+RAG[least], OPPU[plain]) and writes
# W/studies/<study>/<task>/table.md, table.json (and activity.png).
# Usage: bash docs/run_huffpost_studies.sh TASK WORK_DIR [STUDY ...] [-- stage flags...]
#   e.g. bash docs/run_huffpost_studies.sh news_categorize W formats peft_types
#        bash docs/run_huffpost_studies.sh news_headline W formats -- --user_stride 2
# --user_stride 2 keeps every other test author (25 of 50, spread over every activity level):
# the capped rows are new rows, but OPPU rows reuse the authors a full run already trained.
# Cost on one CPU thread, per k=0 OPPU row of 50 authors: about 1.5 hours on news categorization,
# 4 on headlines; k=1 rows (OPPU+RAG, OPPU+RAG[least]) about twice that (docs/studies.md). activity and
# shift include OPPU+RAG (and shift OPPU+RAG[least]); `studies.py STUDY --rows ...` runs a subset.
# Resumable: run it again and it continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=$1
W=$2
shift 2
STUDIES=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do STUDIES+=("$1") && shift; done
[ $# -gt 0 ] && shift # the --
[ ${#STUDIES[@]} -gt 0 ] || STUDIES=(activity shift formats peft_types)
PY=${PYTHON:-.venv/bin/python}
[ -d "$W/data/$TASK" ] || { echo "no $W/data/$TASK: run docs/run_huffpost_grid.sh $TASK $W first" >&2 && exit 2; }
for study in "${STUDIES[@]}"; do
    start=$(date +%s)
    $PY studies.py "$study" --task_name "$TASK" --data_dir "$W/data" --work_dir "$W" -- "$@"
    echo "study $study $TASK: $(($(date +%s) - start)) s wall"
done
