"""An offline CLIP tokenizer: byte-level vocabulary, no merges.

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

from transformers import CLIPTokenizer

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
