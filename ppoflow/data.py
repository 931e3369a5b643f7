"""Stage 3: the prompt dataset, read once, cleaned, tokenized once and split into train/eval on disk.

Sources: a `.jsonl`/`.json`/`.parquet` file, a directory written by `save_to_disk` (a `Dataset`,
or a `DatasetDict` from which `data.split` is taken), a directory of such files, or a Hub dataset id.

Each row meets these rules in order, and every row dropped is counted in the manifest:
1. a blank prompt, or one with no token besides BOS/EOS/pad, is dropped (`dropped_empty`);
2. a prompt ending with EOS — its text ends with the EOS string, or its token ids end with the EOS
   id (some tokenizers append one) — is dropped (`eos_dropped`) or has the EOS removed
   (`eos_stripped`), as `data.eos_prompts` says: a prompt must leave the policy room to answer;
3. a prompt longer than `data.max_prompt_length` tokens is dropped (`dropped_too_long`). Lengths
   count the special tokens the tokenizer adds (a BOS, say); nothing is padded here.
The kept rows are shuffled with a permutation seeded by `seed`; the first `data.eval_size` become
the eval split. The same source, tokenizer, config and seed give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from ppoflow.atomic import write_directory
from ppoflow.config import HUB_ID, BatchPlan, DataConfig
from ppoflow.errors import ConfigError, DataError
from ppoflow.hashing import sha256_file, sha256_tree
from ppoflow.manifests import DatasetManifest
from ppoflow.models import tokenizer_identity

logger = logging.getLogger(__name__)

FORMAT_VERSION = "ppoflow-prompts-1"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
FEATURES = datasets.Features({"prompt": datasets.Value("string"), "input_ids": datasets.Sequence(datasets.Value("int64"))})
COUNTS = ("dropped_empty", "eos_dropped", "eos_stripped", "dropped_too_long")
SOURCE_HINT = "point data.path at a JSONL/Parquet file, a saved dataset directory or a Hub dataset id"


@dataclass(frozen=True)
class _Source:
    table: datasets.Dataset
    name: str
    digest: str


def prepare_prompts(data: DataConfig, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *, seed: int) -> DatasetManifest:
    """Read, clean, tokenize and split the prompts; write `out_dir/{train,eval,dataset.json}` atomically.

    Every problem with the data or config raises a `DataError`/`ConfigError` before anything is written.
    """
    source = _read_source(data)
    rows_read = source.table.num_rows
    prompts = _prompt_texts(source.table, data.prompt_column)
    kept_prompts, kept_ids, counts = _clean_and_tokenize(prompts, tokenizer, data)
    if data.eval_size >= len(kept_prompts):
        raise ConfigError(
            "data.eval_size",
            f"{data.eval_size} is not smaller than the {len(kept_prompts)} prompts kept (of {rows_read} read), "
            "so no training prompt would be left",
            f"set it below {len(kept_prompts)}, leaving at least one training batch",
        )

    order = np.random.default_rng(seed).permutation(len(kept_prompts))
    splits = {
        name: datasets.Dataset.from_dict(
            {"prompt": [kept_prompts[i] for i in indices], "input_ids": [kept_ids[i] for i in indices]},
            features=FEATURES,
        )
        for name, indices in (("train", order[data.eval_size :]), ("eval", order[: data.eval_size]))
    }
    fingerprint = _fingerprint(source.digest, tokenizer, data, seed)
    manifest = _write_atomically(
        Path(out_dir).absolute(),
        splits,
        fingerprint=fingerprint,
        source=source.name,
        **_local_provenance(data, source),
        rows_read=rows_read,
        rows_kept=len(kept_prompts),
        **{key: counts[key] for key in COUNTS},
    )
    logger.info(
        "prompts from %s: %d read, %d kept (train %d, eval %d); dropped %d empty, %d too long (> %d tokens), "
        "%d ending with EOS; EOS stripped from %d",
        source.name, rows_read, manifest.rows_kept, manifest.train_rows, manifest.eval_rows, manifest.dropped_empty,
        manifest.dropped_too_long, data.max_prompt_length, manifest.eos_dropped, manifest.eos_stripped,
    )
    return manifest


def load_prompts(split_dir: Path) -> datasets.Dataset:
    """One prepared split (`train_dir` or `eval_dir` of a `DatasetManifest`): columns `prompt`, `input_ids`."""
    try:
        table = datasets.load_from_disk(str(split_dir))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{split_dir} is not a prepared prompt split ({_reason(exc)}) — prepare the dataset again (stage 3)") from exc
    if not isinstance(table, datasets.Dataset) or table.column_names != list(FEATURES):
        raise DataError(f"{split_dir} is not a prepared prompt split (expected columns prompt, input_ids) — prepare the dataset again (stage 3)")
    return table


def batch_rows(num_rows: int, batch_size: int, update: int, seed: int) -> list[int]:
    """Rows of the global batch of `update`: a stream of seeded permutations of the training rows,
    cut in batches. A pure function of its arguments, so a resumed run draws the batches an
    uninterrupted one would."""
    start, stop = update * batch_size, (update + 1) * batch_size
    rows: list[int] = []
    for epoch in range(start // num_rows, (stop - 1) // num_rows + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_rows, generator=generator).tolist()
        lo, hi = max(start - epoch * num_rows, 0), min(stop - epoch * num_rows, num_rows)
        rows.extend(order[lo:hi])
    return rows


def local_batch(train_rows: datasets.Dataset, batch: BatchPlan, update: int, seed: int, rank: int) -> datasets.Dataset:
    """This process's slice of the global batch of `update` (columns `prompt`, `input_ids`)."""
    rows = batch_rows(len(train_rows), batch.batch_size, update, seed)
    return train_rows.select(rows[rank * batch.local_batch_size : (rank + 1) * batch.local_batch_size])


def _read_source(data: DataConfig) -> _Source:
    path = Path(data.path).expanduser()
    if path.is_file():
        source = _read_file(path)
    elif path.is_dir():
        source = _read_directory(path, data.split)
    elif path.suffix.lower() in FILE_BUILDERS or not HUB_ID.fullmatch(data.path):
        raise _data_error("data.path", f"{data.path} does not exist", SOURCE_HINT)
    else:
        source = _read_hub(data)
    if source.table.num_rows == 0:
        raise _data_error("data.path", f"{source.name} has no rows", "give it at least one prompt per training batch")
    if data.prompt_column not in source.table.column_names:
        raise ConfigError(
            "data.prompt_column",
            f"{data.prompt_column!r} is not a column of {source.name} (its columns: {', '.join(source.table.column_names)})",
            "set it to the column holding the prompt text",
        )
    return source


def _read_file(path: Path) -> _Source:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise _data_error("data.path", f"{path} is not a .jsonl, .json or .parquet file", SOURCE_HINT)
    if _has_no_rows(path, builder):
        raise _data_error("data.path", f"{path} is empty (0 rows)", "give it at least one prompt per training batch")
    digest = sha256_file(path)
    # A private, throwaway cache and an in-memory table: nothing lingers in the shared cache, and a
    # file rewritten in place can never be answered from a stale cache entry.
    with tempfile.TemporaryDirectory(prefix="ppoflow-data-") as cache_dir:
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, keep_in_memory=True)
        except Exception as exc:
            raise _data_error("data.path", f"cannot read {path} as {builder} ({_reason(exc)})", "fix or replace the file") from exc
    return _Source(table, str(path.resolve()), f"file:{digest}")


def _has_no_rows(path: Path, builder: str) -> bool:
    if builder == "parquet":
        try:
            return pq.read_metadata(path).num_rows == 0
        except Exception:
            return False  # unreadable: the loader says why
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            if block.strip():
                return False
    return True


def _read_directory(path: Path, split: str) -> _Source:
    name = str(path.resolve())
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            saved = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise _data_error("data.path", f"cannot read the saved dataset {path} ({_reason(exc)})", "save it again with save_to_disk") from exc
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ConfigError("data.split", f"{split!r} is not a split of {path} (its splits: {', '.join(saved)})", "set it to one of them")
            return _Source(saved[split], f"{name}[{split}]", f"saved:{sha256_tree(path / split)}")
        return _Source(saved, name, f"saved:{sha256_tree(path)}")

    data_files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_BUILDERS]
    if not data_files:
        raise _data_error("data.path", f"{path} holds no .jsonl/.json/.parquet file and is not a saved dataset", SOURCE_HINT)
    if len({FILE_BUILDERS[p.suffix.lower()] for p in data_files}) > 1:
        raise _data_error("data.path", f"{path} mixes JSON and Parquet files", "keep one format in the directory")
    digest = sha256_tree(path)
    with tempfile.TemporaryDirectory(prefix="ppoflow-data-") as cache_dir:
        try:
            table = datasets.load_dataset(str(path), split=split, cache_dir=cache_dir, keep_in_memory=True)
        except Exception as exc:
            raise _data_error("data.path", f"cannot read the files in {path} as split {split!r} ({_reason(exc)})", "fix the files or data.split") from exc
    return _Source(table, f"{name}[{split}]", f"files:{digest}")


def _read_hub(data: DataConfig) -> _Source:
    try:
        table = datasets.load_dataset(data.path, split=data.split, revision=data.revision)
    except Exception as exc:
        raise _data_error(
            "data.path",
            f"dataset {data.path!r} could not be found locally or on the Hub ({_reason(exc)})",
            f"{SOURCE_HINT} (check data.split and data.revision for a Hub id)",
        ) from exc
    revision = f"@{data.revision}" if data.revision else ""
    return _Source(table, f"{data.path}{revision}[{data.split}]", f"hub:{data.path}{revision}:{table._fingerprint}")


def _prompt_texts(table: datasets.Dataset, column: str) -> list[str]:
    texts = list(table[column])
    for row, value in enumerate(texts):
        if not isinstance(value, str):
            shown = "null" if value is None else f"{type(value).__name__} {repr(value)[:40]}"
            raise _data_error(
                "data.prompt_column",
                f"row {row} of column {column!r} holds {shown}, not text",
                "make every prompt a string, or point data.prompt_column at the text column",
            )
    return texts


def _clean_and_tokenize(
    prompts: list[str], tokenizer: PreTrainedTokenizerBase, data: DataConfig
) -> tuple[list[str], list[list[int]], Counter[str]]:
    eos_id = tokenizer.eos_token_id
    frame_ids = {tokenizer.bos_token_id, eos_id, tokenizer.pad_token_id} - {None}
    texts = [_without_trailing_eos(prompt, tokenizer.eos_token) for prompt in prompts]
    token_ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]

    counts: Counter[str] = Counter()
    kept_prompts: list[str] = []
    kept_ids: list[list[int]] = []
    lengths: list[int] = []
    for prompt, text, ids in zip(prompts, texts, token_ids):
        if not text.strip() or all(token in frame_ids for token in ids):
            counts["dropped_empty"] += 1
            continue
        if text != prompt or ids[-1] == eos_id:
            if data.eos_prompts == "drop":
                counts["eos_dropped"] += 1
                continue
            while ids[-1] == eos_id:
                ids = ids[:-1]
            counts["eos_stripped"] += 1
        lengths.append(len(ids))
        if len(ids) > data.max_prompt_length:
            counts["dropped_too_long"] += 1
            continue
        kept_prompts.append(text)
        kept_ids.append(list(ids))

    if not kept_prompts:
        if lengths:
            raise ConfigError(
                "data.max_prompt_length",
                f"{data.max_prompt_length} drops every prompt: the {len(lengths)} non-empty prompts are "
                f"{min(lengths)} (shortest) to {max(lengths)} (longest) tokens long",
                f"raise it to at least {min(lengths)}, or shorten the prompts",
            )
        if counts["eos_dropped"]:
            raise ConfigError(
                "data.eos_prompts",
                f'"drop" drops every prompt: all {counts["eos_dropped"]} non-empty prompts end with the EOS token '
                f"{tokenizer.eos_token!r} (the tokenizer may append it)",
                'set it to "strip"',
            )
        raise _data_error(
            "data.prompt_column",
            f"all {len(prompts)} prompts in column {data.prompt_column!r} are empty or whitespace",
            "point data.prompt_column at the column holding the prompt text",
        )
    return kept_prompts, kept_ids, counts


def _without_trailing_eos(prompt: str, eos_token: str | None) -> str:
    """The prompt without any EOS strings at its end (whitespace after them goes too)."""
    text = prompt
    while eos_token and text.rstrip().endswith(eos_token):
        text = text.rstrip()[: -len(eos_token)]
    return text


def _fingerprint(source_digest: str, tokenizer: PreTrainedTokenizerBase, data: DataConfig, seed: int) -> str:
    identity = {
        "format": FORMAT_VERSION,
        "source": source_digest,
        "tokenizer": tokenizer_identity(tokenizer),
        "data": data.model_dump(mode="json"),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _local_provenance(data: DataConfig, source: _Source) -> dict:
    """Where a local source lives and its digest as read, so a cached manifest notices an edit."""
    if source.digest.startswith("hub:"):
        return {}
    return {"source_path": Path(data.path).expanduser().resolve(), "source_split": data.split, "source_digest": source.digest}


def _write_atomically(out_dir: Path, splits: dict[str, datasets.Dataset], **counts_and_provenance) -> DatasetManifest:
    """Build the whole dataset in a hidden directory beside `out_dir`, then move it into place."""

    def write(staging: Path) -> DatasetManifest:
        for name, table in splits.items():
            # One shard even when empty: a saved dataset with no shard cannot be loaded back.
            table.save_to_disk(str(staging / name), num_shards=1 if table.num_rows == 0 else None)
        manifest = DatasetManifest(
            train_dir=out_dir / "train",
            eval_dir=out_dir / "eval",
            train_rows=splits["train"].num_rows,
            eval_rows=splits["eval"].num_rows,
            train_digest=sha256_tree(staging / "train"),
            eval_digest=sha256_tree(staging / "eval"),
            **counts_and_provenance,
        )
        (staging / "dataset.json").write_text(manifest.model_dump_json(indent=2) + "\n")
        return manifest

    return write_directory(out_dir, write)


def _data_error(field: str, problem: str, fix: str) -> DataError:
    return DataError(f"{field}: {problem} — {fix}")


def _reason(exc: BaseException) -> str:
    """The innermost cause of a loader's failure, on one short line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}"[:300]
