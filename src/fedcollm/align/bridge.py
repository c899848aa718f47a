"""A teacher's top-K distributions carried from its answer tokens onto a student's.

When teacher and student tokenise the same answer differently, each student answer token gets
the teacher's distribution at the teacher token aligned to it 1:1 (vocabulary mapped by MinED)
where the two tokens agree (the same string, or MinED maps one to the other: FuseLLM's soft
alignment), or a one-hot on its own token elsewhere (FedMKT, App. B).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcollm.align.normalize import TokenNormalizer
from fedcollm.align.sequence import align_topk_for_ids
from fedcollm.align.vocab import VocabMap, build_vocab_map


def needs_bridge(a: Any, b: Any) -> bool:
    """Whether two tokenizers may split texts differently, so logits need a `TokenBridge` to compare.

    Two tokenizers split every text alike only if they agree on the vocabulary *and* on the rules
    that turn text into ids: the normaliser, the pre-tokeniser and the model (BPE merges, unigram
    scores). The same vocabulary with other merges or another normaliser gives other answer ids.
    """
    if a is b:
        return False
    return a.get_vocab() != b.get_vocab() or _splitting_rules(a) != _splitting_rules(b)


def _splitting_rules(tokenizer: Any) -> tuple[Any, ...] | None:
    """The parts of a fast tokenizer's definition that decide which ids a text becomes.

    Post-processing (BOS/EOS templates) and decoding are left out: BOS is decided separately
    (`lm.loading.needs_bos`) and decoding does not change ids. None for a slow tokenizer, whose
    rules are not serialisable (then the vocabulary alone decides).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    definition = json.loads(backend.to_str())
    parts = ("normalizer", "pre_tokenizer", "model")
    return tuple(json.dumps(definition.get(part), sort_keys=True) for part in parts)


@dataclass(frozen=True)
class TokenBridge:
    """Maps top-K (id, logit) rows over `src` target tokens to rows over `dst` target tokens."""

    src_tok: Any
    dst_tok: Any
    vocab_map: VocabMap
    src_norm: TokenNormalizer
    dst_norm: TokenNormalizer

    @classmethod
    def build(cls, src_tok: Any, dst_tok: Any, cache_dir: Path | None = None) -> TokenBridge:
        """Build (or load from the cache) the vocabulary mapping between two tokenizers."""
        vocab_map = build_vocab_map(src_tok, dst_tok, cache_dir=cache_dir)
        return cls(
            src_tok,
            dst_tok,
            vocab_map,
            TokenNormalizer.from_tokenizer(src_tok),
            TokenNormalizer.from_tokenizer(dst_tok),
        )

    def reversed(self) -> TokenBridge:
        """The bridge in the other direction (no rebuild)."""
        return TokenBridge(
            self.dst_tok, self.src_tok, self.vocab_map.reversed(), self.dst_norm, self.src_norm
        )

    def transfer(
        self,
        src_tokens: Sequence[int],
        dst_tokens: Sequence[int],
        topk_ids: np.ndarray,
        topk_vals: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One text's top-K rows over its `src_tokens` carried onto its `dst_tokens`.

        `topk_ids`/`topk_vals` are [len(src_tokens), K] in the source vocabulary; the result is
        [len(dst_tokens), K] in the target's (ids -1 and logits -inf where a row is padded).
        """
        aligned = align_topk_for_ids(
            src_tokens,
            dst_tokens,
            self.src_tok,
            self.dst_tok,
            topk_ids,
            topk_vals,
            self.vocab_map,
            src_norm=self.src_norm,
            dst_norm=self.dst_norm,
        )
        return aligned.topk_ids, aligned.topk_vals
