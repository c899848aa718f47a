"""Token alignment between different tokenizers (FedMKT): MinED vocabulary maps, DTW
sequence alignment and top-K logit transfer."""

from fedcollm.align.bridge import TokenBridge, needs_bridge
from fedcollm.align.normalize import WORD_START, TokenNormalizer, normalize_vocab
from fedcollm.align.search import brute_force_map, nearest_indices
from fedcollm.align.sequence import (
    AlignedTopK,
    agreeing_matches,
    align_positions,
    align_topk_for_ids,
    align_topk_for_text,
    dtw_path,
    map_topk,
)
from fedcollm.align.vocab import ALGO_VERSION, VocabMap, build_vocab_map, default_cache_dir

__all__ = [
    "ALGO_VERSION",
    "WORD_START",
    "AlignedTopK",
    "TokenBridge",
    "TokenNormalizer",
    "VocabMap",
    "agreeing_matches",
    "align_positions",
    "align_topk_for_ids",
    "align_topk_for_text",
    "brute_force_map",
    "build_vocab_map",
    "default_cache_dir",
    "dtw_path",
    "map_topk",
    "nearest_indices",
    "needs_bridge",
    "normalize_vocab",
]
