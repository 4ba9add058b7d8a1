#!/usr/bin/env bash
# The full-size GPU benchmark on the GPU machine (no network): install the carried wheels, run gpu.py.
#
# Needs .whl/ (benchmarks/fetch_gpu_wheels.sh fills it on a machine with network). Writes gpu.json
# and gpu.txt to $OUT when set, else outputs/benchmarks/. Ends within 8 minutes: gpu.py skips rows
# that would not fit BUDGET seconds (default 420), and a hard limit stops it at HARD_LIMIT (465).
# Extra arguments go to gpu.py (e.g. --rows fp8 --images 12).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH="/tmp/site:$PWD"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

out="${OUT:-outputs/benchmarks}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$out/nvidia-smi.csv" 2>&1 || true
exec timeout --signal=INT --kill-after=10 "${HARD_LIMIT:-465}" \
    python3 benchmarks/gpu.py --budget "${BUDGET:-420}" --out "$out" "$@"
