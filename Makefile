# Two entry points that work on a fresh machine (see README):
#   make demo   - create .venv if missing, install, run the embedded default pre-training job
#   make test   - same venv, install test tools and Debian servers, run the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test test-deps lint install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(PY) -m soho.train

# Servers the integration tests start themselves on 127.0.0.1 (nothing here starts them).
test-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  (apt-get update -qq || true) && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

test: $(STAMP) test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check soho orchestration data_pipeline tests benchmarks
