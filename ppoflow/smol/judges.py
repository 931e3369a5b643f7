"""Two external sentiment judges, as ppoflow reward functions `(prompts, completions) -> scores`.

- `vader_score`: VADER's compound score in [-1, 1] (the `vaderSentiment` package, its lexicon and
  rules inside the wheel). The real-model world's reward model is trained on its preferences.
- `afinn_score`: the AFINN-165 lexicon's valence per word (the `afinn` package), a judge the reward
  model never saw: the sum of the word valences over the square root of the word count, so that a
  longer answer is not better for being longer.

Neither is a rule written here; both are loaded once per process.
"""

from __future__ import annotations

import functools
import math

from ppoflow.errors import PpoflowError

INSTALL_HINT = "pip install vaderSentiment afinn (the `real` extra; make install installs it)"


@functools.cache
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise PpoflowError(f"the judge vader_score needs the package vaderSentiment: {INSTALL_HINT}") from None
    return SentimentIntensityAnalyzer()


@functools.cache
def _afinn():
    try:
        from afinn import Afinn
    except ImportError:
        raise PpoflowError(f"the judge afinn_score needs the package afinn: {INSTALL_HINT}") from None
    return Afinn(language="en")


def vader_score(prompts: list[str], completions: list[str]) -> list[float]:
    analyzer = _vader()
    return [analyzer.polarity_scores(completion)["compound"] for completion in completions]


def afinn_score(prompts: list[str], completions: list[str]) -> list[float]:
    afinn = _afinn()
    return [afinn.score(completion) / math.sqrt(max(1, len(completion.split()))) for completion in completions]
