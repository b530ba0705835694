#!/usr/bin/env bash
# Wheels for the GPU checks (benchmarks/bench_gpu.py, and make repro's stages: benchmarks/bench_repro.py) on a
# lent device machine, whose Python (3.12, with torch, torchvision, numpy, huggingface_hub, safetensors, PyYAML,
# tqdm, matplotlib) lacks the rest of clip-td's imports (dask for the extraction's LocalCluster, isal for the
# cache's checksums). Run here, in the repo root; the device command (benchmarks/gpu_check.sh) then installs
# .whl/ into /tmp/site (docs/benchmarks.md, "The GPU check").
# Versions are this repo's tested ones (the venv's); one version of each, or pip refuses the whole install.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  open_clip_torch==3.3.0 timm==1.0.31 ftfy==6.3.1 wcwidth==0.9.4 regex==2026.11.19 \
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
  webdataset==1.0.2 braceexpand==0.1.7 fsspec==2026.9.0 click==8.5.1 isal==1.9.1 \
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 tornado==6.6.1 zict==3.0.0
du -sh .whl
