"""Ctrl-C on `ppoflow train`: one line saying what was kept and how to resume, exit status 130, and the
same command again resumes from the newest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.engine.conftest import toy_config

pytestmark = pytest.mark.slow


def test_ctrl_c_says_what_was_kept_in_one_line_and_the_same_command_resumes(toy_world, tmp_path):
    config = toy_config(toy_world, tmp_path / "run", "ppo.total_episodes=160")  # 20 updates of 8
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    command = [sys.executable, "-m", "ppoflow.flows.cli", "train", "--config", str(path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert out == "" and "Traceback" not in err
    said = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1 and said[0].startswith(
        "interrupted: finished stages and checkpoints are kept; run `ppoflow train`"
    )
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 20

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    updates = [json.loads(line)["update"] for line in metrics.read_text().splitlines()]
    assert updates == list(range(1, 21)), "the resumed run continues after the newest checkpoint, each update once"
    assert json.loads(again.stdout.splitlines()[-1])["updates"] == 20
