# Benchmark baseline venv: TRL 1.12.0 PPOTrainer (see benchmarks/README.md).
# Include from the main Makefile:  include benchmarks/bench.mk
#   make bench-venv                          # builds .venv-bench once (stamp file), again if the pins change
#   make bench-trl SPEC=spec.json OUT=r.json # one TRL baseline run

BENCH_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
BENCH_VENV ?= .venv-bench
BENCH_PYTHON ?= python3
BENCH_TORCH ?= torch==2.13.0
BENCH_STAMP := $(BENCH_VENV)/.bench-venv.stamp

.PHONY: bench-venv bench-trl

bench-venv: $(BENCH_STAMP)

# torch first: torch==2.13.0 is a CPU wheel on disk; letting the resolver pick torch can pull a CUDA build.
$(BENCH_STAMP): $(BENCH_DIR)/requirements-trl.txt $(BENCH_DIR)/bench.mk
	test -x $(BENCH_VENV)/bin/python || $(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q $(BENCH_TORCH)
	$(BENCH_VENV)/bin/python -m pip install -q -r $(BENCH_DIR)/requirements-trl.txt
	TRL_EXPERIMENTAL_SILENCE=1 $(BENCH_VENV)/bin/python -c "import trl, torch; from trl.experimental.ppo import PPOTrainer; assert trl.__version__ == '1.12.0', trl.__version__; print('bench venv ok: trl', trl.__version__, 'torch', torch.__version__)"
	touch $@

bench-trl: $(BENCH_STAMP)
	@test -n "$(SPEC)" -a -n "$(OUT)" || { echo "usage: make bench-trl SPEC=spec.json OUT=result.json"; exit 2; }
	HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 $(BENCH_VENV)/bin/python $(BENCH_DIR)/trl_baseline.py --spec $(SPEC) --out $(OUT)
