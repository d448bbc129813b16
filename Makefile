# `make demo` and `make test` do all the set-up on a fresh clone: a virtual environment in .venv with
# the CPU build of torch first (a bare `pip install torch` would pull a multi-GB CUDA build), then saelab.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
EVAL_TEXT := $(wildcard ../shared/data/wikitext2-valid.txt)

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Train the default SAE (TopK on SmolLM2-135M, residual stream after block 6) and evaluate it on
# held-out Wikipedia text when ../shared/data is there, else on held-out default-corpus text.
demo: setup
	$(BIN)/saelab train --out runs/demo --overwrite $(if $(EVAL_TEXT),--eval-dataset $(EVAL_TEXT))

test: setup
	$(BIN)/python -m pytest -q

# Leaves out the real model and the longest training runs (slow), other processes (subprocess: torchrun,
# the CLI in a subprocess, SAELens's venv), headless chromium (browser) and SAELens cross-loading (saelens).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not subprocess and not browser and not saelens"

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
