"""Partitioned prompt sources: a directory of dated files or a glob, and the window read from them.

`data.path` is partitioned when it is a directory holding `.jsonl`/`.json`/`.parquet` files (and
not a dataset written by `save_to_disk`), or a glob pattern such as `data/prompts-*.jsonl` (a path
holding `*`, `?` or `[` that does not exist as it is written). Each file is one partition:
- its date is the one calendar date in its name, `YYYY-MM-DD` or `YYYYMMDD`
  (`prompts-2026-12-01.jsonl`, `20261201.parquet`); partitions are read oldest first, files of one
  date by name;
- files without a date in their name are read in name order (`part-0`, `part-1`, ...); a source
  mixing dated and undated files, or a name holding two dates, is refused: its order would be a guess;
- in a directory only the files directly in it count: hidden files (a partition still being
  written as `.name.tmp`) and files of other kinds are skipped, and data files in subdirectories
  are refused rather than silently left out.
`data.window` picks the partitions read: null all of them, `{newest: N}` the last N, `{days: N}`
those dated within N days of the newest partition's date (that date included). Counting from the
newest partition, not from today, makes a re-run read the same files, and the newest partition is
always selected.
"""

from __future__ import annotations

import datetime
import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ppoflow.errors import ConfigError, DataError

if TYPE_CHECKING:  # config imports this module (stage 1 checks the partitions)
    from ppoflow.config import DataWindow

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
GLOB_CHARACTERS = frozenset("*?[")
_DASHED_DATE = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)")
_COMPACT_DATE = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)")
_HINT = "name each partition with one date (prompts-2026-12-01.jsonl), or none of them"


@dataclass(frozen=True)
class Partition:
    path: Path
    date: datetime.date | None


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def is_glob(path: str) -> bool:
    return not Path(path).expanduser().exists() and not GLOB_CHARACTERS.isdisjoint(path)


def partition_date(name: str) -> datetime.date | None:
    """The one calendar date in a file name; None when it holds none. Two different dates are refused."""
    dates = set()
    for pattern in (_DASHED_DATE, _COMPACT_DATE):
        for year, month, day in pattern.findall(name):
            try:
                dates.add(datetime.date(int(year), int(month), int(day)))
            except ValueError:
                continue  # eight digits that are no calendar date: an id, not a date
    if len(dates) > 1:
        shown = ", ".join(str(date) for date in sorted(dates))
        raise DataError(
            f"data.path: the partition name {name} holds two dates ({shown}), so its date is ambiguous — {_HINT}"
        )
    return dates.pop() if dates else None


def find_partitions(path: str) -> list[Partition] | None:
    """The partitions of `data.path`, oldest first; None when it is not partitioned (a file, a saved
    dataset, a Hub id, or nothing at all: the reader says which)."""
    if is_glob(path):
        files = [Path(match) for match in glob.glob(str(Path(path).expanduser())) if Path(match).is_file()]
        if not files:
            raise DataError(
                f"data.path: the pattern {path} matches no file — check "
                "the pattern, or point data.path at a file or directory"
            )
        for file in files:
            if file.suffix.lower() not in DATA_SUFFIXES:
                raise DataError(
                    f"data.path: the pattern {path} matches {file.name}, not "
                    "a .jsonl, .json or .parquet file — narrow the pattern"
                )
    else:
        directory = Path(path).expanduser()
        if not directory.is_dir() or is_saved_dataset(directory):
            return None
        files = [p for p in directory.iterdir() if p.is_file() and _is_data_file(Path(p.name))]
        nested = next(
            (p for p in directory.glob("*/**/*") if p.is_file() and _is_data_file(p.relative_to(directory))), None
        )
        if nested is not None:
            raise DataError(
                f"data.path: {directory} has data files in subdirectories "
                f"({nested.relative_to(directory)}); partitions are the files directly in "
                "it — move them up, or point data.path at a glob such as DIR/*/*.jsonl"
            )
        if not files:
            raise DataError(
                f"data.path: {directory} holds no .jsonl/.json/.parquet file and is not "
                "a saved dataset — point data.path at a JSONL/Parquet file, a saved "
                "dataset directory, a directory of partition files or a Hub dataset id"
            )
    partitions = [Partition(file.resolve(), partition_date(file.name)) for file in files]
    dated = [p for p in partitions if p.date is not None]
    if dated and len(dated) < len(partitions):
        undated = next(p for p in partitions if p.date is None)
        raise DataError(
            f"data.path: {path} mixes dated partitions ({dated[0].path.name}) with "
            f"undated ones ({undated.path.name}), so their order is ambiguous — {_HINT}"
        )
    return sorted(partitions, key=lambda p: (p.date or datetime.date.min, p.path.name, str(p.path)))


def select_partitions(path: str, window: DataWindow | None) -> list[Partition] | None:
    """The partitions `data.window` picks from `data.path`, oldest first; None for an unpartitioned source."""
    partitions = find_partitions(path)
    if partitions is None:
        if window is not None:
            raise ConfigError(
                "data.window",
                f"is set, but data.path {path} is a single source (a "
                "file, a saved dataset or a Hub id), not partitions",
                "remove data.window, or point data.path at a directory of dated files or a glob of them",
            )
        return None
    if window is None:
        return partitions
    if window.newest is not None:
        return partitions[-window.newest :]
    newest = partitions[-1].date
    if newest is None:
        raise ConfigError(
            "data.window",
            f"days needs dated partitions, and the files of {path} have no date in their names",
            "use {newest: N}, or name the files with their date (prompts-2026-12-01.jsonl)",
        )
    first_day = newest - datetime.timedelta(days=window.days - 1)
    return [p for p in partitions if p.date >= first_day]


def _is_data_file(path: Path) -> bool:
    """`path`, relative to the directory, names a data file neither hidden nor below a hidden directory."""
    return path.suffix.lower() in DATA_SUFFIXES and not any(part.startswith(".") for part in path.parts)
