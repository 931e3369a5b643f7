"""A word-level tokenizer over the toy world's closed vocabulary, as a Hugging Face fast tokenizer.

Special tokens take the first ids: pad=0, bos=1, eos=2, unk=3 (pad != eos, so padding never looks
like a finished response). `encode` prepends BOS and never appends EOS, so an encoded prompt is
ready for generation and the model itself must learn to emit EOS. Words are split on whitespace and
punctuation and decoded joined by single spaces ("great movie , awful plot").
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ppoflow.toy.world import vocabulary

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer: special tokens first, then the world's vocabulary in sorted order."""
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *vocabulary()))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
