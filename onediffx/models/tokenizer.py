"""Offline CLIP and T5 tokenizers: character-level vocabularies, no merges.

Real CLIP vocabularies come from the Hub, which tests and synthetic benchmarks cannot reach. A
byte-level vocabulary with no BPE merges is still a genuine ``CLIPTokenizer`` (same class, same
padding and truncation to 77 tokens), so pipelines run their real text path. Token ids stay below
any CLIP text encoder's ``vocab_size``, so the same files serve tiny and full-size encoders.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from tempfile import mkdtemp
from typing import TYPE_CHECKING

from transformers import CLIPTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, which CLIP's BPE works on."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


@lru_cache(maxsize=1)
def tokenizer_files() -> tuple[str, str]:
    """Write vocab.json / merges.txt once per process and return their paths."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    folder = Path(mkdtemp(prefix="onediffx-tok-"))
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges.write_text("#version: 0.2\n", encoding="utf-8")
    return str(vocab), str(merges)


def offline_clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """A CLIP tokenizer built without the network (SDXL's second tokenizer pads with '!')."""
    vocab, merges = tokenizer_files()
    return CLIPTokenizer(vocab, merges, pad_token=pad_token, model_max_length=77)


T5_PAD, T5_EOS, T5_UNK, SPACE = "<pad>", "</s>", "<unk>", "▁"


def _t5_pieces() -> list[tuple[str, float]]:
    """T5's layout (pad 0, eos 1, unk 2) then single characters, each also as a word start.

    Word-start pieces score higher than bare characters, so a word becomes its start piece and
    then one piece per character, as SentencePiece's Unigram would split it with no merges learned.
    """
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    return ([(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (SPACE, -2.0)]
            + [(SPACE + c, -3.0) for c in chars] + [(c, -4.0) for c in chars])


def offline_t5_tokenizer(model_max_length: int = 512) -> "PreTrainedTokenizerBase":
    """A T5 tokenizer (FLUX's ``tokenizer_2``, SD3's ``tokenizer_3``) built without the network.

    Real T5 vocabularies are SentencePiece files from the Hub. This one is the same fast class over
    a Unigram model of single characters (192 ids, below any T5 encoder's ``vocab_size``): padding,
    truncation to ``max_sequence_length`` and the closing ``</s>`` behave as the real one's do.
    """
    import inspect

    from transformers import T5TokenizerFast

    if "vocab" in inspect.signature(T5TokenizerFast.__init__).parameters:  # transformers 5: a Unigram vocab list
        return T5TokenizerFast(vocab=_t5_pieces(), extra_ids=0, model_max_length=model_max_length)
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram(_t5_pieces(), unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE)
    tok.decoder = decoders.Metaspace(replacement=SPACE)
    tok.post_processor = processors.TemplateProcessing(single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS],
                                                       special_tokens=[(T5_EOS, 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token=T5_EOS, unk_token=T5_UNK, pad_token=T5_PAD, extra_ids=0,
                           model_max_length=model_max_length)
