"""Stage 3 on conversations (TRL's conversational formats): rendering with the chat template, golden
token ids worked out by hand, the `messages` column, and every refusal in one line naming its field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ppoflow.data import load_prompts
from ppoflow.errors import ConfigError, DataError
from ppoflow.manifests import DatasetManifest
from tests.unit.test_data import BOS, EOS, PAD, UNK, VOCAB, prepare, write_jsonl

MARKERS = ("<system>", "<user>", "<assistant>", "<end>")
CHAT_VOCAB = {**VOCAB, **{marker: len(VOCAB) + index for index, marker in enumerate(MARKERS)}}
# <pad> 0, <bos> 1, <eos> 2, <unk> 3, the 4, cat 5, sat 6, on 7, mat 8, a 9, dog 10, ran 11, hello 12, world 13,
# one 14, two 15, three 16, four 17, five 18, <system> 19, <user> 20, <assistant> 21, <end> 22

# Writes BOS itself, as most templates do; the generation prompt opens the assistant's turn.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
PLAIN_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }} {% endfor %}"
EOS_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}<eos>"  # no generation prompt


def make_chat_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Word-level like test_data's, adding BOS to text (so a second BOS would show), with the role
    markers as special tokens."""
    backend = Tokenizer(models.WordLevel(vocab=CHAT_VOCAB, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, CHAT_VOCAB[BOS])])
    backend.add_special_tokens([AddedToken(marker, special=True) for marker in MARKERS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict:
    return {"role": "system", "content": content}


def write_rows(tmp: Path, rows: list[dict]) -> Path:
    return write_jsonl(tmp / "conversations.jsonl", rows)


def prepare_chat(
    tmp: Path, rows: list[dict], tokenizer_template: str | None = TEMPLATE, out: str = "out", **fields
) -> DatasetManifest:
    """Stage 3 on `rows` with the chat tokenizer (its template: `tokenizer_template`); `fields` are DataConfig's."""
    fields = {"eval_size": 0, "max_prompt_length": 32, **fields}
    return prepare(write_rows(tmp, rows), tmp / out, tokenizer=make_chat_tokenizer(tokenizer_template), **fields)


def stored(manifest: DatasetManifest) -> dict[str, tuple[list[int], list | None]]:
    """Each stored prompt text: its token ids and its conversation."""
    rows = {}
    for split in (manifest.train_dir, manifest.eval_dir):
        table = load_prompts(split)
        for prompt, ids, messages in zip(table["prompt"], table["input_ids"], table["messages"], strict=True):
            rows[prompt] = (ids, None if messages is None else json.loads(messages))
    return rows


def test_a_conversation_is_rendered_with_the_generation_prompt_and_one_bos(tmp_path):
    manifest = prepare_chat(tmp_path, [{"prompt": [user("the cat")]}, {"prompt": [user("hello world")]}])

    rows = stored(manifest)
    # <bos> <user> the cat <end> <assistant>: the template's BOS, none added by the tokenizer.
    assert rows["<bos><user> the cat <end> <assistant> "] == ([1, 20, 4, 5, 22, 21], [user("the cat")])
    assert rows["<bos><user> hello world <end> <assistant> "] == ([1, 20, 12, 13, 22, 21], [user("hello world")])
    assert (manifest.rows_read, manifest.rows_kept) == (2, 2)
    by_transformers = make_chat_tokenizer(TEMPLATE).apply_chat_template(
        [user("the cat")], add_generation_prompt=True, return_dict=False
    )
    assert by_transformers == [1, 20, 4, 5, 22, 21]  # what apply_chat_template(tokenize=True) gives


def test_the_system_turn_is_rendered_before_the_user_turn(tmp_path):
    conversation = [system("one two"), user("hello world")]
    manifest = prepare_chat(tmp_path, [{"prompt": conversation}] * 2)

    ((prompt, (token_ids, messages)),) = stored(manifest).items()
    assert prompt == "<bos><system> one two <end> <user> hello world <end> <assistant> "
    assert token_ids == [1, 19, 14, 15, 22, 20, 12, 13, 22, 21]
    assert messages == conversation


@pytest.mark.parametrize("prompt_column", ["prompt", "messages"], ids=["default column", "named"])
def test_the_messages_column_loses_its_final_assistant_turn(tmp_path, prompt_column):
    long_conversation = [system("one"), user("hello"), assistant("world"), user("two"), assistant("three")]
    rows = [
        {"messages": [user("the cat"), assistant("a dog")]},
        {"messages": long_conversation},
        {"messages": [user("sat on mat")]},  # no completion: the prompt as it is
    ]
    manifest = prepare_chat(tmp_path, rows, prompt_column=prompt_column)

    assert stored(manifest) == {
        "<bos><user> the cat <end> <assistant> ": ([1, 20, 4, 5, 22, 21], [user("the cat")]),
        "<bos><system> one <end> <user> hello <end> <assistant> world <end> <user> two <end> <assistant> ": (
            [1, 19, 14, 22, 20, 12, 22, 21, 13, 22, 20, 15, 22, 21],
            long_conversation[:-1],
        ),
        "<bos><user> sat on mat <end> <assistant> ": ([1, 20, 6, 7, 8, 22, 21], [user("sat on mat")]),
    }


def test_a_template_file_replaces_the_tokenizers(tmp_path):
    rows = [{"prompt": [user("the cat")]}, {"prompt": [user("a dog")]}]
    (tmp_path / "chat.jinja").write_text(TEMPLATE)

    by_tokenizer = prepare_chat(tmp_path, rows, tokenizer_template=PLAIN_TEMPLATE, out="auto")
    by_file = prepare_chat(
        tmp_path, rows, tokenizer_template=PLAIN_TEMPLATE, out="file", chat_template=str(tmp_path / "chat.jinja")
    )

    assert stored(by_tokenizer)["<bos>the cat "][0] == [1, 4, 5]
    assert stored(by_file)["<bos><user> the cat <end> <assistant> "][0] == [1, 20, 4, 5, 22, 21]
    assert by_file.chat_template_path == (tmp_path / "chat.jinja").resolve() and by_tokenizer.chat_template_path is None


def test_fingerprint_follows_the_template_and_an_edited_template_file_is_noticed(tmp_path):
    rows = [{"prompt": [user("the cat")]}, {"prompt": [user("a dog")]}]
    template_file = tmp_path / "chat.jinja"
    template_file.write_text(TEMPLATE)

    plain = prepare_chat(tmp_path, rows, tokenizer_template=PLAIN_TEMPLATE, out="plain")
    marked = prepare_chat(tmp_path, rows, tokenizer_template=TEMPLATE, out="marked")
    assert plain.fingerprint != marked.fingerprint  # same vocabulary and special tokens: only the template differs

    from_file = prepare_chat(tmp_path, rows, tokenizer_template=None, out="file", chat_template=str(template_file))
    assert from_file.is_intact()
    template_file.write_text(TEMPLATE.replace("<end> ", ""))
    assert not from_file.is_intact()
    edited = prepare_chat(tmp_path, rows, tokenizer_template=None, out="edited", chat_template=str(template_file))
    assert edited.fingerprint != from_file.fingerprint


def test_text_prompts_ignore_the_template_setting(tmp_path):
    rows = [{"prompt": "the cat"}, {"prompt": "hello world"}]
    (tmp_path / "chat.jinja").write_text(TEMPLATE)

    auto = prepare_chat(tmp_path, rows, out="auto")
    for out, setting in (("none", "none"), ("file", str(tmp_path / "chat.jinja"))):
        other = prepare_chat(tmp_path, rows, out=out, chat_template=setting)
        assert (other.train_digest, other.chat_template_path) == (auto.train_digest, None)
    assert stored(auto) == {"the cat": ([1, 4, 5], None), "hello world": ([1, 12, 13], None)}


def test_length_filter_and_blank_conversations_are_counted(tmp_path):
    rows = [
        {"prompt": [user("the cat")]},  # 6 tokens: kept
        {"prompt": [user("the cat sat")]},  # 7 tokens with the template's: too long
        {"prompt": [user("  ")]},  # blank
        {"prompt": [system(""), user(" \t")]},  # every turn blank
    ]
    manifest = prepare_chat(tmp_path, rows, max_prompt_length=6)

    assert (manifest.rows_kept, manifest.dropped_too_long, manifest.dropped_empty) == (1, 1, 2)
    assert list(stored(manifest).values()) == [([1, 20, 4, 5, 22, 21], [user("the cat")])]


def test_a_template_ending_with_eos_has_it_stripped_or_the_prompt_dropped(tmp_path):
    rows = [{"prompt": [user("the cat")]}, {"prompt": [user("a dog")]}]

    stripped = prepare_chat(tmp_path, rows, tokenizer_template=EOS_TEMPLATE, out="strip")
    assert stripped.eos_stripped == 2
    assert stored(stripped)["the cat "][0] == [4, 5]  # no BOS: this template writes none
    with pytest.raises(ConfigError, match="data.eos_prompts"):
        prepare_chat(tmp_path, rows, tokenizer_template=EOS_TEMPLATE, out="drop", eos_prompts="drop")


RAISES_ON_A_DOG = (
    "{% for m in messages %}{% if m['content'] == 'a dog' %}{{ raise_exception('no dogs') }}{% endif %}"
    "{{ m['content'] }}{% endfor %}"
)

CHAT_ERRORS = {
    "no template in the tokenizer": (
        [{"prompt": [user("the cat")]}],
        None,
        {},
        ConfigError,
        "data.chat_template",
        "no chat template",
    ),
    "template none": (
        [{"prompt": [user("the cat")]}],
        TEMPLATE,
        {"chat_template": "none"},
        ConfigError,
        "data.chat_template",
        "is none",
    ),
    "template file gone": (
        [{"prompt": [user("the cat")]}],
        None,
        {"chat_template": "/no/such.jinja"},
        ConfigError,
        "data.chat_template",
        "cannot read",
    ),
    "template not jinja": (
        [{"prompt": [user("the cat")]}],
        "{% for %}",
        {},
        ConfigError,
        "data.chat_template",
        "row 0",
    ),
    "template refuses a row": (
        [{"prompt": [user("the cat")]}, {"prompt": [user("a dog")]}],
        RAISES_ON_A_DOG,
        {},
        ConfigError,
        "data.chat_template",
        "row 1 (TemplateError: no dogs)",
    ),
    "text and conversations mixed": (
        [{"prompt": "the cat"}, {"prompt": [user("a dog")]}],
        TEMPLATE,
        {},
        DataError,
        "data.prompt_column",
        "row 1",
    ),
    "null among conversations": (
        [{"prompt": [user("the cat")]}, {"prompt": [user("a dog")]}, {"prompt": None}],
        TEMPLATE,
        {},
        DataError,
        "data.prompt_column",
        "row 2",
    ),
    "empty conversation": (
        [{"prompt": [user("the cat")]}, {"prompt": []}],
        TEMPLATE,
        {},
        DataError,
        "data.prompt_column",
        "row 1 of column 'prompt' is an empty conversation",
    ),
    "messages that are strings": (
        [{"prompt": ["the cat", "a dog"]}],
        TEMPLATE,
        {},
        DataError,
        "data.prompt_column",
        "message 0 is str",
    ),
    "message without content": (
        [{"prompt": [{"role": "user"}]}],
        TEMPLATE,
        {},
        DataError,
        "data.prompt_column",
        "message 0",
    ),
    "content that is not text": (
        [{"prompt": [user("the cat")]}, {"prompt": [{"role": "user", "content": 3}]}],
        TEMPLATE,
        {},
        DataError,
        "data.prompt_column",
        "row 1",
    ),
    "only an assistant turn": (
        [{"messages": [assistant("a dog")]}],
        TEMPLATE,
        {},
        DataError,
        "data.prompt_column",
        "only an assistant turn",
    ),
    "ends with the system turn": (
        [{"prompt": [system("one"), user("two"), system("three")]}],
        TEMPLATE,
        {},
        DataError,
        "data.prompt_column",
        "ends with a turn of role 'system'",
    ),
    "prompt ends with the reply": (
        [{"prompt": [user("the cat"), assistant("a dog")]}],
        TEMPLATE,
        {},
        DataError,
        "data.prompt_column",
        "belongs in a 'messages' column",
    ),
    "neither column": (
        [{"conversation": [user("the cat")]}],
        TEMPLATE,
        {},
        ConfigError,
        "data.prompt_column",
        "'messages' column is used",
    ),
}


@pytest.mark.parametrize("case", CHAT_ERRORS.values(), ids=CHAT_ERRORS.keys())
def test_bad_conversations_fail_in_one_line_naming_the_field_and_write_nothing(tmp_path, case):
    rows, tokenizer_template, fields, error, field, detail = case

    with pytest.raises(error) as raised:
        prepare_chat(tmp_path, rows, tokenizer_template, out="work/prompts", **fields)

    message = str(raised.value)
    assert field in message and detail in message, message
    assert "\n" not in message
    assert not (tmp_path / "work").exists()
