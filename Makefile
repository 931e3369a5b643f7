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

.PHONY: install test test-fast demo toy bench gpu-check clean mlflow-server mlflow-server-stop

install: $(STAMP)

# torch first: a bare torch requirement could pull a multi-GB CUDA build; 2.13.0 is a CPU wheel on disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,server]'
	touch $@

# One torch thread per test process: the suite runs servers and subprocesses beside training, and
# with two cores busy, two OpenMP threads per process stall each other (5-10x slower here).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not flow and not integration and not distributed" $(PYTEST_ARGS)

$(TOY_DIR)/toy.json: | $(STAMP)
	$(VENV)/bin/ppoflow toy --out $(TOY_DIR)

toy: $(TOY_DIR)/toy.json

MLFLOW_STORE := sqlite:///$(CURDIR)/.ppoflow/mlflow/mlflow.db

demo: install toy
	$(VENV)/bin/ppoflow run --config configs/toy.yaml
	@echo "Open the MLflow UI on this run's store:"
	@echo "  $(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-$(MLFLOW_STORE)} --host 127.0.0.1 --port 5000"
	@echo "then open the URL printed above (the run's own page: its description with the lineage, Model metrics:"
	@echo "objective/scores, objective/kl, loss/*; Datasets: train/eval prompts with digests; Artifacts: config, plots,"
	@echo "sample completions, eval report; tags: model hashes and Prefect flow runs) and Models > 'ppoflow-toy-policy',"
	@echo "aliases 'candidate' (the newest version) and 'champion' (the one that passed the promotion gate), linked to the"
	@echo "run and to its logged model."

mlflow-server: install
	$(PY) -m mlflow_server.server start $(ARGS)

mlflow-server-stop: install
	$(PY) -m mlflow_server.server stop $(ARGS)

# Local Prefect server + MLflow server + work pool + deployments + worker, in the background;
# state, pids and logs in $(SERVE_HOME) (see deployments/README.md). ARGS e.g. "--prefect-port 0".
SERVE_HOME ?= .ppoflow/serve
.PHONY: serve serve-stop

serve: install toy
	$(PY) -m deployments.serve start --home $(SERVE_HOME) $(ARGS)

serve-stop: install
	$(PY) -m deployments.serve stop --home $(SERVE_HOME)

include benchmarks/bench.mk

# ppoflow vs TRL 1.12 side by side (benchmarks/run.py, ~20 min): writes benchmarks/results/latest.json and the
# README's Performance table. BENCH_ARGS=--quick: a 3-minute check that writes under .ppoflow/bench/quick only.
# BENCH_THREADS: torch threads for both sides (default 1: two threads collapse on a shared 2-core machine).
BENCH_TOY ?= .ppoflow/bench/toy
BENCH_ARGS ?=
BENCH_THREADS ?=

$(BENCH_TOY)/toy.json: | $(STAMP)
	$(VENV)/bin/ppoflow toy --out $(BENCH_TOY)

bench: bench-venv $(BENCH_TOY)/toy.json | $(STAMP)
	$(PY) benchmarks/run.py --toy $(BENCH_TOY) $(if $(BENCH_THREADS),--threads $(BENCH_THREADS)) $(BENCH_ARGS)

# The CUDA path's checks (benchmarks/gpu_check.py), one JSON file; without a GPU it says so and exits 0.
# The throughput check needs .venv-bench (make bench-venv) built against the machine's CUDA torch.
GPU_CHECK_ARGS ?=
gpu-check: install
	$(PY) benchmarks/gpu_check.py --out .ppoflow/gpu-check/gpu_check.json $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .ppoflow
