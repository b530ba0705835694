#!/bin/bash
# The v3 re-check of train.lr and distill.alpha0 (docs/tuning.md, "This version (v3)"): benchmarks.tune_val on
# validation of the training domains, seeds 1000-1002 (not reported), one setting changed at a time, as two
# 1-thread queues side by side (2 cores). Needs the default run's artifacts (`make repro`). Each queue writes
# its own file, appended to benchmarks/results/tuning.jsonl at the end (two writers never share a file).
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
S=1000,1001,1002
TMP=$(mktemp -d)
run() { .venv/bin/python -m benchmarks.tune_val --seeds $S --threads 1 --out "$TMP/q$Q.jsonl" "$@"; }
q1() { Q=1
  for t in vqa snli_ve vcr; do run --task $t --condition full --methods baseline,clip_td --tag v3-default; done
  for t in vqa snli_ve vcr; do run --task $t --condition full --methods baseline,clip_td --set train.lr=0.0005 --tag v3-lr5e-4; done
  for t in vqa snli_ve vcr; do run --task $t --condition lowshot-0.01 --methods clip_td --set distill.alpha0=0.1 --tag v3-alpha0.1; done
}
q2() { Q=2
  for t in vqa snli_ve vcr; do run --task $t --condition lowshot-0.01 --methods baseline,clip_td --tag v3-default; done
  for t in vqa snli_ve vcr; do run --task $t --condition full --methods baseline,clip_td --set train.lr=0.002 --tag v3-lr2e-3; done
  for t in vqa snli_ve vcr; do run --task $t --condition lowshot-0.01 --methods clip_td --set distill.alpha0=1.0 --tag v3-alpha1.0; done
}
q1 & p1=$!; q2 & p2=$!
wait $p1; wait $p2  # either queue failing stops here, before anything is appended
cat "$TMP/q1.jsonl" "$TMP/q2.jsonl" >> benchmarks/results/tuning.jsonl
rm -r "$TMP"
