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
test: $(VENV)/.installed-$(TEST_EXTRAS)
	MPLBACKEND=Agg $(BIN)/python -m pytest tests $(NOTEBOOKS) --nbval-lax -p no:cacheprovider --durations=15 $(PYTEST_ARGS)
