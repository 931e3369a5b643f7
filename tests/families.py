"""Tiny random models of the common decoder families, built offline from transformers' config classes.

A family's policy is its causal LM and its reward model its `*ForSequenceClassification` with
num_labels=1, both of one tiny config (hidden size 32, 2 layers) on a tokenizer with the family's
conventions where they are what ppoflow must cope with: GPT-2's byte-level BPE declares no pad token
and one `<|endoftext|>` for BOS, EOS and unknown (so it pads with EOS); Pythia (GPT-NeoX) has no pad
token either and prepends nothing; Qwen's byte-level BPE has no BOS at all; Phi-3 pads with EOS; OPT
prepends its EOS token as BOS to every text; Llama, Mistral and Gemma prepend a BOS. Word-level
tokenizers are the toy world's (its vocabulary and special tokens); the byte-level ones are trained
here on the toy's prompts. Every dropout-like config field is nonzero, as in real checkpoints
(GPT-2's and OPT's are 0.1): a run must switch each of them off.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

DROPOUT = 0.1  # every dropout-like field of every family's config
BPE_VOCAB_SIZE = 512


@dataclass(frozen=True)
class Tokens:
    """A family's tokenizer: the toy's word-level one (`word`: `<pad>` `<bos>` `<eos>` `<unk>` in its
    vocabulary) or a byte-level BPE trained on the toy prompts (`bpe`, whose special tokens are the
    ones named here), and which special tokens it declares."""

    kind: Literal["word", "bpe"] = "word"
    eos: str = "<eos>"
    pad: str | None = "<pad>"
    bos: str | None = "<bos>"
    unk: str | None = "<unk>"
    prepend: str | None = "<bos>"  # the token the tokenizer puts before every text (word-level only)
    extra: tuple[str, ...] = ()  # more special tokens in a BPE vocabulary


@dataclass(frozen=True)
class Family:
    config_class: type[PreTrainedConfig]
    shape: dict[str, Any]  # tiny sizes, in the config class's own field names
    dropout_fields: tuple[str, ...]  # the config's dropout-like fields
    tokens: Tokens = field(default_factory=Tokens)


_ENDOFTEXT = "<|endoftext|>"
GPT2_TOKENS = Tokens(kind="bpe", eos=_ENDOFTEXT, pad=None, bos=_ENDOFTEXT, unk=_ENDOFTEXT, prepend=None)
QWEN_TOKENS = Tokens(
    kind="bpe", eos="<|im_end|>", pad=_ENDOFTEXT, bos=None, unk=None, prepend=None, extra=("<|im_start|>",)
)
_LLAMA_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
_GEMMA_SHAPE = {**_LLAMA_SHAPE, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        GPT2Config,
        {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128},
        ("attn_pdrop", "resid_pdrop", "embd_pdrop", "summary_first_dropout"),
        GPT2_TOKENS,
    ),
    "gpt_neox": Family(
        GPTNeoXConfig,
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
        },
        ("attention_dropout", "hidden_dropout", "classifier_dropout"),
        Tokens(pad=None, bos="<eos>", prepend=None),
    ),
    "llama": Family(LlamaConfig, _LLAMA_SHAPE, ("attention_dropout",)),
    "qwen2": Family(Qwen2Config, _LLAMA_SHAPE, ("attention_dropout",), QWEN_TOKENS),
    "qwen3": Family(Qwen3Config, {**_LLAMA_SHAPE, "head_dim": 16}, ("attention_dropout",), QWEN_TOKENS),
    "mistral": Family(MistralConfig, _LLAMA_SHAPE, ("attention_dropout",)),
    "gemma2": Family(Gemma2Config, _GEMMA_SHAPE, ("attention_dropout",)),
    "gemma3": Family(Gemma3TextConfig, _GEMMA_SHAPE, ("attention_dropout",)),
    "phi3": Family(
        Phi3Config,
        {**_LLAMA_SHAPE, "max_position_embeddings": 128, "original_max_position_embeddings": 128},
        ("attention_dropout", "resid_pdrop", "embd_pdrop"),
        Tokens(pad="<eos>"),
    ),
    "opt": Family(
        OPTConfig,
        {
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 128,
        },
        ("dropout", "attention_dropout", "activation_dropout", "layerdrop"),
        Tokens(bos="<eos>", prepend="<eos>"),
    ),
}


def write_tokenizer(toy: Path, out_dir: Path, tokens: Tokens) -> PreTrainedTokenizerBase:
    """A tokenizer of `tokens`' kind and conventions saved to `out_dir` (and loaded back from it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokens.kind == "bpe":
        for name, text in _bpe_files(toy, tokens).items():
            (out_dir / name).write_text(text)
        return AutoTokenizer.from_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy / "policy" / name, out_dir / name)
    backend = json.loads((out_dir / "tokenizer.json").read_text())
    backend["post_processor"] = None if tokens.prepend is None else _prepend(tokens.prepend, backend)
    (out_dir / "tokenizer.json").write_text(json.dumps(backend))
    settings = json.loads((out_dir / "tokenizer_config.json").read_text())
    for key, token in (
        ("eos_token", tokens.eos),
        ("pad_token", tokens.pad),
        ("bos_token", tokens.bos),
        ("unk_token", tokens.unk),
    ):
        settings.pop(key, None)
        if token is not None:
            settings[key] = token
    (out_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return AutoTokenizer.from_pretrained(out_dir)


def _prepend(token: str, backend: dict) -> dict:
    ids = {added["content"]: added["id"] for added in backend["added_tokens"]}
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": token, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {token: {"id": token, "ids": [ids[token]], "tokens": [token]}},
    }


@functools.cache
def _bpe_files(toy: Path, tokens: Tokens) -> dict[str, str]:
    """The files of a byte-level BPE (GPT-2's and Qwen's kind) trained on the toy prompts, once per process."""
    import tempfile

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = list(
        dict.fromkeys(token for token in (tokens.eos, tokens.pad, tokens.bos, tokens.unk, *tokens.extra) if token)
    )
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    prompts = [json.loads(line)["prompt"] for line in (toy / "prompts.jsonl").read_text().splitlines()]
    backend.train_from_iterator(prompts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=tokens.eos,
        pad_token=tokens.pad,
        bos_token=tokens.bos,
        unk_token=tokens.unk,
        model_max_length=128,
    )
    with tempfile.TemporaryDirectory() as staging:
        tokenizer.save_pretrained(staging)
        return {path.name: path.read_text() for path in Path(staging).iterdir()}


def family_config(
    name: str, tokenizer: PreTrainedTokenizerBase, *, dropout: float = DROPOUT, **settings: Any
) -> PreTrainedConfig:
    """The family's tiny config on the tokenizer's vocabulary and special tokens (none where the
    tokenizer has none: GPT-2's config has no pad_token_id)."""
    family = FAMILIES[name]
    return family.config_class(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **family.shape,
        **{field_name: dropout for field_name in family.dropout_fields},
        **settings,
    )


def build_model(
    name: str,
    kind: Literal["policy", "reward"],
    toy: Path,
    out_dir: Path,
    *,
    tokens: Tokens | None = None,
    seed: int = 0,
    dropout: float = DROPOUT,
) -> Path:
    """A family's causal LM (`policy`) or sequence classifier with num_labels=1 (`reward`), random
    weights (seeded), saved with its tokenizer (the family's, or `tokens`) to `out_dir`."""
    tokenizer = write_tokenizer(toy, out_dir, tokens or FAMILIES[name].tokens)
    torch.manual_seed(seed)
    if kind == "policy":
        model = AutoModelForCausalLM.from_config(family_config(name, tokenizer, dropout=dropout))
    else:
        model = AutoModelForSequenceClassification.from_config(
            family_config(name, tokenizer, dropout=dropout, num_labels=1)
        )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_family(name: str, toy: Path, out_dir: Path, *, dropout: float = DROPOUT) -> tuple[Path, Path]:
    """`out_dir/policy` and `out_dir/reward` of one family."""
    return (
        build_model(name, "policy", toy, out_dir / "policy", dropout=dropout),
        build_model(name, "reward", toy, out_dir / "reward", seed=1, dropout=dropout),
    )
