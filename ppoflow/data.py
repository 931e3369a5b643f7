"""Stage 3: the prompt dataset, read once, cleaned, tokenized once and split into train/eval on disk.

Sources: a `.jsonl`/`.json`/`.parquet` file, a directory written by `save_to_disk` (a `Dataset`,
or a `DatasetDict` from which `data.split` is taken), partitions — a directory of such files or a
glob of them, of which `data.window` picks some (`ppoflow.partitions`), read oldest first and
concatenated, each recorded in the manifest — or a Hub dataset id.

Prompts come in TRL's formats, all text or all conversations (a row of the other kind is refused):
- text in `data.prompt_column` (default `prompt`), tokenized as it is, with the special tokens the
  tokenizer adds (a BOS, say);
- conversations in `data.prompt_column`: lists of `{"role", "content"}` messages (system turns
  included) ending with a user or tool turn, TRL's conversational prompt-only format;
- conversations in a column named `messages`, TRL's conversational language-modeling format: the
  final assistant turn (the completion) is dropped and the rest is the prompt. With the default
  `prompt_column` and no `prompt` column, a `messages` column is used.
A conversation is rendered with the chat template (`data.chat_template`: the policy tokenizer's, or
a file's) and the generation prompt, and its text tokenized without added special tokens, as
`apply_chat_template(tokenize=True)` does: a template that writes BOS gives exactly one. The
prepared `prompt` column holds the rendered text; `messages` holds the conversation as JSON (null
for a text prompt), for a reward model with a chat template of its own.

Each row meets these rules in order, and every row dropped is counted in the manifest:
1. a blank prompt (for a conversation: every turn blank), or one with no token besides
   BOS/EOS/pad, is dropped (`dropped_empty`);
2. a prompt ending with EOS — its text ends with the EOS string, or its token ids end with the EOS
   id (some tokenizers append one) — is dropped (`eos_dropped`) or has the EOS removed
   (`eos_stripped`), as `data.eos_prompts` says: a prompt must leave the policy room to answer;
3. a prompt longer than `data.max_prompt_length` tokens is dropped (`dropped_too_long`). Lengths
   count the special tokens the tokenizer or the template adds (a BOS, say); nothing is padded here.
The kept rows are shuffled with a permutation seeded by `seed`; the first `data.eval_size` become
the eval split. The same source, tokenizer, template, config and seed give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from ppoflow.atomic import write_directory
from ppoflow.batching import BatchPlan
from ppoflow.config import CHAT_TEMPLATE_CHOICES, HUB_ID, DataConfig
from ppoflow.errors import ConfigError, DataError
from ppoflow.hashing import partitions_digest, sha256_file, sha256_tree
from ppoflow.manifests import DatasetManifest, PartitionRecord
from ppoflow.partitions import Partition, select_partitions
from ppoflow.tokenizers import tokenizer_identity

logger = logging.getLogger(__name__)

FORMAT_VERSION = "ppoflow-prompts-2"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int64")),
        "messages": datasets.Value("string"),
    }
)
COUNTS = ("dropped_empty", "eos_dropped", "eos_stripped", "dropped_too_long")
SOURCE_HINT = "point data.path at a JSONL/Parquet file, a saved dataset directory or a Hub dataset id"
MESSAGES_COLUMN = "messages"  # TRL's conversational language-modeling column: the final assistant turn is dropped
ANSWERABLE_ROLES = ("user", "tool")  # TRL's rule: the generation prompt follows a user or tool turn
MESSAGE_HINT = 'make every prompt text or a list of {"role": ..., "content": "..."} messages'

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class _Source:
    table: datasets.Dataset
    name: str
    digest: str
    partitions: tuple[PartitionRecord, ...] = ()  # the partition files read, oldest first


@dataclass(frozen=True)
class _ChatTemplate:
    text: str
    path: Path | None = None  # the file it was read from (data.chat_template); None: the tokenizer's
    digest: str | None = None  # that file's sha256, as read


@dataclass(frozen=True)
class _Prompts:
    texts: list[str]  # as given, or rendered from the conversation
    conversations: list[str | None]  # the JSON of each conversation; None for text
    template: _ChatTemplate | None  # what rendered the conversations; None for text


def prepare_prompts(
    data: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    *,
    seed: int,
    check_fingerprint: Callable[[str], None] | None = None,
) -> DatasetManifest:
    """Read, clean, tokenize and split the prompts; write `out_dir/{train,eval,dataset.json}` atomically.

    Every problem with the data or config raises a `DataError`/`ConfigError` before anything is
    written, and so may `check_fingerprint`, called with the dataset's fingerprint before the write.
    """
    source = _read_source(data)
    rows_read = source.table.num_rows
    column = _prompt_column(data, source)
    prompts = _prompts(source.table[column], column, data, tokenizer)
    kept_rows, kept_prompts, kept_ids, counts = _clean_and_tokenize(prompts, tokenizer, data, column)
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
            {
                "prompt": [kept_prompts[i] for i in indices],
                "input_ids": [kept_ids[i] for i in indices],
                "messages": [prompts.conversations[kept_rows[i]] for i in indices],
            },
            features=FEATURES,
        )
        for name, indices in (("train", order[data.eval_size :]), ("eval", order[: data.eval_size]))
    }
    fingerprint = _fingerprint(source.digest, tokenizer, data, seed, prompts.template)
    if check_fingerprint is not None:
        check_fingerprint(fingerprint)
    manifest = _write_atomically(
        Path(out_dir).absolute(),
        splits,
        fingerprint=fingerprint,
        source=source.name,
        **_local_provenance(data, source),
        **_template_provenance(prompts),
        rows_read=rows_read,
        rows_kept=len(kept_prompts),
        **{key: counts[key] for key in COUNTS},
    )
    logger.info(
        "prompts from %s: %d read, %d kept (train %d, eval %d); dropped %d empty, %d too long (> %d tokens), "
        "%d ending with EOS; EOS stripped from %d",
        source.name,
        rows_read,
        manifest.rows_kept,
        manifest.train_rows,
        manifest.eval_rows,
        manifest.dropped_empty,
        manifest.dropped_too_long,
        data.max_prompt_length,
        manifest.eos_dropped,
        manifest.eos_stripped,
    )
    return manifest


def load_prompts(split_dir: Path) -> datasets.Dataset:
    """One prepared split (`train_dir` or `eval_dir` of a `DatasetManifest`): columns `prompt` (the text the
    policy sees), `input_ids`, `messages` (the conversation's JSON; null for a text prompt)."""
    try:
        table = datasets.load_from_disk(str(split_dir))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(
            f"{split_dir} is not a prepared prompt split ({_reason(exc)}) — prepare the dataset again (stage 3)"
        ) from exc
    if not isinstance(table, datasets.Dataset) or table.column_names != list(FEATURES):
        raise DataError(
            f"{split_dir} is not a prepared prompt split (expected columns "
            f"{', '.join(FEATURES)}) — prepare the dataset again (stage 3)"
        )
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
    """This process's slice of the global batch of `update` (the columns of `load_prompts`)."""
    rows = batch_rows(len(train_rows), batch.batch_size, update, seed)
    return train_rows.select(rows[rank * batch.local_batch_size : (rank + 1) * batch.local_batch_size])


def _read_source(data: DataConfig) -> _Source:
    path = Path(data.path).expanduser()
    partitions = select_partitions(data.path, data.window)
    if partitions is not None:
        source = _read_partitions(data, partitions)
    elif path.is_file():
        source = _read_file(path)
    elif path.is_dir():
        source = _read_saved_dataset(path, data.split)
    elif path.suffix.lower() in FILE_BUILDERS or not HUB_ID.fullmatch(data.path):
        raise _data_error("data.path", f"{data.path} does not exist", SOURCE_HINT)
    else:
        source = _read_hub(data)
    if source.table.num_rows == 0:
        raise _data_error("data.path", f"{source.name} has no rows", "give it at least one prompt per training batch")
    return source


def _prompt_column(data: DataConfig, source: _Source) -> str:
    """The column holding the prompts: `data.prompt_column`, or `messages` in place of an absent default."""
    columns = source.table.column_names
    if data.prompt_column in columns:
        return data.prompt_column
    if data.prompt_column == DataConfig.model_fields["prompt_column"].default and MESSAGES_COLUMN in columns:
        logger.info(
            "no %r column in %s: the prompts are the conversations in %r",
            data.prompt_column,
            source.name,
            MESSAGES_COLUMN,
        )
        return MESSAGES_COLUMN
    raise ConfigError(
        "data.prompt_column",
        f"{data.prompt_column!r} is not a column of {source.name} (its columns: {', '.join(columns)})",
        "set it to the column holding the prompts (text or message lists; a "
        f"{MESSAGES_COLUMN!r} column is used when there is no 'prompt' column)",
    )


def _read_file(path: Path) -> _Source:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise _data_error("data.path", f"{path} is not a .jsonl, .json or .parquet file", SOURCE_HINT)
    table, digest = _load_file(path, builder)
    if table is None:
        raise _data_error("data.path", f"{path} is empty (0 rows)", "give it at least one prompt per training batch")
    return _Source(table, str(path.resolve()), f"file:{digest}")


def _read_partitions(data: DataConfig, partitions: list[Partition]) -> _Source:
    """The selected partitions concatenated oldest first; an empty partition (a night without new
    prompts) is recorded and read as no rows."""
    if data.split != DataConfig.model_fields["split"].default:
        raise ConfigError(
            "data.split",
            f"is {data.split!r}, but data.path {data.path} names partition files, which have no splits",
            "remove it: it picks a split of a Hub dataset or a saved DatasetDict",
        )
    builders = {FILE_BUILDERS[partition.path.suffix.lower()] for partition in partitions}
    if len(builders) > 1:
        raise _data_error(
            "data.path", f"{data.path} mixes JSON and Parquet files", "keep one format among the partitions"
        )
    (builder,) = builders
    tables, records = {}, []
    for partition in partitions:
        table, digest = _load_file(partition.path, builder)
        records.append(
            PartitionRecord(
                path=partition.path, date=partition.date, sha256=digest, rows=0 if table is None else table.num_rows
            )
        )
        if table is not None:
            tables[partition.path.name] = table
    name = str(Path(data.path).expanduser().resolve())
    if not tables:
        raise _data_error(
            "data.path",
            f"the {len(records)} partitions read from {name} are all empty (0 rows)",
            "give them at least one prompt per training batch",
        )
    (first, first_table), *rest = tables.items()
    for other, table in rest:
        if set(table.column_names) != set(first_table.column_names):
            raise _data_error(
                "data.path",
                f"partition {other} has the columns {', '.join(sorted(table.column_names))}, and {first} has "
                f"{', '.join(sorted(first_table.column_names))}",
                "give every partition the same columns",
            )
    try:
        table = datasets.concatenate_datasets(list(tables.values()))
    except ValueError as exc:  # the same columns with types that cannot be aligned
        raise _data_error(
            "data.path",
            f"the partitions of {name} cannot be read as one table ({_reason(exc)})",
            "give every partition the same column types",
        ) from exc
    logger.info("%d partitions of %s: %s to %s", len(records), name, records[0].path.name, records[-1].path.name)
    return _Source(
        table, name, partitions_digest([(record.path.name, record.sha256) for record in records]), tuple(records)
    )


def _load_file(path: Path, builder: str) -> tuple[datasets.Dataset | None, str]:
    """A JSON or Parquet file's rows (None when it has none) and its sha256."""
    digest = sha256_file(path)
    if _has_no_rows(path, builder):
        return None, digest
    # A private, throwaway cache and an in-memory table: nothing lingers in the shared cache, and a
    # file rewritten in place can never be answered from a stale cache entry.
    with tempfile.TemporaryDirectory(prefix="ppoflow-data-") as cache_dir:
        try:
            table = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache_dir, keep_in_memory=True
            )
        except Exception as exc:
            raise _data_error(
                "data.path", f"cannot read {path} as {builder} ({_reason(exc)})", "fix or replace the file"
            ) from exc
    return table, digest


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


def _read_saved_dataset(path: Path, split: str) -> _Source:
    """A directory written by `save_to_disk`: a Dataset, or a DatasetDict of which `split` is read."""
    name = str(path.resolve())
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise _data_error(
            "data.path", f"cannot read the saved dataset {path} ({_reason(exc)})", "save it again with save_to_disk"
        ) from exc
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ConfigError(
                "data.split",
                f"{split!r} is not a split of {path} (its splits: {', '.join(saved)})",
                "set it to one of them",
            )
        return _Source(saved[split], f"{name}[{split}]", f"saved:{sha256_tree(path / split)}")
    return _Source(saved, name, f"saved:{sha256_tree(path)}")


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


def _prompts(values, column: str, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> _Prompts:
    """Every row's prompt text: text as it is, a conversation rendered with the chat template."""
    values = list(values)
    kinds = [_kind(row, value, column) for row, value in enumerate(values)]
    for row, kind in enumerate(kinds):
        if kind != kinds[0]:
            raise _data_error(
                "data.prompt_column",
                f"row {row} of column {column!r} holds {kind}, but row 0 holds {kinds[0]}",
                "make the prompts all text or all conversations",
            )
    if kinds[0] == "text":
        if data.chat_template not in CHAT_TEMPLATE_CHOICES:
            logger.warning(
                "data.chat_template names %s, but the prompts in column %r are text: it is not used",
                data.chat_template,
                column,
            )
        return _Prompts(values, [None] * len(values), None)
    conversations = [_conversation(row, messages, column) for row, messages in enumerate(values)]
    template = _chat_template(data, tokenizer, column)
    texts = [_render(row, conversation, tokenizer, template.text) for row, conversation in enumerate(conversations)]
    return _Prompts(texts, [json.dumps(conversation, ensure_ascii=False) for conversation in conversations], template)


def _kind(row: int, value: Any, column: str) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a conversation"
    raise _data_error(
        "data.prompt_column",
        f"row {row} of column {column!r} holds {_shown(value)}, not text or a list of messages",
        f"{MESSAGE_HINT}, or point data.prompt_column at the prompt column",
    )


def _conversation(row: int, messages: list, column: str) -> Messages:
    """The messages the policy answers: checked, the final assistant turn of a `messages` row dropped."""
    where = f"row {row} of column {column!r}"
    if not messages:
        raise _data_error("data.prompt_column", f"{where} is an empty conversation", MESSAGE_HINT)
    for index, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise _data_error(
                "data.prompt_column",
                f"{where}: message {index} is {_shown(message)}, not a {{role, content}} message with text content",
                MESSAGE_HINT,
            )
    # Arrow gives every message each key any message has (null where it is absent); transformers drops them too.
    messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
    if column == MESSAGES_COLUMN and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
        if not messages:
            raise _data_error(
                "data.prompt_column",
                f"{where} holds only an assistant turn: no prompt is left "
                "once the final assistant turn (the completion) is dropped",
                "begin each conversation with a user turn",
            )
    last_role = messages[-1]["role"]
    if last_role not in ANSWERABLE_ROLES:
        fix = "end it with a user turn"
        if last_role == "assistant":
            fix += (
                f"; a conversation ending with its reply belongs in a {MESSAGES_COLUMN!r} "
                "column (TRL's language-modeling format), whose final assistant turn is dropped"
            )
        raise _data_error(
            "data.prompt_column",
            f"{where} ends with a turn of role {last_role!r}: the policy answers a user or tool turn",
            fix,
        )
    return messages


def _chat_template(data: DataConfig, tokenizer: PreTrainedTokenizerBase, column: str) -> _ChatTemplate:
    if data.chat_template == "none":
        raise ConfigError(
            "data.chat_template",
            f"is none, but column {column!r} holds conversations",
            "set it to auto (the policy tokenizer's template) or a Jinja template file, or give the prompts as text",
        )
    if data.chat_template == "auto":
        if not tokenizer.chat_template:
            raise ConfigError(
                "data.chat_template",
                "is auto, but the policy tokenizer has no chat template "
                f"to render the conversations in column {column!r}",
                "set data.chat_template to a Jinja template file, or give the prompts as text",
            )
        try:
            return _ChatTemplate(tokenizer.get_chat_template())
        except ValueError as exc:  # several named templates, none of them the default
            raise ConfigError(
                "data.chat_template",
                f"the policy tokenizer's chat template cannot be used ({_reason(exc)})",
                "set it to a Jinja template file",
            ) from exc
    path = Path(data.chat_template).expanduser().resolve()
    try:
        raw = path.read_bytes()
        return _ChatTemplate(raw.decode("utf-8"), path, hashlib.sha256(raw).hexdigest())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "data.chat_template",
            f"cannot read {path} ({_reason(exc)})",
            "point it at a Jinja chat template file, or set it to auto or none",
        ) from exc


def _render(row: int, conversation: Messages, tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    if not any(message["content"].strip() for message in conversation):
        return ""  # a blank prompt, dropped as one
    try:
        return tokenizer.apply_chat_template(
            conversation, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # a template error, or the template refusing the conversation (raise_exception)
        raise ConfigError(
            "data.chat_template",
            f"the chat template fails on row {row} ({_reason(exc)})",
            "fix the template, or the row if the template refuses it",
        ) from exc


def _shown(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {repr(value)[:40]}"


def _clean_and_tokenize(
    prompts: _Prompts, tokenizer: PreTrainedTokenizerBase, data: DataConfig, column: str
) -> tuple[list[int], list[str], list[list[int]], Counter[str]]:
    """The rows kept (their indices, texts and token ids) and the counts of those dropped or changed."""
    eos_id = tokenizer.eos_token_id
    frame_ids = {tokenizer.bos_token_id, eos_id, tokenizer.pad_token_id} - {None}
    texts = [_without_trailing_eos(prompt, tokenizer.eos_token) for prompt in prompts.texts]
    # A rendered conversation holds its special tokens already (a BOS the template writes): none are added.
    token_ids = tokenizer(texts, add_special_tokens=prompts.template is None, verbose=False)["input_ids"]

    counts: Counter[str] = Counter()
    kept_rows: list[int] = []
    kept_prompts: list[str] = []
    kept_ids: list[list[int]] = []
    lengths: list[int] = []
    for row, (prompt, text, ids) in enumerate(zip(prompts.texts, texts, token_ids, strict=True)):
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
        kept_rows.append(row)
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
            f"all {len(texts)} prompts in column {column!r} are empty or whitespace",
            "point data.prompt_column at the column holding the prompts",
        )
    return kept_rows, kept_prompts, kept_ids, counts


def _without_trailing_eos(prompt: str, eos_token: str | None) -> str:
    """The prompt without any EOS strings at its end (whitespace after them goes too)."""
    text = prompt
    while eos_token and text.rstrip().endswith(eos_token):
        text = text.rstrip()[: -len(eos_token)]
    return text


def _fingerprint(
    source_digest: str, tokenizer: PreTrainedTokenizerBase, data: DataConfig, seed: int, template: _ChatTemplate | None
) -> str:
    identity = {
        "format": FORMAT_VERSION,
        "source": source_digest,
        "tokenizer": tokenizer_identity(tokenizer),
        "chat_template": template.text if template else None,
        "data": data.model_dump(mode="json"),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _local_provenance(data: DataConfig, source: _Source) -> dict:
    """Where a local source lives and its digest as read, so a cached manifest notices an edit."""
    if source.digest.startswith("hub:"):
        return {}
    provenance = {
        "source_path": Path(data.path).expanduser().resolve(),
        "source_split": data.split,
        "source_digest": source.digest,
    }
    if source.partitions:
        provenance |= {"source_window": data.window, "partitions": list(source.partitions)}
    return provenance


def _template_provenance(prompts: _Prompts) -> dict:
    """The template file that rendered the conversations and its digest, so a cached manifest notices an edit."""
    template = prompts.template
    if template is None or template.path is None:
        return {}
    return {"chat_template_path": template.path, "chat_template_digest": template.digest}


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
