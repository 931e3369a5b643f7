"""Inputs for a reward model with a tokenizer of its own (another family, another vocabulary or chat
template): each prompt + response is decoded from the policy's tokens and re-encoded with the
reward model's tokenizer, as OpenRLHF and verl do.

- A conversation (the prompt was a message list) is rendered with the reward tokenizer's chat
  template as the conversation plus an assistant turn holding the response, when it has a template.
- Anything else is plain text: the policy's prompt and response tokens decoded together (special
  tokens dropped) and encoded with the reward tokenizer's own special tokens (its BOS, say). A
  response that ended with the policy's stop token ends with the reward tokenizer's EOS, as reward
  models are commonly trained to read the score there.

The score is read at the last token of the re-encoded sequence. Whether a response is complete
(`missing_eos_penalty`) is still decided on the policy's tokens.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, Any]]


def conversations(rows) -> list[Messages | None] | None:
    """Each row's conversation from a prepared prompt split (its `messages` column: the JSON of the
    message list, null for a text prompt); None when the split has no such column."""
    if "messages" not in rows.column_names:
        return None
    return [None if text is None else json.loads(text) for text in rows["messages"]]


class RewardTextEncoder:
    def __init__(self, policy_tokenizer: PreTrainedTokenizerBase, reward_tokenizer: PreTrainedTokenizerBase):
        self.policy_tokenizer = policy_tokenizer
        self.reward_tokenizer = reward_tokenizer

    def encode(
        self, prompt_ids: list[int], response_ids: list[int], messages: Messages | None, complete: bool
    ) -> list[int]:
        """Reward-model token ids of one prompt + response, given as the policy's real token ids."""
        reward = self.reward_tokenizer
        if messages is not None and reward.chat_template:
            response = self.policy_tokenizer.decode(response_ids, skip_special_tokens=True)
            conversation = [*messages, {"role": "assistant", "content": response}]
            return list(reward.apply_chat_template(conversation, tokenize=True, return_dict=False))
        text = self.policy_tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=True)
        ids = list(reward(text, add_special_tokens=True)["input_ids"])
        if complete and reward.eos_token_id is not None and ids[-1:] != [reward.eos_token_id]:
            ids.append(reward.eos_token_id)
        return ids
