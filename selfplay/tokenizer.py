"""The embedded model's tokenizer: one token per number 0..1000, one per other character.

A real `PreTrainedTokenizerFast` over a BPE model with no pre-tokenizer: the base vocabulary is
single characters, and merges build every number up to `MAX_NUMBER` from each of its
(prefix, suffix) splits, so a digit run becomes one token whatever order the merges fire in.
Numbers as tokens make "copy each number once" a single-token copy, which the tiny model learns
in minutes (it did not with digit-level numbers). It round-trips through `save_pretrained` /
`AutoTokenizer.from_pretrained` unchanged (a regex `Split` pre-tokenizer did not: DESIGN.md).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>"]
ALPHABET = "0123456789+-*/=,() :>|" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_NUMBER = 1000


def build_tokenizer() -> PreTrainedTokenizerFast:
    numbers = [str(n) for n in range(10, MAX_NUMBER + 1)]
    vocab = {t: i for i, t in enumerate(SPECIALS + list(ALPHABET) + numbers)}
    merges = [(n[:k], n[k:]) for n in numbers for k in range(1, len(n))
              if n[:k] in vocab and n[k:] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)


def load_tokenizer(path):
    """The tokenizer of a model directory.

    transformers 5's AutoTokenizer resolves any `model_type: qwen2` directory to Qwen2Tokenizer,
    which replaces the saved pre-tokenizer (byte-level, one digit per token) and silently
    mis-tokenises the embedded base. The embedded base (marked by bootstrap.json) is therefore
    loaded as the plain fast tokenizer it was saved as; every other model goes through AutoTokenizer.
    """
    from pathlib import Path

    from transformers import AutoTokenizer

    if (Path(path) / "bootstrap.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
