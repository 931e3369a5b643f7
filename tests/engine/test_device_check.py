"""The GPU machine's one command, benchmarks/device_check.sh, rehearsed on this CPU machine.

The device has Python 3.12 and its own image of packages, and no registry: what it lacks travels as
the wheels of `make device-wheels`. The rehearsal runs the same script, `--device cpu`, into a throwaway
`--target` folder that pip fills from wheels alone (`--no-index --no-deps`), under an interpreter that
sees only what the device would:

- the pinned distributions import only from the `--target` folder (their copies in this venv are
  hidden), at the same versions, from wheels built for this interpreter (`make device-wheels` fetches
  them beside the device's; only pydantic-core and multiprocess differ by Python version, the rest are
  the very files the device gets);
- every other distribution of this venv that is not on the device's package list is unimportable
  (`sys.modules[name] = None`, as if not installed: `import` fails, `find_spec` says absent) and has
  no metadata (`importlib.metadata` does not find it), in every process the check starts (a
  sitecustomize on PYTHONPATH): MLflow, Prefect, DeepSpeed, ...;
- ppoflow itself is not installed there (the working tree travels): its metadata here is hidden too,
  and only what device_check.sh writes into the `--target` folder is found.

So a passing rehearsal proves that the device's list plus the wheels cover everything the check
imports at run time, lazily imported modules and its subprocesses (training, SIGKILL-resume, both
throughput sides with TRL from the wheels) included, which the static closure of
tests/unit/test_device_wheels.py cannot see. What it cannot prove: the device's own versions (torch
2.11 and transformers 5.17 there, this venv's here), whose needs are allowed from this venv
(`DEVICE_NEEDS_HERE`: e.g. transformers 5.25 needs `kernels`, which the device's 5.17 does not), and CUDA.
two_processes is skipped: on one GPU it skips itself, and test_gpu_check.py runs it with gloo.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from benchmarks import device_wheels

REPO = Path(__file__).resolve().parents[2]

HOST_WHEELS = REPO / ".ppoflow" / "device-wheels-host"
# The repository's own distribution (installed editable here) travels as the working tree.
REPOSITORY_DISTRIBUTION = "ppoflow"

SITECUSTOMIZE = '''"""Only what the GPU machine would have (tests/engine/test_device_check.py)."""
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import os
import re
import sys

_config = json.load(open(os.path.join(os.path.dirname(__file__), "device_isolation.json")))
for _name in _config["blocked"]:
    sys.modules.setdefault(_name, None)
_discover = importlib.metadata.Distribution.discover.__func__


def _visible(cls, **kwargs):
    for distribution in _discover(cls, **kwargs):
        name = re.sub(r"[-_.]+", "-", distribution.metadata["Name"] or "").lower()
        if name in _config["hidden_distributions"]:
            continue
        if name in _config["target_distributions"] and not str(distribution.locate_file("")).startswith(
            _config["target"]
        ):
            continue
        yield distribution


importlib.metadata.Distribution.discover = classmethod(_visible)


class _FromTheWheelsOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if path is not None or fullname not in _config["from_target"]:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, [_config["target"]])
        if spec is None:
            raise ModuleNotFoundError(
                f"{fullname} is not in the wheels' --target folder {_config['target']}", name=fullname
            )
        return spec


sys.meta_path.insert(0, _FromTheWheelsOnly())
'''


def device_needs_here() -> set[str]:
    """The device's distributions as installed in this venv, with what these versions require here."""
    installed = {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    allowed: set[str] = set()
    queue = [name for name in installed if name in device_wheels.DEVICE_PACKAGES]
    while queue:
        name = queue.pop()
        if name in allowed or name in device_wheels.WHEELS or name not in installed:
            continue
        allowed.add(name)
        for line in installed[name].requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append(canonicalize_name(requirement.name))
    return allowed


def isolation(target: Path) -> dict:
    """Top-level modules and distributions to hide, and those to take from the --target folder only."""
    allowed = device_needs_here() | {REPOSITORY_DISTRIBUTION}
    installed = {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    modules = {
        module: {canonicalize_name(d) for d in dists}
        for module, dists in importlib.metadata.packages_distributions().items()
    }
    from_target = sorted(module for module, dists in modules.items() if dists & set(device_wheels.WHEELS))
    blocked = sorted(module for module, dists in modules.items() if module not in from_target and not dists & allowed)
    return {
        "target": str(target),
        "from_target": from_target,
        "blocked": blocked,
        "target_distributions": sorted({*device_wheels.WHEELS, REPOSITORY_DISTRIBUTION}),
        "hidden_distributions": sorted(installed - allowed - set(device_wheels.WHEELS)),
    }


@pytest.fixture
def device_like(tmp_path) -> tuple[dict[str, str], Path]:
    """An environment whose python sees only the device's packages, and the --target folder it expects."""
    target = tmp_path / "site"
    hook = tmp_path / "device-isolation"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (hook / "device_isolation.json").write_text(json.dumps(isolation(target)))
    env = {**os.environ, "PYTHONPATH": str(hook), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return env, target


def test_the_isolation_hides_what_the_device_lacks(device_like):
    env, target = device_like
    probe = (
        "import importlib.metadata, importlib.util, json\n"
        "found = {name: importlib.util.find_spec(name) is not None "
        "for name in ('mlflow', 'prefect', 'deepspeed', 'torch', 'transformers')}\n"
        "found['metadata'] = sorted(d.metadata['Name'].lower() for d in importlib.metadata.distributions()\n"
        "                           if d.metadata['Name'].lower() in ('mlflow', 'ppoflow', 'pydantic', 'torch'))\n"
        "try:\n    import pydantic\n    found['pydantic'] = pydantic.__file__\n"
        "except ImportError as error:\n    found['pydantic'] = str(error)\n"
        "print(json.dumps(found))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found.pop("pydantic") == f"pydantic is not in the wheels' --target folder {target}"
    assert found == {
        "mlflow": False,
        "prefect": False,
        "deepspeed": False,
        "torch": True,
        "transformers": True,
        "metadata": ["torch"],
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_device_check_rehearsed_on_the_cpu_with_the_wheels_alone(device_like, toy_world, tmp_path):
    device_wheels.download(HOST_WHEELS, host=True)  # once: kept beside the device's wheels (make device-wheels)
    env, target = device_like
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "benchmarks" / "device_check.sh"),
            str(out),
            "--device",
            "cpu",
            "--target",
            str(target),
            "--wheels",
            str(HOST_WHEELS),
            "--python",
            sys.executable,
            "--toy",
            str(toy_world),
            "--",
            "--skip",
            "two_processes",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    log = proc.stdout[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    checks = result["checks"]
    assert proc.returncode == 0, (log, {name: check.get("error") for name, check in checks.items()})
    assert {name: check["status"] for name, check in checks.items()} == {
        "one_update": "pass",
        "packing": "pass",
        "kill_resume": "pass",
        "two_processes": "skipped",
        "throughput": "pass",
        "throughput_smollm2_shape": "skipped",
    }
    assert (
        result["versions"]["trl"] == device_wheels.WHEELS["trl"]
        and result["versions"]["pydantic"] == device_wheels.WHEELS["pydantic"]
    )
    update = checks["one_update"]
    assert update["compute"]["compute_dtype"] == "bfloat16" and update["compute"]["trained_weight_dtypes"] == [
        "float32"
    ]
    assert 0.5 < update["change_ratio_compute_vs_fp32"] < 2.0
    assert update["float32"]["logprobs_from_generation"] and update["float32"]["first_ratio"] == pytest.approx(
        1.0, abs=1e-5
    )
    assert (
        checks["packing"]["sdpa"]["self_check_packs"]
        and checks["packing"]["packed_rows"] < checks["packing"]["padded_rows"]
    )
    resume = checks["kill_resume"]
    assert resume["bitwise_equal"] and resume["killed"]["killed_after_step_2"]
    assert resume["killed"]["sha256"] == resume["uninterrupted"]["sha256"]
    assert checks["throughput"]["ppoflow"]["episodes_per_s"] > 0 and checks["throughput"]["trl"]["episodes_per_s"] > 0

    environment = json.loads((out / "environment.json").read_text())
    assert environment["problems"] == [], environment["problems"]
    assert {
        name: need["version"] for name, need in environment["needed"].items() if need["source"] == "wheel"
    } == device_wheels.WHEELS
    assert (out / "logs.tar.gz").is_file() and "done, exit 0" in (out / "device_check.log").read_text()
