"""The wheel as a newcomer gets it: built from this tree, installed into a fresh virtual environment
(which reuses this machine's installed dependencies), and run from an empty directory outside the
repository: `ppoflow init`, `ppoflow toy`, a short `ppoflow train` and `ppoflow run` on the shipped
toy config. One import root: nothing but `ppoflow` lands in site-packages. The same runs are the console's
test: stdout is the JSON summary alone; stderr has the stage lines and no third-party bar or notice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.flow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "ppoflow", "flows", "tasks", "deployments", "mlflow_server", "configs")
SHORT = [
    "--set",
    "ppo.total_episodes=64",
    "--set",
    "ppo.num_ppo_epochs=1",
    "--set",
    "ppo.checkpoint_every=1",
    "--set",
    "ppo.eval_every=null",
    "--set",
    "data.eval_size=32",
    "--set",
    "tracking.system_metrics=false",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel of this tree; its bin directory."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so that the build leaves nothing in the repository
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(root / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = (root / "dist").glob("ppoflow-*.whl")

    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The dependencies (and pip) from this machine's environment, behind the venv's own site-packages.
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = set(os.listdir(purelib))
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True, text=True
    )
    landed = sorted(set(os.listdir(purelib)) - before)
    assert [name for name in landed if not name.endswith(".dist-info")] == ["ppoflow"], landed
    assert {"flows", "tasks", "deployments", "mlflow_server", "configs"} <= set(os.listdir(purelib / "ppoflow"))
    return env_dir / "bin"


def run(bin_dir: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")
    }
    env.update(
        PATH=f"{bin_dir}:{env.get('PATH', '')}",
        PREFECT_HOME=str(cwd / ".prefect"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return subprocess.run(
        [str(bin_dir / "ppoflow"), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=400
    )


def test_the_wheel_installs_one_import_root_and_runs_from_an_empty_directory(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    python = str(installed / "python")
    where = subprocess.run(
        [
            python,
            "-c",
            "import ppoflow.flows.rlhf_ppo as f, importlib.util as u; print(f.__file__); "
            "print([n for n in ('flows', 'tasks', 'mlflow_server', 'deployments') if u.find_spec(n)])",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert str(REPO) not in where[0] and "site-packages/ppoflow/flows/rlhf_ppo.py" in where[0]
    assert where[1] == "[]", "no top-level flows/tasks/mlflow_server/deployments importable"

    version = run(installed, work, "--version")
    assert version.returncode == 0 and version.stdout.strip() == "ppoflow 0.1.0"

    init = run(installed, work, "init")
    assert init.returncode == 0, init.stderr
    assert json.loads(init.stdout) == {"written": ["my-model.yaml", "toy.yaml"]}
    assert "policy: my-org/my-sft-model" in (work / "my-model.yaml").read_text()
    again = run(installed, work, "init")
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith(
        "error: my-model.yaml and toy.yaml exist"
    )

    toy = run(installed, work, "toy", "--out", ".ppoflow/toy")
    assert toy.returncode == 0, toy.stderr[-3000:]

    train = run(installed, work, "train", "--config", "toy.yaml", *SHORT)
    assert train.returncode == 0, train.stderr[-3000:]
    assert len(train.stdout.splitlines()) == 1 and json.loads(train.stdout)["updates"] == 1
    said_by_stage(train.stderr, cached=False)

    # The flow on the same config and workspace: the paths made absolute alike, it reuses the training.
    flow = run(installed, work, "run", "--config", "toy.yaml", *SHORT)
    assert flow.returncode == 0, flow.stderr[-3000:]
    assert len(flow.stdout.splitlines()) == 1
    summary = json.loads(flow.stdout)
    assert summary["updates"] == 1 and summary["registered_model"]["version"] == "1", summary
    assert (work / ".ppoflow" / "mlflow" / "mlflow.db").is_file()
    said_by_stage(flow.stderr, cached=False)
    assert "training finished earlier (step-000001, update 1 of 1): reusing it" in flow.stderr

    # A workspace copied elsewhere resumes there: only output_dir differs.
    shutil.copytree(work / "runs" / "toy", work / "copied")
    moved = run(installed, work, "train", "--config", "toy.yaml", *SHORT, "--set", "output_dir=copied")
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "training finished earlier" in moved.stderr
    changed = run(installed, work, "train", "--config", "toy.yaml", *SHORT, "--set", "ppo.learning_rate=1e-5")
    assert changed.returncode == 2
    assert (
        changed.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "differs in ppo.learning_rate: 5e-05 -> 1e-05) — use a new "
            "output_dir for a changed config, or delete the old run"
        )
    )


THIRD_PARTY = (
    "Loading weights",
    "Writing model shards",
    "Saving the dataset",
    "Generating train split",
    "Map",
    "prefect.task_runs: Finished in state",
    "Creating initial MLflow database",
    "system_metrics_monitor",
    "Setting accelerator to CPU",
    "Traceback",
    "\x1b[A",
)


def said_by_stage(stderr: str, cached: bool) -> None:
    """Each stage's start and end line, in order; `Cached` on no end line of a run that ran its stages
    (tests/flow/test_flow.py sees all six Cached on a re-run); none of the libraries' bars or notices."""
    lines = [line.split(" INFO ppoflow: ", 1)[1] for line in stderr.splitlines() if " INFO ppoflow: [" in line]
    names = ("configure", "load_models", "prepare_dataset", "init_trainer", "train_ppo", "save_and_evaluate")
    assert [line.split(":")[0].rstrip(" …") for line in lines] == [
        f"[{i}/6] {name}" for i, name in enumerate(names, 1) for _ in (0, 1)
    ], lines
    ends = lines[1::2]
    assert all(line.endswith(" s") for line in ends)
    assert all(("Cached, reused" in line) == cached for line in ends), ends
    assert "models" in ends[1] and "train and" in ends[2] and "update 1 of 1" in ends[4] and "win rate" in ends[5]
    for noise in THIRD_PARTY:
        assert noise.encode().decode("unicode_escape") not in stderr, noise
