"""Re-encoding prompt + response for a reward model with its own tokenizer, with golden token ids.

The policy side is the toy tokenizer (pad 0, bos 1, eos 2, unk 3; "," 4, "." 5; words in sorted
order); the reward side is the same vocabulary with every id mapped to (7 * id + 3) mod 176."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ppoflow.reward_inputs import RewardTextEncoder
from ppoflow.toy.tokenizer import build_tokenizer
from tests.foreign_reward import permute_tokenizer

TEMPLATE = "{% for m in messages %}{{ m['content'] }} . {% endfor %}"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    build_tokenizer().save_pretrained(root / "policy")
    permute_tokenizer(root / "policy", root / "plain")
    permute_tokenizer(root / "policy", root / "chat", chat_template=TEMPLATE)
    return {name: AutoTokenizer.from_pretrained(root / name) for name in ("policy", "plain", "chat")}


def test_plain_text_is_decoded_and_re_encoded_with_the_reward_tokenizer(tokenizers):
    policy = tokenizers["policy"]
    great, plot = policy.convert_tokens_to_ids(["great", "plot"])
    encoder = RewardTextEncoder(policy, tokenizers["plain"])
    # policy ids: <bos> great , | plot . <eos>  ->  reward ids: each (7 * id + 3) % 176, its own BOS first;
    # the policy's EOS is dropped as a special token and, the response being complete, the reward EOS
    # (7 * 2 + 3 = 17) closes the sequence
    ids = encoder.encode([1, great, 4], [plot, 5, 2], None, complete=True)
    assert ids == [10, (7 * great + 3) % 176, 31, (7 * plot + 3) % 176, 38, 17]
    # an incomplete response gets no EOS
    assert encoder.encode([1, great, 4], [plot, 5], None, complete=False) == ids[:-1]


def test_a_conversation_is_rendered_with_the_reward_chat_template_as_a_user_and_an_assistant_turn(tokenizers):
    policy = tokenizers["policy"]
    great, plot = policy.convert_tokens_to_ids(["great", "plot"])
    encoder = RewardTextEncoder(policy, tokenizers["chat"])
    messages = [{"role": "user", "content": "great"}]
    # the template renders "great . plot . " (its own punctuation; no BOS, no EOS added by us)
    ids = encoder.encode([1, great], [plot, 2], messages, complete=True)
    assert ids == [(7 * great + 3) % 176, 38, (7 * plot + 3) % 176, 38]
    # a text prompt with a chat-template reward model stays plain text
    assert encoder.encode([1, great], [plot, 2], None, complete=True) == [
        10,
        (7 * great + 3) % 176,
        (7 * plot + 3) % 176,
        17,
    ]
