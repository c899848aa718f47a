"""Token-string normalisation shared by vocabulary mapping and sequence alignment.

Different tokenizer families spell the same text differently: byte-level BPE (GPT-2, SmolLM2,
GPT-NeoX, dolma2) stores the bytes of a token through a printable byte alphabet (``Ġ`` is a
space, ``Ċ`` a newline), while SentencePiece vocabularies (Gemma, Llama) store text with ``▁``
as the word-start marker and ``<0xNN>`` byte-fallback pieces. To compare tokens across families
we map every token to one canonical string:

* byte-level pieces are decoded to their bytes, then to text with ``surrogateescape`` so that a
  piece holding an incomplete UTF-8 sequence keeps one code point per stray byte
  (``U+DC80``-``U+DCFF``), identical for both families;
* ``<0xNN>`` byte-fallback pieces become the same single byte/character;
* every space becomes the canonical word-start marker ``▁`` (U+2581);
* added tokens (specials such as ``<|im_end|>`` or ``<bos>``) keep their literal content.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

WORD_START = "▁"
"""Canonical word-start marker: both ``Ġ`` (byte-level space) and ``▁`` map to it."""

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` table: printable character -> raw byte value."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _bytes_to_text(raw: bytes) -> str:
    """Decode bytes as UTF-8, keeping stray bytes as lone surrogates (lossless and canonical)."""
    return raw.decode("utf-8", "surrogateescape")


def _backend_flags(tokenizer: Any) -> tuple[bool, bool]:
    """Detect (byte_level, byte_fallback) from a transformers tokenizer's backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # slow (pure Python) tokenizers
        return hasattr(tokenizer, "byte_decoder"), True
    described = f"{backend.decoder!r} {backend.pre_tokenizer!r}"
    byte_level = "ByteLevel" in described
    byte_fallback = bool(getattr(backend.model, "byte_fallback", False)) or ("ByteFallback" in described)
    return byte_level, byte_fallback


@dataclass(frozen=True)
class TokenNormalizer:
    """Maps a tokenizer's token pieces to canonical strings (see module docstring)."""

    byte_level: bool
    byte_fallback: bool
    added_ids: frozenset[int]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenNormalizer:
        """Inspect a transformers tokenizer (fast or slow) and build its normaliser."""
        byte_level, byte_fallback = _backend_flags(tokenizer)
        added = frozenset(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
        return cls(byte_level=byte_level, byte_fallback=byte_fallback, added_ids=added)

    def normalize(self, token: str, token_id: int = -1) -> str:
        """Canonical form of one token piece; ``token_id`` tells whether it is an added token."""
        if token_id in self.added_ids:
            text = token
        elif self.byte_level:
            table = byte_decoder()
            if all(ch in table for ch in token):
                text = _bytes_to_text(bytes(table[ch] for ch in token))
            else:
                text = token
        elif self.byte_fallback and (m := _BYTE_FALLBACK.fullmatch(token)):
            text = _bytes_to_text(bytes([int(m.group(1), 16)]))
        else:
            text = token
        return text.replace(" ", WORD_START)

    def normalize_ids(self, tokenizer: Any, ids: Iterable[int]) -> list[str]:
        """Canonical strings of the given token ids of ``tokenizer``."""
        id_list = [int(i) for i in ids]
        pieces: Sequence[str | None] = tokenizer.convert_ids_to_tokens(id_list)
        return [self.normalize(p or "", i) for p, i in zip(pieces, id_list, strict=True)]


def normalize_vocab(tokenizer: Any) -> list[str]:
    """Canonical string of every id in ``range(len(tokenizer))`` (added tokens included)."""
    norm = TokenNormalizer.from_tokenizer(tokenizer)
    return norm.normalize_ids(tokenizer, range(len(tokenizer)))
