"""Stage 3, prompt preparation, on hand-made files whose answers are known, with a tiny word-level tokenizer."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ppoflow.config import DataConfig, DataWindow
from ppoflow.data import load_prompts, prepare_prompts
from ppoflow.errors import ConfigError, DataError
from ppoflow.hashing import partitions_digest, sha256_file, sha256_tree
from ppoflow.manifests import DatasetManifest

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
WORDS = "the cat sat on mat a dog ran hello world one two three four five".split()
VOCAB = {token: index for index, token in enumerate((PAD, BOS, EOS, UNK, *WORDS))}

# With max_prompt_length=4 and the plain tokenizer (no special tokens added):
ROWS = [
    "the cat sat",  # kept, 3 tokens
    "",  # empty
    "   \t ",  # empty
    "the cat sat on the mat",  # too long, 6 tokens
    "a dog <eos>",  # ends with EOS
    "a dog ran<eos> <eos>\n",  # ends with EOS, twice
    "hello world",  # kept
    "one two three four",  # kept, exactly the limit
    "one two three four five",  # too long, 5 tokens
    "<eos>",  # empty once the EOS is gone
    "hello <eos> world",  # EOS inside, not at the end: kept as is
]
KEPT_WHEN_STRIPPED = {"the cat sat", "a dog ", "a dog ran", "hello world", "one two three four", "hello <eos> world"}
KEPT_WHEN_DROPPED = {"the cat sat", "hello world", "one two three four", "hello <eos> world"}


def make_tokenizer(adds: str | None = None) -> PreTrainedTokenizerFast:
    """Word-level, whitespace-split; `adds` = "bos" prepends BOS, "eos" appends EOS to every text."""
    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds == "bos":
        backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, VOCAB[BOS])])
    elif adds == "eos":
        backend.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, VOCAB[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)


def ids(*words: str) -> list[int]:
    return [VOCAB[word] for word in words]


def records(prompts: list) -> list[dict]:
    return [{"prompt": prompt, "id": row} for row, prompt in enumerate(prompts)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def as_jsonl(tmp: Path, rows: list[dict]) -> Path:
    return write_jsonl(tmp / "prompts.jsonl", rows)


def as_json_array(tmp: Path, rows: list[dict]) -> Path:
    (tmp / "prompts.json").write_text(json.dumps(rows))
    return tmp / "prompts.json"


def as_parquet(tmp: Path, rows: list[dict]) -> Path:
    return write_parquet(tmp / "prompts.parquet", rows)


def as_saved_dataset(tmp: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "saved"))
    return tmp / "saved"


def as_saved_dataset_dict(tmp: Path, rows: list[dict]) -> Path:
    splits = {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp / "saved_dict"))
    return tmp / "saved_dict"


def as_parquet_shards(tmp: Path, rows: list[dict]) -> Path:
    (tmp / "shards").mkdir()
    write_parquet(tmp / "shards" / "part-0.parquet", rows[:5])
    write_parquet(tmp / "shards" / "part-1.parquet", rows[5:])
    return tmp / "shards"


def as_jsonl_shards(tmp: Path, rows: list[dict]) -> Path:
    (tmp / "shards").mkdir()
    write_jsonl(tmp / "shards" / "part-0.jsonl", rows[:5])
    write_jsonl(tmp / "shards" / "part-1.jsonl", rows[5:])
    return tmp / "shards"


NIGHTS = {
    "prompts-2026-11-29.jsonl": ["the cat sat", "a dog ran"],
    "prompts-2026-11-30.jsonl": ["hello world"],
    "prompts-2026-12-01.jsonl": ["one two three", "the mat", "a cat"],
}


def as_partitions(tmp: Path, nights: dict[str, list[str]] = NIGHTS) -> Path:
    directory = tmp / "nightly"
    directory.mkdir(exist_ok=True)
    for name, prompts in nights.items():
        write_jsonl(directory / name, records(prompts))
    return directory


def as_partitions_of_other_columns(tmp: Path) -> Path:
    directory = as_partitions(tmp, {"a-20261130.jsonl": ["the cat"]})
    write_jsonl(directory / "b-20261201.jsonl", [{"text": "a dog"}])
    return directory


SOURCES = [
    as_jsonl,
    as_json_array,
    as_parquet,
    as_saved_dataset,
    as_saved_dataset_dict,
    as_parquet_shards,
    as_jsonl_shards,
]


def prepare(path: Path, out_dir: Path, tokenizer=None, seed: int = 0, **fields) -> DatasetManifest:
    data = DataConfig(path=str(path), **{"max_prompt_length": 4, "eval_size": 1, **fields})
    return prepare_prompts(data, tokenizer or make_tokenizer(), out_dir, seed=seed)


def stored(split_dir: Path) -> list[tuple[str, list[int]]]:
    table = load_prompts(split_dir)
    assert table.column_names == ["prompt", "input_ids", "messages"]
    assert set(table["messages"]) <= {None}  # text prompts have no conversation
    return list(zip(table["prompt"], table["input_ids"], strict=True))


def stored_prompts(manifest: DatasetManifest) -> list[str]:
    return [prompt for prompt, _ in stored(manifest.train_dir) + stored(manifest.eval_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> DatasetManifest:
    tmp = tmp_path_factory.mktemp("reference")
    return prepare(as_jsonl(tmp, records(ROWS)), tmp / "out")


@pytest.mark.parametrize("write_source", SOURCES, ids=lambda write: write.__name__)
def test_every_source_kind_gives_the_same_prompts(tmp_path, write_source, reference):
    manifest = prepare(write_source(tmp_path, records(ROWS)), tmp_path / "out")

    assert (manifest.rows_read, manifest.rows_kept, manifest.train_rows, manifest.eval_rows) == (11, 6, 5, 1)
    assert (manifest.train_digest, manifest.eval_digest) == (reference.train_digest, reference.eval_digest)
    assert manifest.is_intact()


def test_counts_and_contents_when_eos_is_stripped(reference):
    counts = {
        key: getattr(reference, key) for key in ("dropped_empty", "dropped_too_long", "eos_stripped", "eos_dropped")
    }
    assert counts == {"dropped_empty": 3, "dropped_too_long": 2, "eos_stripped": 2, "eos_dropped": 0}

    rows = dict(stored(reference.train_dir) + stored(reference.eval_dir))
    assert set(rows) == KEPT_WHEN_STRIPPED
    assert rows["a dog "] == ids("a", "dog")
    assert rows["a dog ran"] == ids("a", "dog", "ran")
    assert rows["hello <eos> world"] == [VOCAB["hello"], VOCAB[EOS], VOCAB["world"]]
    assert rows["one two three four"] == ids("one", "two", "three", "four")


def test_counts_when_eos_prompts_are_dropped(tmp_path):
    manifest = prepare(as_jsonl(tmp_path, records(ROWS)), tmp_path / "out", eos_prompts="drop")

    assert (manifest.rows_kept, manifest.dropped_empty, manifest.dropped_too_long) == (4, 3, 2)
    assert (manifest.eos_dropped, manifest.eos_stripped) == (2, 0)
    assert set(stored_prompts(manifest)) == KEPT_WHEN_DROPPED


def test_added_bos_counts_towards_the_length(tmp_path):
    manifest = prepare(as_jsonl(tmp_path, records(ROWS)), tmp_path / "out", tokenizer=make_tokenizer("bos"))

    assert (manifest.rows_kept, manifest.dropped_too_long, manifest.dropped_empty) == (5, 3, 3)
    rows = dict(stored(manifest.train_dir) + stored(manifest.eval_dir))
    assert "one two three four" not in rows
    assert rows["a dog "] == [VOCAB[BOS], *ids("a", "dog")]
    assert all(token_ids[0] == VOCAB[BOS] for token_ids in rows.values())


def test_eos_appended_by_the_tokenizer_is_stripped(tmp_path, reference):
    manifest = prepare(as_jsonl(tmp_path, records(ROWS)), tmp_path / "out", tokenizer=make_tokenizer("eos"))

    assert (manifest.eos_stripped, manifest.rows_kept) == (8, 6)
    assert stored(manifest.train_dir) == stored(reference.train_dir)
    assert stored(manifest.eval_dir) == stored(reference.eval_dir)


def test_split_is_deterministic_and_files_byte_identical(tmp_path):
    source = as_jsonl(tmp_path, records(ROWS))
    first = prepare(source, tmp_path / "a" / "out", eval_size=2, seed=7)
    second = prepare(source, tmp_path / "b" / "out", eval_size=2, seed=7)

    assert (first.train_rows, first.eval_rows) == (4, 2)
    assert first.fingerprint == second.fingerprint
    for split in ("train", "eval"):
        assert sha256_tree(tmp_path / "a" / "out" / split) == sha256_tree(tmp_path / "b" / "out" / split)
    assert stored(first.train_dir) == stored(second.train_dir)

    other_seed = prepare(source, tmp_path / "c" / "out", eval_size=2, seed=8)
    assert other_seed.fingerprint != first.fingerprint
    assert set(stored_prompts(other_seed)) == set(stored_prompts(first)) == KEPT_WHEN_STRIPPED


def test_fingerprint_follows_source_tokenizer_and_config(tmp_path):
    source = as_jsonl(tmp_path, records(ROWS))
    base = prepare(source, tmp_path / "base").fingerprint

    assert prepare(source, tmp_path / "bos", tokenizer=make_tokenizer("bos")).fingerprint != base
    assert prepare(source, tmp_path / "len", max_prompt_length=5).fingerprint != base
    write_jsonl(source, records([*ROWS, "a cat"]))
    assert prepare(source, tmp_path / "grown").fingerprint != base


def test_rerun_replaces_the_dataset_and_leaves_no_debris(tmp_path):
    source = as_jsonl(tmp_path, records(ROWS))
    out_dir = tmp_path / "work" / "prompts"
    first = prepare(source, out_dir)
    (out_dir / "train" / "stale.txt").write_text("from an older run")
    second = prepare(source, out_dir)

    assert second == first
    assert not (out_dir / "train" / "stale.txt").exists()
    assert sorted(path.name for path in (tmp_path / "work").iterdir()) == ["prompts"]
    assert DatasetManifest.model_validate_json((out_dir / "dataset.json").read_text()) == second


def test_manifest_notices_a_modified_or_missing_file(tmp_path):
    manifest = prepare(as_jsonl(tmp_path, records(ROWS)), tmp_path / "out")
    assert manifest.is_intact()

    arrow_file = next(manifest.train_dir.glob("*.arrow"))
    arrow_file.write_bytes(arrow_file.read_bytes() + b"\0")
    assert not manifest.is_intact()


def test_eval_size_zero_gives_an_empty_loadable_eval_split(tmp_path):
    manifest = prepare(as_jsonl(tmp_path, records(ROWS)), tmp_path / "out", eval_size=0)

    assert (manifest.train_rows, manifest.eval_rows) == (6, 0)
    assert load_prompts(manifest.eval_dir).num_rows == 0


def test_load_prompts_refuses_a_directory_that_is_not_a_split(tmp_path):
    with pytest.raises(DataError, match="prepare"):
        load_prompts(tmp_path / "missing")


def _write(name: str, text: str) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        (tmp / name).write_text(text)
        return tmp / name

    return write


def _jsonl(prompts: list) -> Callable[[Path], Path]:
    return lambda tmp: as_jsonl(tmp, records(prompts))


def _dir_of(*names: str) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        (tmp / "files").mkdir()
        for name in names:
            rows = records(["the cat"])
            (write_parquet if name.endswith(".parquet") else write_jsonl)(tmp / "files" / name, rows)
        return tmp / "files"

    return write


def write_parquet_empty(tmp: Path) -> Path:
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp / "empty.parquet")
    return tmp / "empty.parquet"


ERROR_CASES = {
    "missing file": (lambda tmp: tmp / "nope.jsonl", {}, DataError, "data.path", "does not exist"),
    "missing directory": (lambda tmp: tmp / "no" / "such" / "dir", {}, DataError, "data.path", "does not exist"),
    "empty file": (_write("empty.jsonl", ""), {}, DataError, "data.path", "empty"),
    "blank lines only": (_write("blank.jsonl", "\n \n"), {}, DataError, "data.path", "empty"),
    "parquet without rows": (write_parquet_empty, {}, DataError, "data.path", "empty"),
    "malformed jsonl": (_write("bad.jsonl", '{"prompt": "a"\n'), {}, DataError, "data.path", "cannot read"),
    "malformed parquet": (_write("bad.parquet", "not parquet at all"), {}, DataError, "data.path", "cannot read"),
    "unsupported suffix": (_write("prompts.csv", "prompt\nthe cat\n"), {}, DataError, "data.path", ".jsonl"),
    "empty directory": (lambda tmp: tmp, {}, DataError, "data.path", "holds no"),
    "mixed directory": (_dir_of("a.jsonl", "b.parquet"), {}, DataError, "data.path", "mixes"),
    "partitions split": (as_partitions, {"split": "test"}, ConfigError, "data.split", "partition files"),
    "window on one file": (_jsonl(ROWS), {"window": {"newest": 1}}, ConfigError, "data.window", "single source"),
    "glob matching nothing": (lambda tmp: tmp / "prompts-*.jsonl", {}, DataError, "data.path", "matches no file"),
    "partitions with other columns": (as_partitions_of_other_columns, {}, DataError, "data.path", "columns"),
    "hub id offline": (lambda tmp: "nobody-here/no-such-prompts", {}, DataError, "data.path", "locally or on the Hub"),
    "missing split": (
        lambda tmp: as_saved_dataset_dict(tmp, records(ROWS)),
        {"split": "validation"},
        ConfigError,
        "data.split",
        "train, test",
    ),
    "missing column": (
        lambda tmp: write_jsonl(tmp / "p.jsonl", [{"text": "a"}]),
        {},
        ConfigError,
        "data.prompt_column",
        "text",
    ),
    "numbers for prompts": (_jsonl([1, 2, 3]), {}, DataError, "data.prompt_column", "row 0"),
    "null prompt": (_jsonl(["the cat", "a dog", None]), {}, DataError, "data.prompt_column", "row 2"),
    "all prompts empty": (_jsonl(["", "  ", "<eos>"]), {}, DataError, "data.prompt_column", "empty"),
    "all prompts too long": (
        _jsonl(["the cat sat on the mat", "one two three four five"]),
        {},
        ConfigError,
        "data.max_prompt_length",
        "5 (shortest) to 6 (longest)",
    ),
    "every prompt ends with eos": (
        _jsonl(["the cat <eos>", "a dog<eos>", ""]),
        {"eos_prompts": "drop"},
        ConfigError,
        "data.eos_prompts",
        "strip",
    ),
    "eval split takes everything": (_jsonl(ROWS), {"eval_size": 6}, ConfigError, "data.eval_size", "6 prompts kept"),
}


@pytest.fixture
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_input_fails_in_one_line_naming_the_field_and_writes_nothing(tmp_path, case, offline_hub):
    make_source, fields, error, field, detail = case
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    out_dir = tmp_path / "work" / "prompts"

    with pytest.raises(error) as raised:
        prepare(make_source(source_dir), out_dir, **fields)

    message = str(raised.value)
    assert field in message and detail in message
    assert "\n" not in message
    assert not (tmp_path / "work").exists()


def test_eos_appending_tokenizer_with_drop_drops_everything(tmp_path):
    with pytest.raises(ConfigError, match="data.eos_prompts"):
        prepare(
            as_jsonl(tmp_path, records(ROWS)), tmp_path / "out", tokenizer=make_tokenizer("eos"), eos_prompts="drop"
        )
    assert not (tmp_path / "out").exists()


def test_manifest_notices_an_edited_local_source(tmp_path):
    # A nightly run on a prompts file edited since yesterday must prepare it again.
    source = as_jsonl(tmp_path, records(ROWS))
    manifest = prepare(source, tmp_path / "out")
    assert manifest.source_path == source.resolve() and manifest.source_digest.startswith("file:")
    assert manifest.is_intact()

    with open(source, "a") as handle:
        handle.write('{"prompt": "one more prompt"}\n')
    assert not manifest.is_intact()


def test_partitions_are_read_oldest_first_and_recorded(tmp_path):
    directory = as_partitions(tmp_path)
    manifest = prepare(directory, tmp_path / "out", eval_size=2)
    # The same rows in date order, as one file, give the very same splits.
    in_order = [prompt for night in sorted(NIGHTS) for prompt in NIGHTS[night]]
    single = prepare(write_jsonl(tmp_path / "all.jsonl", records(in_order)), tmp_path / "single", eval_size=2)
    assert (stored(manifest.train_dir), stored(manifest.eval_dir)) == (
        stored(single.train_dir),
        stored(single.eval_dir),
    )
    assert manifest.rows_read == 6 and manifest.source_path == directory.resolve()
    assert [(r.path, r.date, r.rows) for r in manifest.partitions] == [
        (directory.resolve() / "prompts-2026-11-29.jsonl", datetime.date(2026, 11, 29), 2),
        (directory.resolve() / "prompts-2026-11-30.jsonl", datetime.date(2026, 11, 30), 1),
        (directory.resolve() / "prompts-2026-12-01.jsonl", datetime.date(2026, 12, 1), 3),
    ]
    assert [r.sha256 for r in manifest.partitions] == [sha256_file(r.path) for r in manifest.partitions]
    assert manifest.source_digest == partitions_digest([(r.path.name, r.sha256) for r in manifest.partitions])
    assert manifest.fingerprint != single.fingerprint
    assert DatasetManifest.model_validate_json((tmp_path / "out" / "dataset.json").read_text()) == manifest


def test_window_and_glob_pick_the_partitions_read(tmp_path):
    directory = as_partitions(tmp_path)
    newest = prepare(directory, tmp_path / "newest", window={"newest": 2}, eval_size=0)
    assert [r.path.name for r in newest.partitions] == ["prompts-2026-11-30.jsonl", "prompts-2026-12-01.jsonl"]
    assert sorted(stored_prompts(newest)) == sorted(["hello world", "one two three", "the mat", "a cat"])
    by_glob = prepare(directory / "prompts-2026-11-*.jsonl", tmp_path / "glob", window={"days": 1}, eval_size=0)
    assert [r.path.name for r in by_glob.partitions] == ["prompts-2026-11-30.jsonl"]
    assert by_glob.source_window == DataWindow(days=1) and by_glob.is_intact()
    write_jsonl(directory / "prompts-2026-12-02.jsonl", records(["a new night"]))  # outside the pattern
    assert by_glob.is_intact()
    write_jsonl(directory / "prompts-2026-11-30b.jsonl", records(["a second file of the night"]))
    assert not by_glob.is_intact()


def test_an_empty_partition_is_recorded_with_no_rows(tmp_path):
    directory = as_partitions(tmp_path)
    (directory / "prompts-2026-12-02.jsonl").write_text("")
    manifest = prepare(directory, tmp_path / "out")
    assert [r.rows for r in manifest.partitions] == [2, 1, 3, 0]
    assert manifest.rows_read == 6


def test_manifest_notices_new_and_edited_partitions_in_its_window(tmp_path):
    # A nightly run after a new partition landed must prepare the data again; one outside the window
    # changes nothing.
    directory = as_partitions(tmp_path)
    manifest = prepare(directory, tmp_path / "out", window={"newest": 2})
    assert manifest.is_intact()

    write_jsonl(directory / "prompts-2026-11-01.jsonl", records(["an old night"]))  # older: outside the window
    (directory / "prompts-2026-11-29.jsonl").write_text('{"prompt": "edited outside the window"}\n')
    assert manifest.is_intact()
    assert prepare(directory, tmp_path / "again", window={"newest": 2}).fingerprint == manifest.fingerprint

    with open(directory / "prompts-2026-12-01.jsonl", "a") as handle:
        handle.write('{"prompt": "hello"}\n')
    assert not manifest.is_intact()
    edited = prepare(directory, tmp_path / "edited", window={"newest": 2})
    assert edited.fingerprint != manifest.fingerprint and edited.is_intact()

    write_jsonl(directory / "prompts-2026-12-02.jsonl", records(["a new night"]))
    assert not edited.is_intact()
    landed = prepare(directory, tmp_path / "landed", window={"newest": 2})
    assert [r.path.name for r in landed.partitions] == ["prompts-2026-12-01.jsonl", "prompts-2026-12-02.jsonl"]
    assert landed.fingerprint not in (manifest.fingerprint, edited.fingerprint)

    for partition in directory.iterdir():
        partition.unlink()
    assert not landed.is_intact()  # no partition left: not intact, and no exception


def test_a_manifest_written_before_partitions_still_loads(reference):
    old = json.loads(reference.model_dump_json())
    for field in ("source_window", "partitions"):
        del old[field]
    loaded = DatasetManifest.model_validate(old)
    assert loaded.partitions == [] and loaded.source_window is None and loaded.is_intact()
