"""The embedded model's tokenizer: one token per character, as a real `PreTrainedTokenizerFast`.

A BPE model with an empty merge list and no pre-tokenizer splits any string into characters, and
it round-trips through `save_pretrained` / `AutoTokenizer.from_pretrained` unchanged (a regex
`Split` pre-tokenizer did not: see DESIGN.md). Characters outside the alphabet map to `<unk>`.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>"]
ALPHABET = "0123456789+-*/=,() :>|" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + list(ALPHABET))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)
