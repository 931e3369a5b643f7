#!/usr/bin/env bash
# The one command to run on a lent GPU machine (docs/GPU.md): every check of benchmarks/gpu_check.py, with the
# wheels that machine lacks (make device-wheels) and its own python and packages for everything else.
#
#   bash benchmarks/device_check.sh OUTDIR [--device auto|cpu] [--target DIR] [--wheels DIR] [--python PY]
#                                          [--toy DIR] [--budget SECONDS] [-- GPU_CHECK_ARGS...]
#
#   --device   auto (default): the GPU; cpu: the same checks, small, on the CPU (the rehearsal in the test suite)
#   --target   where pip installs the wheels (--no-index --no-deps), put first on PYTHONPATH (/tmp/ppoflow-device-site)
#   --wheels   the wheels (.ppoflow/device-wheels, as make device-wheels leaves them)
#   --python   the interpreter for both throughput sides, ppoflow's and TRL's (python3: the one that holds torch there)
#   --toy      the toy world; built there with `python -m ppoflow.cli toy` unless carried (.ppoflow/toy)
#   --budget   seconds for all of it (480: a failed first try leaves time for a second in a 15-minute lease)
#   after --    passed to gpu_check.py as they are (e.g. --skip throughput, --throughput-models DIR)
#
# Writes OUTDIR/gpu_check.json (the checks finished in time), OUTDIR/environment.json (the versions the machine
# really has against what the check needs), OUTDIR/device_check.log and OUTDIR/logs.tar.gz (the checks' own logs).
# Exit status: gpu_check.py's (0: nothing failed; 1: a check failed), 124 when the budget ran out, 2 on bad usage.

set -uo pipefail

usage() { sed -n '5,6p' "$0" >&2; exit 2; }
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=$(absolute "$1"); shift
DEVICE=auto
TARGET=/tmp/ppoflow-device-site
WHEELS=$REPO/.ppoflow/device-wheels
PYTHON=python3
TOY=$REPO/.ppoflow/toy
BUDGET=480
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --target) TARGET=$(absolute "$2"); shift 2 ;;
        --wheels) WHEELS=$(absolute "$2"); shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --toy) TOY=$(absolute "$2"); shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "device_check.sh: unknown argument $1" >&2; usage ;;
    esac
done
# Not resolved through links: a venv's python is a link to the base interpreter, which would lose the venv.
case "$PYTHON" in */*) PYTHON=$(absolute "$PYTHON") ;; *) PYTHON=$(command -v "$PYTHON") || { echo "no $PYTHON on PATH" >&2; exit 2; } ;; esac

mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/device_check.log") 2>&1
log() { echo "[device-check $(date +%H:%M:%S) +${SECONDS}s] $*"; }
left() { local seconds=$((BUDGET - SECONDS)); echo $((seconds > 1 ? seconds : 1)); }  # timeout 0 would mean none
cd "$REPO"

log "python $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())')), device $DEVICE, budget ${BUDGET}s"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    log "no wheels in $WHEELS: run make device-wheels where pip works, and carry .ppoflow/device-wheels"
    exit 2
fi
log "installing ${#wheels[@]} wheels into $TARGET (no index, no dependencies)"
"$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$TARGET" "${wheels[@]}" || { log "pip could not install the wheels"; exit 1; }
"$PYTHON" benchmarks/device_wheels.py repository-metadata "$TARGET"  # the tree travels uninstalled; the engine reads its version

export PYTHONPATH="$TARGET:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1 PYTHONUNBUFFERED=1

log "environment: what the check needs against what this machine has (environment.json)"
if ! timeout "$(left)" "$PYTHON" benchmarks/device_wheels.py check --out "$OUTDIR/environment.json"; then
    log "the environment check found problems (PROBLEM lines above); the checks run anyway"
fi

if [ ! -f "$TOY/toy.json" ]; then
    log "building the toy world in $TOY"
    timeout "$(left)" "$PYTHON" -m ppoflow.cli toy --out "$TOY" > /dev/null || { log "the toy world could not be built"; exit 1; }
fi

WORK=$(mktemp -d /tmp/ppoflow-device-check.XXXXXX)
log "gpu_check.py, $(left)s left; its runs in $WORK"
timeout --kill-after=15 "$(left)" "$PYTHON" benchmarks/gpu_check.py --device "$DEVICE" --out "$OUTDIR/gpu_check.json" \
    --toy "$TOY" --work "$WORK" --trl-python "$PYTHON" "$@"
status=$?
(cd "$WORK" && find . -maxdepth 1 -type f \( -name '*.log' -o -name '*.yaml' -o -name '*.json' \) -print0 \
    | tar -czf "$OUTDIR/logs.tar.gz" --null -T -)
rm -rf "$WORK"
if [ $status -eq 124 ] || [ $status -eq 137 ]; then
    log "the budget of ${BUDGET}s ran out: gpu_check.json holds the checks finished before"
    status=124
fi
"$PYTHON" -c 'import json, sys; result = json.load(open(sys.argv[1])); print({name: check["status"] for name, check in result.get("checks", {}).items()}, result.get("note", ""))' \
    "$OUTDIR/gpu_check.json" || true
log "done, exit $status: $OUTDIR"
exit $status
