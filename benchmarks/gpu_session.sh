#!/usr/bin/env bash
# Every GPU figure of benchmarks/README.md in one call of a lent machine (about 5 minutes on one
# H200): gpu_bench.py on four shapes of classification-like examples (the shared prefix's
# crossover: 96 of 128, 192 of 256, 288 of 384, 384 of 512 tokens shared) and a profile of one
# training step on the HuffPost-like shape. At most 7 files under OUT_DIR, 2 folders deep.
# Usage, from the repository root on the GPU machine:
#   bash benchmarks/gpu_session.sh OUT_DIR [gpu_bench flags for every run...]
#   PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh /tmp/g --shape tiny --device cpu --dtype fp32 --matmul_n 128
# transformers older than 5.24 (oppu.modeling.MIN_TRANSFORMERS) cannot run the pipeline: put
# transformers and peft wheels in .whl/ (the device README says how) and they are installed into
# /tmp/site for this call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [gpu_bench flags...]}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ! $PY -c "from oppu.modeling import check_transformers; check_transformers()" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site
fi
run() {
    local name=$1 start=$SECONDS
    shift
    timeout 240 $PY benchmarks/gpu_bench.py --output "$OUT/$name.json" "$@" >> "$OUT/all.log" 2>&1
    echo "== $name: rc=$? $((SECONDS - start)) s"
    $PY -c "import json; r = json.load(open('$OUT/$name.json')); print({k: round(v['tokens_per_s']) for k, v in r['train'].items()}, {k: round(v, 1) for k, v in r['decode']['new_tokens_per_s'].items()})" 2>/dev/null
}
run news --length 128 --prefix 96 --examples 256 --profile "$OUT/profile_news" "${@:2}"
run default --examples 256 "${@:2}"
run mid --length 384 --prefix 288 --examples 128 "${@:2}"
run long --length 512 --prefix 384 --examples 128 "${@:2}"
