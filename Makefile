# x2l developer entrypoints. `make demo` and `make test` set up .venv themselves.
#
#   TORCH      torch requirement installed before anything else. Default: torch==2.13.0 (CPU build) on machines
#              without CUDA, plain `torch` where `nvidia-smi` answers. Override: make test TORCH="torch==2.6.0".
#   PYTHON     interpreter used to create .venv (default python3).
#   PYTEST_ARGS extra pytest arguments, e.g. make test PYTEST_ARGS="-k store -x".
#   BENCH_ARGS extra bench/compare.py arguments, e.g. make bench BENCH_ARGS="--family qwen3-vl --device cuda".
#
# `make lint` checks the tree with ruff (rules and line length in pyproject.toml, [tool.ruff]) and that it is formatted
# as `ruff format` writes it; `.ci/run` runs it before `make test`.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
TORCH ?= torch
else
TORCH ?= torch==2.13.0
endif
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup demo test lint bench s3 clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/x2l demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# A local S3 server (SeaweedFS) on 127.0.0.1 for s3:// stores; prints the AWS_* variables to export.
s3: setup
	$(PY) -m x2l.testing.s3_server --dir .x2l/s3

clean:
	rm -rf $(VENV) demo_out eval_out bench_out report .pytest_cache

# The benchmark of issue 6: rerun vs full-KV reload vs H only vs x2l top-k, on the `medium` random checkpoint.
bench: setup
	$(PY) bench/compare.py --workdir bench_out $(BENCH_ARGS)
