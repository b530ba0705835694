#!/usr/bin/env bash
# The device machine's whole run, as one command inside its 10-minute limit: clip-td's imports from .whl/
# (benchmarks/gpu_wheels.sh, run here first), then the GPU check (bench_gpu, at most GPU_S seconds; it saves
# what it measured so far if stopped) and make repro's stage commands on the GPU (bench_repro) in what is left
# of BUDGET seconds. Results, logs and nvidia-smi's report go to $OUT (docs/benchmarks.md, "The GPU check").
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
start=$SECONDS
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
timeout -k 10 "${GPU_S:-300}" python3 -m benchmarks.bench_gpu --out "$OUT" --work /tmp/gpu >"$OUT/gpu.log" 2>&1
echo "bench_gpu exit $? after $((SECONDS - start)) s"
left=$((${BUDGET:-570} - (SECONDS - start)))
timeout -k 10 "$left" python3 -m benchmarks.bench_repro --out "$OUT" --work /tmp/repro >"$OUT/repro.log" 2>&1
echo "bench_repro exit $? after $((SECONDS - start)) s"
grep -h -E "\[(PASS|MISS)\]|wrote|Error|error:" "$OUT/gpu.log" "$OUT/repro.log" | tail -40
