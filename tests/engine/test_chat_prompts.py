"""A toy run on conversational prompts (TRL's `messages` format) rendered with a chat template file."""

from __future__ import annotations

import json

import pytest

from ppoflow import pipeline
from ppoflow.data import load_prompts
from ppoflow.tokenizers import load_tokenizer

pytestmark = pytest.mark.slow  # trains on the toy world

# The toy tokenizer has no chat template and a closed vocabulary: this one writes BOS and the user turns.
TOY_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] }}{% endif %}{% endfor %}"
)


def test_a_conversational_dataset_trains_and_samples_show_the_rendered_prompt(toy_world, make_config, tmp_path):
    texts = [json.loads(line)["prompt"] for line in (toy_world / "prompts.jsonl").read_text().splitlines()[:48]]
    conversations = tmp_path / "conversations.jsonl"
    conversations.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "You write reviews."},
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": "great ."},
                    ]
                }
            )
            + "\n"
            for text in texts
        )
    )
    (tmp_path / "toy.jinja").write_text(TOY_TEMPLATE)
    config = make_config(
        f"data.path={conversations}",
        f"data.chat_template={tmp_path / 'toy.jinja'}",
        "ppo.total_episodes=8",
        "eval.batch_size=32",
    )

    plan, release = pipeline.run_all(config)

    assert len((plan.output_dir / "metrics.jsonl").read_text().splitlines()) == 1  # one update
    tokenizer = load_tokenizer(plan.output_dir / "tokenizer")
    train = load_prompts(plan.output_dir / "data" / "train")
    for prompt, ids, messages in zip(train["prompt"], train["input_ids"], train["messages"], strict=True):
        text = prompt.removeprefix("<bos>")
        assert text in texts and ids == tokenizer(text)["input_ids"]  # one BOS, the template's
        assert [message["role"] for message in json.loads(messages)] == ["system", "user"]
    samples = [json.loads(line) for line in (plan.output_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    assert all(
        sample["prompt"].startswith("<bos>") and sample["prompt"].removeprefix("<bos>") in texts for sample in samples
    )
    assert release.eval_metrics["num_prompts"] == 32
    # the template file goes with the released policy's tokenizer: final/ renders conversations as trained
    assert load_tokenizer(release.policy_dir).chat_template == TOY_TEMPLATE
    assert tokenizer.chat_template == TOY_TEMPLATE
