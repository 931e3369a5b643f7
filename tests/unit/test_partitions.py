"""Partitioned prompt sources: dates from file names, their order, the window, and the refusals."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from ppoflow.config import DataWindow, build_config
from ppoflow.errors import ConfigError, DataError
from ppoflow.partitions import find_partitions, partition_date, select_partitions
from ppoflow.preflight import validate_sources


def touch(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text('{"prompt": "the cat"}\n')
    return directory


def names(partitions) -> list[str]:
    return [partition.path.name for partition in partitions]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("prompts-2026-12-01.jsonl", datetime.date(2026, 12, 1)),
        ("20261201.parquet", datetime.date(2026, 12, 1)),
        ("night_20261130_prompts.json", datetime.date(2026, 11, 30)),
        ("2026-12-01-20261201.jsonl", datetime.date(2026, 12, 1)),  # the same date twice is one date
        ("part-0.jsonl", None),
        ("batch-12345678.jsonl", None),  # eight digits that are no calendar date
        ("prompts-2026-13-01.jsonl", None),
        ("v2026120100.jsonl", None),  # ten digits: not a date
    ],
)
def test_partition_date_golden_values(name, expected):
    assert partition_date(name) == expected


def test_a_name_with_two_dates_is_refused():
    with pytest.raises(DataError, match="two dates .2026-11-30, 2026-12-01.") as raised:
        partition_date("prompts-2026-11-30-to-2026-12-01.jsonl")
    assert "data.path" in str(raised.value)


def test_directory_partitions_are_ordered_by_date_then_name_and_skip_other_files(tmp_path):
    directory = touch(
        tmp_path / "prompts",
        "prompts-2026-12-01.jsonl",
        "b-2026-11-29.jsonl",
        "a-2026-11-29.jsonl",
        "prompts-20261130.jsonl",
        ".prompts-2026-12-02.jsonl.tmp",
        ".prompts-2026-12-02.jsonl",
        "README.md",
    )
    found = find_partitions(str(directory))
    assert names(found) == [
        "a-2026-11-29.jsonl",
        "b-2026-11-29.jsonl",
        "prompts-20261130.jsonl",
        "prompts-2026-12-01.jsonl",
    ]
    assert [p.date for p in found] == [datetime.date(2026, 11, 29)] * 2 + [
        datetime.date(2026, 11, 30),
        datetime.date(2026, 12, 1),
    ]
    assert all(p.path.is_absolute() for p in found)


def test_undated_partitions_are_ordered_by_name(tmp_path):
    directory = touch(tmp_path / "shards", "part-2.jsonl", "part-0.jsonl", "part-1.jsonl")
    assert names(select_partitions(str(directory), DataWindow(newest=2))) == ["part-1.jsonl", "part-2.jsonl"]


def test_window_newest_and_days_with_gaps(tmp_path):
    # 27 and 30 November are missing: days counts calendar days back from the newest date, 1 December.
    directory = touch(
        tmp_path / "prompts",
        *(f"prompts-2026-11-{day}.jsonl" for day in (25, 26, 28, 29)),
        "prompts-2026-12-01.jsonl",
    )
    path = str(directory)
    every = names(select_partitions(path, None))
    assert len(every) == 5
    assert names(select_partitions(path, DataWindow(newest=2))) == [
        "prompts-2026-11-29.jsonl",
        "prompts-2026-12-01.jsonl",
    ]
    assert names(select_partitions(path, DataWindow(newest=50))) == every
    assert names(select_partitions(path, DataWindow(days=1))) == ["prompts-2026-12-01.jsonl"]
    assert names(select_partitions(path, DataWindow(days=2))) == ["prompts-2026-12-01.jsonl"]  # 30 Nov is missing
    assert names(select_partitions(path, DataWindow(days=3))) == [
        "prompts-2026-11-29.jsonl",
        "prompts-2026-12-01.jsonl",
    ]
    assert names(select_partitions(path, DataWindow(days=5))) == every[2:]
    assert names(select_partitions(path, DataWindow(days=7))) == every


def test_glob_selects_the_matching_files(tmp_path):
    touch(
        tmp_path / "data",
        "prompts-2026-11-30.jsonl",
        "prompts-2026-12-01.jsonl",
        "other-2026-12-02.jsonl",
        "prompts.parquet",
    )
    pattern = str(tmp_path / "data" / "prompts-*.jsonl")
    assert names(select_partitions(pattern, None)) == ["prompts-2026-11-30.jsonl", "prompts-2026-12-01.jsonl"]
    assert names(select_partitions(pattern, DataWindow(days=1))) == ["prompts-2026-12-01.jsonl"]


def test_unpartitioned_sources_are_none(tmp_path):
    single = touch(tmp_path, "prompts.jsonl") / "prompts.jsonl"
    assert find_partitions(str(single)) is None
    assert find_partitions("my-org/prompts") is None
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    (saved / "data-00000-of-00001.arrow").write_text("")
    assert find_partitions(str(saved)) is None


def _mixed(tmp: Path) -> tuple[str, DataWindow | None]:
    return str(touch(tmp / "p", "prompts-2026-12-01.jsonl", "extra.jsonl")), None


def _nested(tmp: Path) -> tuple[str, DataWindow | None]:
    touch(tmp / "p" / "2026-12-01", "prompts.jsonl")
    return str(touch(tmp / "p", "prompts-2026-11-30.jsonl")), None


REFUSALS = {
    "glob matching nothing": (
        lambda tmp: (str(tmp / "prompts-*.jsonl"), None),
        DataError,
        "data.path",
        "matches no file",
    ),
    "glob matching another kind": (
        lambda tmp: (str(touch(tmp / "d", "prompts-1.csv") / "prompts-*"), None),
        DataError,
        "data.path",
        "prompts-1.csv",
    ),
    "dated and undated mixed": (_mixed, DataError, "data.path", "ambiguous"),
    "data files in subdirectories": (_nested, DataError, "data.path", "subdirectories"),
    "empty directory": (lambda tmp: (str(touch(tmp / "p", "notes.txt")), None), DataError, "data.path", "holds no"),
    "days on undated files": (
        lambda tmp: (str(touch(tmp / "p", "part-0.jsonl")), DataWindow(days=3)),
        ConfigError,
        "data.window",
        "dated",
    ),
    "window on a single file": (
        lambda tmp: (str(touch(tmp, "p.jsonl") / "p.jsonl"), DataWindow(newest=1)),
        ConfigError,
        "data.window",
        "single source",
    ),
    "window on a hub id": (
        lambda tmp: ("my-org/prompts", DataWindow(newest=1)),
        ConfigError,
        "data.window",
        "single source",
    ),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals_are_one_line_naming_the_field(tmp_path, case):
    make, error, field, detail = case
    path, window = make(tmp_path)
    with pytest.raises(error) as raised:
        select_partitions(path, window)
    message = str(raised.value)
    assert field in message and detail in message and "\n" not in message


@pytest.mark.parametrize(
    ("window", "detail"),
    [
        ({}, "exactly one of newest and days"),
        ({"newest": 2, "days": 2}, "exactly one"),
        ({"newest": 0}, "greater than 0"),
    ],
)
def test_window_config_is_validated(window, detail):
    tree = {
        "models": {"policy": "org/policy", "reward": "org/reward"},
        "data": {"path": "org/prompts", "window": window},
    }
    with pytest.raises(ConfigError, match=detail) as raised:
        build_config(tree)
    assert "data.window" in str(raised.value)


def test_stage_one_checks_the_partitions(tmp_path):
    models = {"policy": "org/policy", "reward": "org/reward"}
    touch(tmp_path / "data", "prompts-2026-12-01.jsonl")
    validate_sources(
        build_config(
            {"models": models, "data": {"path": str(tmp_path / "data" / "prompts-*.jsonl"), "window": {"days": 7}}}
        )
    )
    with pytest.raises(DataError, match="matches no file"):
        validate_sources(build_config({"models": models, "data": {"path": str(tmp_path / "data" / "nightly-*.jsonl")}}))
    with pytest.raises(ConfigError, match="data.window"):
        validate_sources(build_config({"models": models, "data": {"path": "org/prompts", "window": {"newest": 3}}}))
