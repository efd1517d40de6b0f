#!/usr/bin/env bash
# The GPU check of the performance issue, for a machine with an NVIDIA GPU and torch but no network (<= 6 min).
#
#   here, once:   bash bench/gpu_wheels.sh        # wheels the GPU image lacks (captum, our grpc/protobuf) -> .whl/
#   there:        bash bench/gpu_check.sh [OUT]   # with .whl/ carried along; tables and logs go to OUT (default bench/out)
#
# 1) the engine + oracle tests with the engine's default device on CUDA (Captum, the oracle, runs on the CPU);
# 2) bench/gpu_accuracy.py: attrserve float32 vs Captum float32 on the same GPU, and what bf16 autocast costs;
# 3) bench/run.py --gpu: W2 with ResNet-18 on 3x224x224 (IntegratedGradients, 50 steps, 64 callers),
#    attrserve vs B2 (Captum per request in a thread pool) on the same GPU; target >= 10x B2.
# Exit status: 0 when every step ran and passed, 1 otherwise (the tables are written either way).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${1:-${OUT:-bench/out}}
mkdir -p "$OUT"
# shellcheck source=bench/gpu_env.sh
. bench/gpu_env.sh
$PY -c "import torch; assert torch.cuda.is_available(), 'CUDA is not available'; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

status=0
step() {  # step NAME SECONDS COMMAND... : run with a time limit, keep its output in OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

step gpu_tests 170 "$PY" -m pytest -q -p no:cacheprovider tests/engine
step gpu_accuracy 60 "$PY" bench/gpu_accuracy.py
step gpu_bench 130 "$PY" bench/run.py --gpu --seconds 20 --warmup-seconds 5 --json "$OUT/gpu_results.json"
echo "== gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED) in $SECONDS s; logs and tables in $OUT"
exit $status
