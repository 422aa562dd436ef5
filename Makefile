# The two commands a newcomer needs: `make serve` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH := torch==2.13.0
TEXT_GENERATION := text-generation==0.7.0
# Every distribution in the repo: the core and each plugin folder with a pyproject.toml.
DISTRIBUTIONS := core $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/*/pyproject.toml))
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve test lint format docs bench

## install: create .venv (if missing) and install torch, then every distribution, editable
install: $(STAMP)
	@:

$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(DISTRIBUTIONS)) Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing $(TORCH) and $(DISTRIBUTIONS) into $(VENV)"
	@# pip 23's resolver misses editable distributions that depend on each other
	@$(PIP) install -q --progress-bar off --upgrade 'pip>=25'
	@$(PIP) install -q --progress-bar off $(TORCH)
	@$(PIP) install -q --progress-bar off $(foreach d,$(DISTRIBUTIONS),-e '$(d)[test]')
	@# TGI's own client pins huggingface-hub<1, which transformers 5 outgrew: no deps
	@$(PIP) install -q --progress-bar off --no-deps $(TEXT_GENERATION)
	@touch $(STAMP)

## serve: start the server with default settings (port 8080)
serve: install
	$(VENV)/bin/tgi-core serve

## test: run the whole test suite
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

## lint: ruff and mypy
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## format: apply ruff's formatting and safe fixes
format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## docs: regenerate docs/configuration.md from ServeConfig
docs: install
	$(PY) -m tgi_core.config_docs > docs/configuration.md

## bench: run the benchmarks and write their results to docs/benchmarks.md
bench: install
	$(PY) benchmarks/startup.py --write docs/benchmarks.md
	$(PY) benchmarks/dtype_choice.py --write docs/benchmarks.md
	$(PY) benchmarks/load_memory.py --write docs/benchmarks.md
	$(PY) benchmarks/model_step.py --write docs/benchmarks.md
	$(PY) benchmarks/linear_chain.py --write docs/benchmarks.md
	$(PY) benchmarks/engine_throughput.py --write docs/benchmarks.md
	$(PY) benchmarks/t5_throughput.py --write docs/benchmarks.md
	$(PY) benchmarks/served_vs_transformers.py --write docs/benchmarks.md
	$(PY) benchmarks/collectives.py --write docs/benchmarks.md
	$(PY) benchmarks/quantization.py --write docs/benchmarks.md
