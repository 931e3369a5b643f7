"""benchmarks/device_wheels.py: the GPU machine's packages plus the pinned wheels cover every import of
what the device runs (gpu_check.py, both throughput sides, `python -m ppoflow.cli`) and the wheels'
Requires-Dist, at versions their requirements accept; and a gap is reported by name. No network: the
closure reads this venv's metadata and the recorded device package list."""

from __future__ import annotations

import pytest
from packaging.utils import parse_wheel_filename

from benchmarks import device_wheels

REPO = device_wheels.REPO
DEVICE_WHEELS = REPO / ".ppoflow" / "device-wheels"


def test_the_device_and_the_wheels_cover_what_the_check_imports():
    report = device_wheels.closure()
    assert report.problems == [], "\n".join(["the device's packages and the wheels leave gaps:", *report.problems])
    assert {"pydantic", "datasets", "trl", "torch", "transformers"} <= set(report.needed)
    assert report.needed["torch"].source == "device" and report.needed["datasets"].source == "wheel"


def test_a_wheel_left_out_is_named_with_what_needs_it(monkeypatch):
    monkeypatch.delitem(device_wheels.WHEELS, "dill")
    problems = device_wheels.closure().problems
    assert any(p.startswith("missing: dill (datasets 5.2.0)") for p in problems), problems


def test_a_pin_nothing_needs_and_a_version_the_device_refuses_are_named(monkeypatch):
    monkeypatch.setitem(device_wheels.WHEELS, "cowsay", "6.1")
    monkeypatch.setitem(device_wheels.DEVICE_VERSIONS, "huggingface-hub", "0.20.0")
    problems = device_wheels.closure().problems
    assert "unneeded: cowsay is pinned and nothing needs it" in problems
    assert any(
        p.startswith("conflict: datasets 5.2.0 needs huggingface-hub") and p.endswith("the device has 0.20.0")
        for p in problems
    ), problems


def test_an_import_no_distribution_provides_is_named(monkeypatch):
    monkeypatch.setattr(
        device_wheels, "third_party_imports", lambda reached=None: {"not_a_real_package": {"benchmarks/gpu_check.py"}}
    )
    problems = device_wheels.closure().problems
    assert "import not_a_real_package (benchmarks/gpu_check.py): no installed distribution provides it" in problems


@pytest.mark.skipif(not DEVICE_WHEELS.is_dir(), reason="make device-wheels has not run here")
def test_the_downloaded_wheels_are_the_pins_for_cpython_3_12_on_linux():
    wheels = sorted(DEVICE_WHEELS.glob("*.whl"))
    pinned = {}
    for wheel in wheels:
        name, version, _, tags = parse_wheel_filename(wheel.name)
        pinned[name] = str(version)
        assert any(
            tag.interpreter in {"py3", "cp312", "py312"}
            and (tag.platform == "any" or "manylinux" in tag.platform and tag.platform.endswith("x86_64"))
            for tag in tags
        ), (wheel.name, sorted(map(str, tags)))
        assert device_wheels.wheel_metadata(wheel)[:2] == (name, str(version))
    assert pinned == device_wheels.WHEELS
    assert device_wheels.size_mib(wheels) < device_wheels.SIZE_LIMIT_MIB
