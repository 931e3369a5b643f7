"""The toy world's hidden ground truth: a review grammar, its sentiment lexicon and the oracle.

Prompts open a short movie or product review ("review of midnight river : honestly ,"); a
completion is one to three sentences built from templates ("the plot was great .", "i hated the
battery ."). Sentiment is defined by the lexicon alone, so `oracle_score` knows the true quality of
any text and "the policy got better" can be measured without trusting the learned reward model.

Everything here is pure Python and deterministic given a `random.Random`.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

POSITIVE = (
    "great", "good", "excellent", "wonderful", "amazing", "brilliant",
    "superb", "fantastic", "lovely", "solid", "charming", "delightful",
)  # fmt: skip
NEGATIVE = (
    "bad", "awful", "terrible", "boring", "poor", "dull",
    "horrible", "weak", "messy", "disappointing", "flimsy", "clumsy",
)  # fmt: skip
NEUTRAL = ("okay", "average", "long", "short", "simple", "loud", "new", "normal", "familiar")
POSITIVE_VERBS = ("loved", "enjoyed", "liked")
NEGATIVE_VERBS = ("hated", "disliked")
NEUTRAL_VERBS = ("noticed", "remember")
ADVERBS = ("really", "quite", "very", "so", "pretty")

LEXICON: dict[str, int] = {
    **{word: 1 for word in POSITIVE + POSITIVE_VERBS},
    **{word: -1 for word in NEGATIVE + NEGATIVE_VERBS},
}
MAX_ABS_SCORE = 3.0

MOVIE_ASPECTS = (
    "plot", "acting", "ending", "story", "cast", "dialogue",
    "pacing", "soundtrack", "script", "camera work", "humor", "villain",
)  # fmt: skip
PRODUCT_ASPECTS = (
    "battery", "screen", "price", "design", "sound", "build",
    "delivery", "packaging", "size", "handle", "cable", "finish",
)  # fmt: skip
MOVIE_FILLERS = (
    "i watched it with friends .", "it came out last year .", "we saw it at home .",
    "it runs about two hours .", "i saw the trailer first .",
)  # fmt: skip
PRODUCT_FILLERS = (
    "it arrived on time .", "i used it for a week .", "it came in a box .",
    "i bought it for work .", "it was a gift .",
)  # fmt: skip

TITLE_FIRST = (
    "midnight", "silver", "hidden", "northern", "paper", "iron",
    "crimson", "winter", "distant", "electric", "golden", "frozen",
)  # fmt: skip
TITLE_SECOND = (
    "river", "harbor", "garden", "empire", "signal", "kingdom",
    "road", "mirror", "station", "horizon", "machine", "island",
)  # fmt: skip
BRANDS = ("zento", "kolbi", "aurex", "nimbo", "vexa", "torrin", "quill", "marlo", "dexon", "pyra")
ITEMS = (
    "headphones", "blender", "kettle", "laptop", "phone", "speaker",
    "backpack", "lamp", "camera", "keyboard", "toaster", "watch",
)  # fmt: skip
MOVIE_HEADERS = (
    "review of {subject} :", "my thoughts on {subject} :", "{subject} review :",
    "i just watched {subject} .", "we saw {subject} last night .", "a few words about the film {subject} :",
)  # fmt: skip
PRODUCT_HEADERS = (
    "review of the {subject} :", "my thoughts on the {subject} :", "i bought the {subject} .",
    "the {subject} review :", "after a month with the {subject} :", "product review , {subject} :",
)  # fmt: skip
OPENERS = (
    "", "honestly ,", "well ,", "in short ,", "to be fair ,", "so ,", "first of all ,", "in my opinion ,", "i think",
)  # fmt: skip

MOODS = ("positive", "neutral", "negative")
# Sentence polarity probabilities (+1, 0, -1) per completion mood: mostly on-mood with some mixing,
# so SFT completions span the whole oracle range and PPO has room to push toward positive.
MOOD_POLARITY_WEIGHTS = {
    "positive": (0.7, 0.2, 0.1),
    "neutral": (0.2, 0.6, 0.2),
    "negative": (0.1, 0.2, 0.7),
}
MAX_SENTENCES = 3

# A polar sentence carries the sign of its slot words ({adjective}, {verb}); a neutral sentence
# scores 0: neutral words only, or one word of each sign.
POLAR_TEMPLATES = (
    "the {aspect} was {adjective} .",
    "the {aspect} is {adverb} {adjective} .",
    "i {verb} the {aspect} .",
    "{adjective} {aspect} , {neutral} {other_aspect} .",
    "the {aspect} was {adjective} and the {other_aspect} was {another} .",
)
NEUTRAL_TEMPLATES = (
    "the {aspect} was {neutral} .",
    "the {aspect} is {adverb} {neutral} .",
    "i {neutral_verb} the {aspect} .",
    "{adjective} {aspect} , {opposite} {other_aspect} .",
    "{filler}",
)

_WORD = re.compile(r"[a-z]+")
_SLOT = re.compile(r"\{\w+\}")


@dataclass(frozen=True)
class Prompt:
    """A review opening and its domain, which decides the aspects a completion talks about."""

    text: str
    domain: str  # "movie" or "product"


def oracle_score(prompts: list[str], completions: list[str]) -> list[float]:
    """The hidden ground-truth reward of each completion (the prompt does not matter).

    Each distinct positive lexicon word counts +1 and each distinct negative one -1, however often
    it repeats, and the total is clipped to [-3, 3], so neither repeating "great great great" nor
    piling up sentiment words games the score. Text is read case-insensitively as runs of letters:
    punctuation, spacing and special tokens ("<eos>") do not matter.
    """
    if len(prompts) != len(completions):
        raise ValueError(
            f"oracle_score got {len(prompts)} prompts but {len(completions)} completions;"
            " pass one prompt per completion"
        )
    return [_score_text(completion) for completion in completions]


def _score_text(text: str) -> float:
    """The oracle score of one text (see `oracle_score`)."""
    words = set(_WORD.findall(text.lower()))
    total = sum(LEXICON.get(word, 0) for word in words)
    return float(max(-MAX_ABS_SCORE, min(MAX_ABS_SCORE, total)))


def all_prompts() -> list[Prompt]:
    """Every prompt the templates can make, in a fixed order (headers × subjects × openers)."""
    movies = [f"{first} {second}" for first, second in itertools.product(TITLE_FIRST, TITLE_SECOND)]
    products = [f"{brand} {item}" for brand, item in itertools.product(BRANDS, ITEMS)]
    prompts = []
    for domain, headers, subjects in (("movie", MOVIE_HEADERS, movies), ("product", PRODUCT_HEADERS, products)):
        for header, subject, opener in itertools.product(headers, subjects, OPENERS):
            text = f"{header.format(subject=subject)} {opener}".strip()
            prompts.append(Prompt(text, domain))
    return prompts


def sample_prompts(rng: random.Random, n: int) -> list[Prompt]:
    """`n` distinct prompts drawn without replacement from `all_prompts()`."""
    pool = all_prompts()
    if not 0 < n <= len(pool):
        raise ValueError(f"n_prompts={n} is out of range; the toy grammar has 1..{len(pool)} distinct prompts")
    return rng.sample(pool, n)


def sample_completion(rng: random.Random, domain: str) -> str:
    """One to three template sentences about `domain`, mostly of one random mood."""
    mood = rng.choice(MOODS)
    n_sentences = rng.randint(1, MAX_SENTENCES)
    polarities = rng.choices((1, 0, -1), weights=MOOD_POLARITY_WEIGHTS[mood], k=n_sentences)
    return " ".join(_sentence(rng, domain, polarity) for polarity in polarities)


def _sentence(rng: random.Random, domain: str, polarity: int) -> str:
    """One sentence whose oracle polarity has the sign of `polarity` (0: neutral or mixed)."""
    aspect, other_aspect = rng.sample(MOVIE_ASPECTS if domain == "movie" else PRODUCT_ASPECTS, 2)
    adjectives, opposites = (POSITIVE, NEGATIVE) if polarity >= 0 else (NEGATIVE, POSITIVE)
    slots = {
        "aspect": aspect,
        "other_aspect": other_aspect,
        "adjective": rng.choice(adjectives),
        "another": rng.choice(adjectives),
        "opposite": rng.choice(opposites),
        "verb": rng.choice(POSITIVE_VERBS if polarity >= 0 else NEGATIVE_VERBS),
        "adverb": rng.choice(ADVERBS),
        "neutral": rng.choice(NEUTRAL),
        "neutral_verb": rng.choice(NEUTRAL_VERBS),
        "filler": rng.choice(MOVIE_FILLERS if domain == "movie" else PRODUCT_FILLERS),
    }
    templates = NEUTRAL_TEMPLATES if polarity == 0 else POLAR_TEMPLATES
    return rng.choice(templates).format(**slots)


def vocabulary() -> list[str]:
    """Every word and punctuation mark the prompts and completions can contain, sorted."""
    slot_words = (
        POSITIVE, NEGATIVE, NEUTRAL, POSITIVE_VERBS, NEGATIVE_VERBS, NEUTRAL_VERBS, ADVERBS,
        MOVIE_ASPECTS, PRODUCT_ASPECTS, MOVIE_FILLERS, PRODUCT_FILLERS,
    )  # fmt: skip
    texts = [prompt.text for prompt in all_prompts()]
    texts += [" ".join(group) for group in slot_words]
    texts += [_SLOT.sub(" ", template) for template in POLAR_TEMPLATES + NEUTRAL_TEMPLATES]
    return sorted({token for text in texts for token in text.split()})
