"""Conversational prompts for the real-model world: short requests for an opinion or a review.

A prompt is a system turn asking for short answers and one user turn, rendered by the policy's own chat
template. Each request is a form filled with a subject, sometimes after a persona ("As a nurse, ...").
Forms and system turn ask for brevity: SmolLM2 then ends 61 % of its answers within 48 tokens (42 %
without the system turn, 64 samples), so most PPO responses are whole answers.

`UNLIKE_FORMS` and `UNLIKE_SUBJECTS` are another family (notes, descriptions, advice about other
things) that neither the reward model nor PPO ever sees: the gain must hold there too.
"""

from __future__ import annotations

import itertools
import random

Messages = list[dict[str, str]]

SYSTEM = "You are a helpful assistant. Answer in one short sentence."

SUBJECTS = (
    "rainy Sunday mornings",
    "instant coffee",
    "electric scooters",
    "open-plan offices",
    "paperback novels",
    "board games",
    "public libraries",
    "morning runs",
    "street food",
    "video calls",
    "vinyl records",
    "winter holidays",
    "houseplants",
    "podcasts",
    "cycling to work",
    "homemade bread",
    "mechanical keyboards",
    "city parks",
    "camping trips",
    "smartwatches",
    "jazz music",
    "school uniforms",
    "night trains",
    "farmers' markets",
    "working from home",
    "thrift shops",
    "superhero movies",
    "handwritten letters",
    "online courses",
    "green tea",
    "public transport",
    "road trips",
    "museums",
    "crossword puzzles",
    "dark chocolate",
    "noise-cancelling headphones",
    "yoga classes",
    "tiny houses",
    "food trucks",
    "audiobooks",
    "summer festivals",
    "pottery classes",
    "standing desks",
    "hiking boots",
    "sushi",
    "old movies",
    "gardening",
    "the ocean",
    "mountain villages",
    "second-hand bookshops",
    "e-readers",
    "dogs as pets",
    "cats as pets",
    "spicy food",
    "early mornings",
    "picnics",
    "karaoke nights",
    "language apps",
    "baking cookies",
    "long walks",
    "folk music",
    "chess",
    "the first snow of the year",
    "pancakes",
    "train stations",
    "public swimming pools",
    "sunflowers",
    "hot chocolate",
    "bird watching",
    "comic books",
    "lighthouses",
    "rooftop gardens",
    "board game cafes",
    "autumn leaves",
    "fresh strawberries",
    "small towns",
    "wooden toys",
    "science museums",
    "candles",
    "kayaking",
    "sourdough",
    "jigsaw puzzles",
    "street musicians",
    "family dinners",
    "sunsets",
    "local bakeries",
    "the smell of rain",
    "birthday parties",
    "mint tea",
    "photography walks",
    "ice skating",
    "community gardens",
    "ceramic mugs",
    "a quiet evening at home",
)

FORMS = (
    "In one sentence, what do you think of {s}?",
    "Give me a short review of {s}.",
    "What is your honest opinion of {s}? Keep it brief.",
    "In a sentence or two, how would you describe {s}?",
    "Briefly, is it worth trying {s}?",
    "Write a one-sentence review of {s}.",
    "How do you feel about {s}? Answer in one sentence.",
    "Share a quick thought about {s}.",
    "In a few words, what is good or bad about {s}?",
    "Rate {s} in one short sentence.",
    "Tell me briefly what you think about {s}.",
    "What would you say about {s} to a friend, in one sentence?",
)

PERSONAS = (
    "",
    "",
    "",
    "",  # most prompts have none
    "As a busy parent, ",
    "As a student, ",
    "As a retired teacher, ",
    "As a nurse on night shifts, ",
    "As someone new to the city, ",
    "As a travel writer, ",
    "As a chef, ",
)

UNLIKE_SUBJECTS = (
    "a new neighbour",
    "the weekend",
    "a job interview",
    "moving house",
    "a first day at school",
    "learning to swim",
    "a long flight",
    "a power cut",
    "a surprise visit",
    "a lost umbrella",
    "a broken bicycle",
    "an old friend",
    "a snowy road",
    "a late bus",
    "a team project",
)

UNLIKE_FORMS = (
    "Write a two-line note to a colleague about {s}.",
    "Describe {s} to a child in one sentence.",
    "Give one piece of advice about {s}.",
    "Write a short text message about {s}.",
    "Summarise {s} in one sentence for a diary.",
)


def _render(form: str, subject: str, persona: str) -> Messages:
    request = form.format(s=subject)
    content = persona + request[0].lower() + request[1:] if persona else request
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def all_prompts() -> list[Messages]:
    """Every prompt the grammar makes, in a fixed order (personas, forms and subjects crossed)."""
    personas = sorted(set(PERSONAS), key=PERSONAS.index)
    return [_render(form, subject, persona) for persona, form, subject in itertools.product(personas, FORMS, SUBJECTS)]


def sample_prompts(rng: random.Random, n: int) -> list[Messages]:
    """`n` distinct prompts, personas as frequent as in PERSONAS."""
    weights = {persona: PERSONAS.count(persona) for persona in PERSONAS}
    seen: set[str] = set()
    prompts: list[Messages] = []
    limit = len(all_prompts())
    if n > limit:
        raise ValueError(f"n={n}: the grammar makes {limit} distinct prompts")
    while len(prompts) < n:
        persona = rng.choices(list(weights), weights=list(weights.values()))[0]
        prompt = _render(rng.choice(FORMS), rng.choice(SUBJECTS), persona)
        if prompt[-1]["content"] not in seen:
            seen.add(prompt[-1]["content"])
            prompts.append(prompt)
    return prompts


def unlike_prompts() -> list[Messages]:
    """Every prompt of the other family: requests unlike the training ones (75)."""
    return [_render(form, subject, "") for form, subject in itertools.product(UNLIKE_FORMS, UNLIKE_SUBJECTS)]
