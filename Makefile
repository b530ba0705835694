# Two commands a user needs: `make repro` (the whole embedded pipeline) and `make test`.
# Setup is idempotent: the venv is created once and reinstalled only when pyproject.toml changes.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup repro study test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision first, pinned as a pair (PyPI's torchvision fails beside other torch builds here).
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# dvc.yaml's commands say `python`: the venv's bin goes first on PATH so they run inside it.
# pipeline.repro is `dvc repro` running the one-core stages (meta: {cores: 1}) JOBS at a time (0 = one per
# core); plain `dvc repro` gives the same outputs and dvc.lock, one stage at a time.
JOBS ?= 0
repro: setup
	test -d .dvc || $(BIN)/dvc init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipeline.repro --jobs $(JOBS) dvc.yaml

# The evidence study (study/dvc.yaml, sized in docs/study.md): every cell is a stage, so rerunning `make study`
# after an interrupt resumes at the first unfinished cell; what it needs from dvc.yaml is built first. The
# cells the study's targets rest on run first, so a study finished over several sittings has its verdicts
# early: the teacher's zero-shot scores (the ceiling of every cell, seconds), low-shot 0.01 and shift
# (baseline, clip_td, the blind floor), the ablations that diagnose VQA's low-shot loss, naive_kd, full, then
# the diagnostics that explain the verdicts (the teacher dose-response, VCR's first: the task where clip_td
# gains, so where the gain must follow the teacher's knowledge; the other tasks' ablations), the
# scratch-initialised students, the extra methods, and last the 0.05 and 0.25 fractions.
STUDY_FIRST := zeroshot_full main@*-lowshot-0.01-baseline-* main@*-lowshot-0.01-clip_td-* main@*-shift-baseline-* \
  main@*-shift-clip_td-* main@*-lowshot-0.01-blind-* main@*-shift-blind-* ablation@vqa-lowshot-0.01-* \
  main@*-lowshot-0.01-naive_kd-* main@*-shift-naive_kd-* main@*-full-* dose@vcr-* dose@* \
  ablation@*-lowshot-0.01-* scratch@* extra@* unlabeled@*
study: setup
	test -d .dvc || $(BIN)/dvc init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipeline.repro --jobs $(JOBS) --keep-going \
	  $(foreach g,$(STUDY_FIRST),--first '$(g)') study/dvc.yaml

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check pipeline stages student tests benchmarks
	$(BIN)/ruff format --check pipeline stages student tests benchmarks

bench: setup
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf data artifacts reports/*.png
