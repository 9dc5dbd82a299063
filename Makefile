# Two commands matter: `make demo` (the main job end to end) and `make test` (the suite).
# Both create .venv on a fresh machine: torch first (the CPU build on disk), then the package.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.canaryml-installed
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0   # pyproject allows >=2.13,<3; the CPU build on disk
	$(PY) -m pip install -q -e '.[dev,serve,eval]'
	$(PY) -m pip install -q --no-deps 'TSB-AD==1.5'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(VENV)/bin/canaryml demo

bench: $(STAMP)
	$(VENV)/bin/canaryml bench

clean:
	rm -rf data/raw data/processed data/demo data/serve models mlruns mlflow.db outputs experiments/runs experiments/replay/dvc
