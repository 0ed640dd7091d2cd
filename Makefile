# Two entry points that work on a fresh machine (see README):
#   make demo   - create .venv if missing, install the package with its `train` extra, run the embedded
#                 default pre-training job
#   make test   - same venv, install the `dev` extra (train + test tools) and Debian servers, run the suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# One venv, two install levels: the train stamp (`.[train]`) and the full stamp (`.[dev]`, which includes
# train, so making it also satisfies the train stamp).
STAMP := $(VENV)/.installed-stamp
TRAIN_STAMP := $(VENV)/.installed-train-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-deps lint install install-train

install: $(STAMP)

install-train: $(TRAIN_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(TRAIN_STAMP): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -c constraints.txt -e '.[train]'
	@touch $@

$(STAMP): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@ $(TRAIN_STAMP)

demo: $(TRAIN_STAMP)
	$(PY) -m soho.train

# Servers the integration tests start themselves on 127.0.0.1 (nothing here starts them).
test-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  (apt-get update -qq || true) && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

test: $(STAMP) test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check soho orchestration data_pipeline configcli tests benchmarks scripts
