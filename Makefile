# ppoflow — make demo runs the pipeline on the toy world; make test runs the suite.
# Both install what is missing first (a venv in .venv, torch's CPU wheel before the project).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
TOY_DIR ?= .ppoflow/toy
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: install test test-fast demo toy bench clean mlflow-server mlflow-server-stop

install: $(STAMP)

# torch first: a bare torch requirement could pull a multi-GB CUDA build; 2.13.0 is a CPU wheel on disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,server]'
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not flow and not integration and not distributed" $(PYTEST_ARGS)

$(TOY_DIR)/toy.json: | $(STAMP)
	$(VENV)/bin/ppoflow toy --out $(TOY_DIR)

toy: $(TOY_DIR)/toy.json

demo: install toy
	$(VENV)/bin/ppoflow run --config configs/toy.yaml

mlflow-server: install
	$(PY) -m mlflow_server.server start $(ARGS)

mlflow-server-stop: install
	$(PY) -m mlflow_server.server stop $(ARGS)

include benchmarks/bench.mk

clean:
	rm -rf runs .ppoflow
