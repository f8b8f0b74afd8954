# Two commands for users (see README): `make run` executes the notebooks, `make test` runs the
# tests and the notebooks. Both create .venv first and install the extras they need (`make run`:
# notebooks; `make test`: $(TEST_EXTRAS), which CI extends by distributed to test the ray backend);
# an install is repeated only when pyproject.toml changes.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TEST_EXTRAS ?= notebooks,test
NOTEBOOKS := $(wildcard notebooks)
PYTEST_ARGS ?=
# `make test` runs on 2 pytest-xdist workers. 2, not `-n auto`: CI has 2 cores (and `auto` counts
# physical cores, 1 on many 2-vCPU machines), and more workers would not end sooner: the notebooks
# run in order on one worker (their xdist group, tests/conftest.py), the longest chain of the run,
# while each more worker costs a gammapy process and its notebook kernels. `make test
# PYTEST_WORKERS=0` runs everything in one process.
PYTEST_WORKERS ?= 2

# The project folder's data, unless the user points GAMMAPY_DATA elsewhere. Absolute, because the
# notebooks run with notebooks/ as their working directory.
ifeq ($(origin GAMMAPY_DATA),undefined)
ifneq ($(wildcard ../shared/gammapy-data),)
export GAMMAPY_DATA := $(abspath ../shared/gammapy-data)
endif
endif

.PHONY: venv run test

venv: $(VENV)/.installed-notebooks

# one stamp per set of extras, e.g. .venv/.installed-notebooks,test
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e ".[$*]"
	touch $@

run: $(VENV)/.installed-notebooks
	$(BIN)/python scripts/run_notebooks.py --output-dir output

# Paths given explicitly, so pyproject's `testpaths` does not keep nbval from the notebooks.
# --dist loadgroup: each test goes to whichever worker is free, except that all notebook cells
# form one group that one worker runs in order (each notebook reads the previous one's files).
test: $(VENV)/.installed-$(TEST_EXTRAS)
	MPLBACKEND=Agg $(BIN)/python -m pytest tests $(NOTEBOOKS) --nbval-lax -n $(PYTEST_WORKERS) --dist loadgroup -p no:cacheprovider --durations=15 $(PYTEST_ARGS)
