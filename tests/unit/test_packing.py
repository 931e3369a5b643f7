"""Token layouts: where each sequence's tokens go and where its outputs are read, by hand."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ppoflow.forwards import packing_supported, use_packing
from ppoflow.packing import choose_row_tokens, packed_layout, padded_layout

# Row 0: prompt [5, 6] (one left pad), response [10, 2] then pad. Row 1: prompt [7, 8, 9], response [11, 12, 2].
QUERIES = torch.tensor([[0, 5, 6], [7, 8, 9]])
QUERY_MASK = torch.tensor([[False, True, True], [True, True, True]])
RESPONSES = torch.tensor([[10, 2, 0], [11, 12, 2]])
RESPONSE_MASK = torch.tensor([[True, True, False], [True, True, True]])


def test_packed_layout_in_one_row_by_hand():
    layout = packed_layout(QUERIES, QUERY_MASK, RESPONSES, RESPONSE_MASK, pad_token_id=0, row_tokens=10)
    # Longest first: row 1's 6 tokens at 0..5, row 0's 4 tokens at 6..9; positions restart per sequence.
    assert layout.input_ids.tolist() == [[7, 8, 9, 11, 12, 2, 5, 6, 10, 2]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    assert layout.attention_mask is None
    # The state before each real response token, in response_mask order (row 0's two, then row 1's three).
    assert layout.before.tolist() == [7, 8, 2, 3, 4]
    assert layout.last.tolist() == [9, 5]


def test_packed_filler_is_a_sequence_of_its_own():
    layout = packed_layout(QUERIES, QUERY_MASK, RESPONSES, RESPONSE_MASK, pad_token_id=0, row_tokens=13)
    assert layout.input_ids.tolist() == [[7, 8, 9, 11, 12, 2, 5, 6, 10, 2, 0, 0, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2]]


def test_packed_layout_with_chosen_rows_by_hand():
    # Rows of 6 (two rows, 12 cells) beat one row of 12 (same cells, more attention per token).
    layout = packed_layout(QUERIES, QUERY_MASK, RESPONSES, RESPONSE_MASK, pad_token_id=0)
    assert layout.input_ids.tolist() == [[7, 8, 9, 11, 12, 2], [5, 6, 10, 2, 0, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1]]
    assert layout.before.tolist() == [7, 8, 2, 3, 4]
    assert layout.last.tolist() == [9, 5]


def test_padded_layout_by_hand():
    layout = padded_layout(QUERIES, QUERY_MASK, RESPONSES, RESPONSE_MASK)
    assert layout.input_ids.tolist() == [[0, 5, 6, 10, 2, 0], [7, 8, 9, 11, 12, 2]]
    assert layout.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert layout.position_ids.tolist() == [[0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 5]]
    assert layout.before.tolist() == [2, 3, 8, 9, 10]
    assert layout.last.tolist() == [4, 11]


def test_padded_layout_trims_all_padding_columns():
    queries = torch.tensor([[0, 0, 5], [0, 7, 8]])
    query_mask = queries != 0
    responses = torch.tensor([[9, 0, 0, 0], [10, 11, 0, 0]])
    response_mask = responses != 0
    layout = padded_layout(queries, query_mask, responses, response_mask)
    assert layout.input_ids.tolist() == [[0, 5, 9, 0], [7, 8, 10, 11]]
    assert layout.response_mask.shape == (2, 4)  # the caller's width: values unflatten back to it


def test_unflatten_puts_values_back_and_zeroes_padding():
    layout = padded_layout(QUERIES, QUERY_MASK, RESPONSES, RESPONSE_MASK)
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    out = layout.unflatten(flat)
    assert out.tolist() == [[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]]
    (out * torch.arange(6.0).view(2, 3)).sum().backward()
    assert flat.grad.tolist() == [0.0, 1.0, 3.0, 4.0, 5.0]
    vectors = layout.unflatten(torch.arange(10.0).view(5, 2))
    assert vectors.shape == (2, 3, 2) and vectors[0, 2].tolist() == [0.0, 0.0] and vectors[1, 0].tolist() == [4.0, 5.0]


def test_choose_row_tokens_by_hand():
    # Longest 4. Rows of 4: [4] [3] [3] [2] = 16 cells; rows of 8: [4 3] [3 2] = 16 cells;
    # one row of 12: [4 3 3 2] = 12 cells, the least work even with 12/1024 more attention per token.
    capacity, (row_of, offset_of, used) = choose_row_tokens([4, 3, 3, 2])
    assert capacity == 12
    assert row_of == [0, 0, 0, 0] and offset_of == [0, 4, 7, 10] and used == [12]
    # Equal lengths: narrow rows (one each) cost the same cells with less attention.
    capacity, (_, _, used) = choose_row_tokens([5, 5, 5, 5])
    assert capacity == 5 and used == [5, 5, 5, 5]


class _LeakyDecoder(nn.Module):
    """Ignores positions and masks: each state sums every earlier embedding of its row."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=50)
        self.embed = nn.Embedding(50, 4)

    def get_decoder(self):
        return self

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids).cumsum(1))


def test_packing_self_check_rejects_a_model_that_ignores_positions():
    torch.manual_seed(0)
    assert packing_supported(_LeakyDecoder(), pad_token_id=0) is False


class _OneRowPackingDecoder(_LeakyDecoder):
    """Honours packed position ids only in a one-row batch, as transformers' flash-attention path
    does: a position-0 token starts a new sequence there; with several rows it mixes them."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        embedded = self.embed(input_ids)
        if attention_mask is not None:  # padded rows: attend to real tokens only
            embedded = embedded * attention_mask[..., None]
            return SimpleNamespace(last_hidden_state=embedded.cumsum(1))
        if input_ids.shape[0] > 1:
            return SimpleNamespace(last_hidden_state=embedded.cumsum(1))
        starts = (position_ids == 0).long().cumsum(1)  # which sequence each token belongs to
        states = torch.stack(
            [
                (embedded * (starts[..., None] == starts[:, t, None, None]))[:, : t + 1].sum(1)
                for t in range(input_ids.shape[1])
            ],
            dim=1,
        )
        return SimpleNamespace(last_hidden_state=states)


def test_packing_self_check_catches_packing_that_holds_in_one_row_only():
    torch.manual_seed(0)
    decoder = _OneRowPackingDecoder()
    # in one row it does separate sequences (the check would pass with one row)...
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    alone = decoder(ids[:, 3:], position_ids=torch.tensor([[0, 1]])).last_hidden_state
    packed = decoder(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1]])).last_hidden_state[:, 3:]
    assert torch.allclose(alone, packed)
    # ...but the self-check packs several rows
    assert packing_supported(decoder, pad_token_id=0) is False


def test_a_model_that_fails_the_check_turns_packing_off_with_a_warning_naming_it(caplog):
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="ppoflow.models"):
        assert use_packing(True, {"policy": None, "value": _LeakyDecoder()}, pad_token_id=0) is False
    assert "models.value: _LeakyDecoder ignores packed position ids" in caplog.text
    assert use_packing(False, {"value": _LeakyDecoder()}, pad_token_id=0) is False
