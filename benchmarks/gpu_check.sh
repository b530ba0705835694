#!/usr/bin/env bash
# The device machine's whole run, as one command inside its 10-minute limit: clip-td's imports from .whl/
# (benchmarks/gpu_wheels.sh, run here first), the CUDA-only tests (at most 150 s), then make repro's stage
# commands on the GPU (bench_repro, at most REPRO_S seconds: the open target, and the stage records that
# explain it) and the GPU check (bench_gpu; it saves what it measured so far when stopped, its extraction arms
# first) in what is left of BUDGET seconds.
# The two took ~390 s and ~210 s on an H200: together they do not fit one command, so bench_repro, whose
# target is still open (docs/time-budget.md), goes first. Results, logs and nvidia-smi's report go to $OUT
# (docs/benchmarks.md).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
start=$SECONDS
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
# The tests that need a CUDA device (skipped everywhere else): training steps and predict on the GPU agree with
# the CPU, train.precision=bf16's steps follow fp32's, and train.compile's follow the eager trunk's. Short (a
# tiny world, 3-4-step students), so they go first and always run.
timeout -k 10 150 python3 -m pytest -q -p no:cacheprovider -k "cuda_steps or on_the_gpu or bf16_steps or (compiled_trunk and cuda)" \
  tests/test_train_student.py tests/test_predict.py >"$OUT/gpu-tests.log" 2>&1
echo "GPU tests exit $? after $((SECONDS - start)) s: $(tail -1 "$OUT/gpu-tests.log")"
# At REPRO_S: two SIGTERMs (the first lets running stages finish, the second stops them), so bench_repro
# still writes the stages that finished and their records; SIGKILL only if it does not exit.
python3 -m benchmarks.bench_repro --out "$OUT" --work /tmp/repro >"$OUT/repro.log" 2>&1 &
repro=$!
(sleep "${REPRO_S:-420}"; kill -TERM $repro; sleep 2; kill -TERM $repro; sleep 30; kill -KILL $repro) 2>/dev/null &
watchdog=$!
wait $repro
echo "bench_repro exit $? after $((SECONDS - start)) s"
pkill -P $watchdog 2>/dev/null; kill $watchdog 2>/dev/null
left=$((${BUDGET:-570} - (SECONDS - start)))
if [ "$left" -ge 30 ]; then
  timeout -k 10 "$left" python3 -m benchmarks.bench_gpu --out "$OUT" --work /tmp/gpu >"$OUT/gpu.log" 2>&1
  echo "bench_gpu exit $? after $((SECONDS - start)) s"
else
  echo "bench_gpu skipped: $left s of BUDGET left" | tee "$OUT/gpu.log"
fi
# The device tool brings back at most 8 files, none deeper than $OUT/a/b/: bench_repro's per-stage records
# (dozens, under repro-stages/runs/<run>/) travel as one archive, beside the 7 plain files.
if [ -d "$OUT/repro-stages" ]; then
  tar -czf "$OUT/repro-stages.tar.gz" -C "$OUT" repro-stages && rm -rf "$OUT/repro-stages"
fi
echo "files in \$OUT: $(find "$OUT" -type f | wc -l) (the device tool returns 8 at most)"
grep -h -E "\[(PASS|MISS)\]|wrote|Error|error:" "$OUT/gpu.log" "$OUT/repro.log" | tail -40
