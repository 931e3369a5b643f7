"""A reward model with a tokenizer of its own, built offline from the toy world.

The toy reward model re-indexed: its tokenizer gives every token the id `(7 * id + 3) mod V` of the
toy's (V = 176, coprime with 7, so a permutation), and its embedding rows move with the ids. It is
the same function of text as the toy's reward model under another tokenizer, so scoring through
re-encoded text must give exactly the scores the shared-tokenizer path gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification


def permuted(token_id: int, vocab_size: int) -> int:
    return (7 * token_id + 3) % vocab_size


def permute_tokenizer(source: Path, out_dir: Path, chat_template: str | None = None) -> int:
    """Save to `out_dir` the tokenizer of `source` with every id permuted; returns the vocabulary size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = json.loads((source / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    size = len(vocab)
    spec["model"]["vocab"] = {token: permuted(index, size) for token, index in vocab.items()}
    for added in spec["added_tokens"]:
        added["id"] = permuted(added["id"], size)
    for special in spec["post_processor"]["special_tokens"].values():
        special["ids"] = [permuted(index, size) for index in special["ids"]]
    (out_dir / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return size


def build_permuted_reward(toy: Path, out_dir: Path, chat_template: str | None = None) -> Path:
    """The toy reward model and its tokenizer, re-indexed (module docstring)."""
    size = permute_tokenizer(toy / "reward", out_dir, chat_template)
    model = AutoModelForSequenceClassification.from_pretrained(toy / "reward")
    embeddings = model.get_input_embeddings().weight.data
    order = torch.tensor([permuted(index, size) for index in range(size)])
    moved = torch.empty_like(embeddings)
    moved[order] = embeddings
    embeddings.copy_(moved)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(model.config, name, None) is not None:
            setattr(model.config, name, permuted(getattr(model.config, name), size))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
