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
repro: setup
	test -d .dvc || $(BIN)/dvc init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The evidence study (study/dvc.yaml, sized in docs/study.md): every cell is a stage, so rerunning `make study`
# after an interrupt resumes at the first unfinished cell. The VL-pretrained student is built here only while
# dvc.yaml has no pretrain_student stage of its own to build it.
study: setup
	test -d .dvc || $(BIN)/dvc init -q
	grep -q "pretrain_student:" dvc.yaml || test -f artifacts/student_pretrained/student.pt || { \
	  PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro prepare && \
	  $(BIN)/python -m stages.pretrain_student --quiet; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro study/dvc.yaml

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check pipeline stages student tests benchmarks
	$(BIN)/ruff format --check pipeline stages student tests benchmarks

bench: setup
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf data artifacts reports/*.png
