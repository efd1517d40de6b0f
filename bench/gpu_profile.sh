#!/usr/bin/env bash
# Where G2's time goes on a GPU (diagnosis, not a benchmark; <= 2 min): attrserve alone under G2's load
# (bench/run.py --gpu --systems attrserve), with py-spy sampling its engine process and its front for
# PROFILE_SECONDS once PROFILE_DELAY seconds have passed (the model loaded, the warm-up done), and
# nvidia-smi sampling the GPU's utilisation meanwhile.
#
#   here, once:   bash bench/gpu_wheels.sh           # .whl/ holds py-spy too
#   there:        bash bench/gpu_profile.sh [OUT]    # with .whl/ carried
#
# OUT gets: engine.txt and front.txt (py-spy's collapsed stacks: "frame;frame;... count"; --idle, so waits show),
# engine-top.txt and front-top.txt (the leaf frames by share of samples), gpu.csv, and the run's table and JSON.
# RUN_ARGS replaces run.py's arguments (a CPU try: RUN_ARGS="--workloads W2 --systems attrserve --rounds 1").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${1:-${OUT:-bench/out}}
mkdir -p "$OUT"
# shellcheck source=bench/gpu_env.sh
. bench/gpu_env.sh
PYSPY=$(command -v py-spy || echo "$SITE/bin/py-spy")
DELAY=${PROFILE_DELAY:-25}
SECONDS_=${PROFILE_SECONDS:-15}
RUN_ARGS=${RUN_ARGS:---gpu --systems attrserve --seconds 30 --warmup-seconds 5}

# shellcheck disable=SC2086  # RUN_ARGS is a list of arguments
$PY bench/run.py $RUN_ARGS --json "$OUT/profile_results.json" > "$OUT/profile_run.log" 2>&1 &
run=$!
sleep "$DELAY"
engine=$(pgrep -n -f "attrserve_service.engine_main" || true)
front=$(pgrep -n -f "attrserve_service.cli serve|profile_server.py" || true)
echo "engine process: ${engine:-none}, front: ${front:-none}"
if command -v nvidia-smi > /dev/null; then
    timeout "$SECONDS_" nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used --format=csv -lms 250 \
        > "$OUT/gpu.csv" 2>&1 &
fi
for role in engine front; do
    pid=${!role}
    [ -n "$pid" ] || continue
    "$PYSPY" record --pid "$pid" --duration "$SECONDS_" --rate 200 --idle --threads --format raw \
        --output "$OUT/$role.txt" > "$OUT/$role-py-spy.log" 2>&1 &
done
wait "$run"
rc=$?
wait
for role in engine front; do
    [ -s "$OUT/$role.txt" ] || { echo "$role: no profile ($(tail -2 "$OUT/$role-py-spy.log" 2>/dev/null))"; continue; }
    # the leaf frame of each sample, per thread, by share of that thread's samples
    awk '{n = $NF; $NF = ""; k = split($0, f, ";"); t = f[1]; leaf = f[k]; sub(/ +$/, "", leaf);
          tot[t] += n; c[t SUBSEP leaf] += n}
         END {for (key in c) {split(key, p, SUBSEP); printf "%6.1f%%  %-40s %s\n", 100 * c[key] / tot[p[1]], p[1], p[2]}}' \
        "$OUT/$role.txt" | sort -k2,2 -k1,1nr | awk '{t = $2; if (++seen[t] <= 12) print}' > "$OUT/$role-top.txt"
    echo "== $role: leaf frames by thread"
    cat "$OUT/$role-top.txt"
done
tail -40 "$OUT/profile_run.log"
exit "$rc"
