"""Sequence alignment and top-K logit mapping between two tokenizations of one text (FedMKT).

FedMKT (App. B), following FuseLLM, tokenises the same text with both models' tokenizers,
aligns the two token sequences by dynamic programming (DTW whose local cost is the Levenshtein
distance between normalised token strings) and, for every *target* position matched 1:1 to a
source position, carries the source's top-K (token id, logit) pairs over through the MinED
vocabulary map -- but only where the two matched tokens agree: the same normalised string, or
the vocabulary map sends the source token to the target one (FuseLLM's `transform_step_logits`,
"soft" vocabulary alignment, which FedMKT's reference uses). DTW pairs different strings too
(`['▁Par', 'is']` against `['▁Pa', 'ris']` pairs `is` with `ris`); the source's distribution
there predicts another token than the target's own, so such a pair, like every other target
position (1:many, many:1, unmatched), gets a one-hot on its own token. Output rows are sparse
distributions of width K for a sparse softmax.

Complexity: ``O(Ls * Ld)`` time and memory for the DTW (one int32 cost matrix from RapidFuzz's
C++ ``cdist`` plus one int8 back-pointer matrix, i.e. ~5 bytes per cell: ~125 MB for
5,000 x 5,000), computed with ``Ls + Ld`` vectorised anti-diagonal numpy steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from fedcollm.align.normalize import TokenNormalizer
from fedcollm.align.vocab import VocabMap

_INF = np.int32(2**30)


def dtw_path(src_tokens: Sequence[str], dst_tokens: Sequence[str]) -> np.ndarray:
    """DTW alignment path as int64 ``[P, 2]`` (source index, target index) pairs, in order.

    Local cost is the Levenshtein distance of the two token strings. Every index of both
    sequences occurs in the path (DTW is total); ties prefer the diagonal step, so identical
    sequences align as the identity. Empty input gives an empty path.
    """
    n, m = len(src_tokens), len(dst_tokens)
    if n == 0 or m == 0:
        return np.zeros((0, 2), dtype=np.int64)
    cost = cdist(list(src_tokens), list(dst_tokens), scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    back = np.zeros((n, m), dtype=np.int8)  # 0 diagonal, 1 up (i-1), 2 left (j-1)
    # Padded DP: D[i][j] for i in 0..n, j in 0..m, kept as the last two anti-diagonals indexed
    # by i. D[0][0] = 0 and the rest of row/column 0 is infinite.
    prev2 = np.full(n + 1, _INF, dtype=np.int32)
    prev2[0] = 0  # diagonal s = 0
    prev1 = np.full(n + 1, _INF, dtype=np.int32)  # diagonal s = 1: only border cells
    for s in range(2, n + m + 1):
        lo, hi = max(1, s - m), min(n, s - 1)
        cur = np.full(n + 1, _INF, dtype=np.int32)
        ii = np.arange(lo, hi + 1)
        steps = np.stack([prev2[lo - 1 : hi], prev1[lo - 1 : hi], prev1[lo : hi + 1]])
        choice = steps.argmin(axis=0)  # first minimum: diagonal, then up, then left
        best = steps[choice, np.arange(ii.size)]
        cur[lo : hi + 1] = best + cost[ii - 1, s - ii - 1]
        back[ii - 1, s - ii - 1] = choice
        prev2, prev1 = prev1, cur
    path: list[tuple[int, int]] = []
    i, j = n - 1, m - 1
    while True:
        path.append((i, j))
        if i == 0 and j == 0:
            break
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            step = back[i, j]
            if step == 0:
                i, j = i - 1, j - 1
            elif step == 1:
                i -= 1
            else:
                j -= 1
    return np.array(path[::-1], dtype=np.int64)


def align_positions(src_tokens: Sequence[str], dst_tokens: Sequence[str]) -> np.ndarray:
    """For every target position, the source position it is matched to 1:1, else -1.

    Returns int64 ``[len(dst_tokens)]``. A pair (i, j) of the DTW path is 1:1 when neither i
    nor j occurs in any other pair.
    """
    match = np.full(len(dst_tokens), -1, dtype=np.int64)
    path = dtw_path(src_tokens, dst_tokens)
    if path.size == 0:
        return match
    src_count = np.bincount(path[:, 0], minlength=len(src_tokens))
    dst_count = np.bincount(path[:, 1], minlength=len(dst_tokens))
    one = (src_count[path[:, 0]] == 1) & (dst_count[path[:, 1]] == 1)
    match[path[one, 1]] = path[one, 0]
    return match


def agreeing_matches(
    match: np.ndarray,
    src_input_ids: np.ndarray,
    dst_input_ids: np.ndarray,
    src_tokens: Sequence[str],
    dst_tokens: Sequence[str],
    vocab_map: VocabMap,
) -> np.ndarray:
    """The 1:1 matches whose two tokens agree, -1 elsewhere (int64 ``[Ld]``).

    A matched pair (i, j) agrees when the normalised strings are equal or the vocabulary map
    sends source token ``src_input_ids[i]`` to target token ``dst_input_ids[j]`` -- FuseLLM's
    test before it carries a distribution over (`transform_step_logits`, soft alignment).
    """
    match = np.asarray(match, dtype=np.int64)
    out = np.full_like(match, -1)
    table = vocab_map.src_to_dst
    for j in np.flatnonzero(match >= 0).tolist():
        i = int(match[j])
        src_id = int(src_input_ids[i])
        same_string = src_tokens[i] == dst_tokens[j]
        mapped = 0 <= src_id < table.shape[0] and int(table[src_id]) == int(dst_input_ids[j])
        if same_string or mapped:
            out[j] = i
    return out


def map_topk(
    src_ids: np.ndarray,
    src_vals: np.ndarray,
    match: np.ndarray,
    dst_ids_of_text: np.ndarray,
    vocab_map: VocabMap,
) -> tuple[np.ndarray, np.ndarray]:
    """Carry source top-K logits to target positions; one-hot elsewhere.

    ``src_ids``/``src_vals``: ``[Ls, K]`` top-K ids and logits per source position. ``match``:
    from :func:`align_positions`. ``dst_ids_of_text``: ``[Ld]`` target token ids of the text.
    Returns ``(ids, vals)`` of shape ``[Ld, K]``: valid entries first in descending-logit order,
    padding ``-1`` / ``-inf``. Within a row, source entries are ranked by logit (stable) and when
    two map to the same target id the higher-ranked one wins. Source entries with an id outside
    ``vocab_map.src_to_dst`` (padding rows of an embedding matrix, or ``-1``) or a non-finite
    logit are dropped; a 1:1 row left empty, and every non-1:1 row, becomes a one-hot: the
    target's own token with logit ``0.0``. Hence no NaN and at least one valid entry per row.
    """
    src_ids = np.asarray(src_ids, dtype=np.int64)
    src_vals = np.asarray(src_vals)
    match = np.asarray(match, dtype=np.int64)
    dst_ids_of_text = np.asarray(dst_ids_of_text, dtype=np.int64)
    if src_ids.ndim != 2 or src_ids.shape != src_vals.shape:
        raise ValueError(f"src_ids {src_ids.shape} and src_vals {src_vals.shape} must be [Ls, K]")
    if match.shape != dst_ids_of_text.shape:
        raise ValueError("match and dst_ids_of_text must both be [Ld]")
    k = max(1, src_ids.shape[1])
    vdtype = np.result_type(src_vals.dtype, np.float32)
    ld = match.shape[0]
    out_ids = np.full((ld, k), -1, dtype=np.int64)
    out_vals = np.full((ld, k), -np.inf, dtype=vdtype)

    rows = np.flatnonzero(match >= 0)
    if rows.size and src_ids.shape[1]:
        if match[rows].max() >= src_ids.shape[0]:
            raise ValueError("match refers to a source position beyond src_ids")
        ids = src_ids[match[rows]]
        vals = src_vals[match[rows]].astype(vdtype)
        table = vocab_map.src_to_dst
        valid = (ids >= 0) & (ids < table.shape[0]) & np.isfinite(vals)
        # rank by logit, highest first (stable: equal logits keep their column order)
        order = np.argsort(np.where(valid, -vals, np.inf), axis=1, kind="stable")
        ids, vals, valid = (np.take_along_axis(a, order, axis=1) for a in (ids, vals, valid))
        mapped = np.where(valid, table[np.clip(ids, 0, table.shape[0] - 1)], -1)
        # first-assignment-wins: drop later duplicates of a mapped id within the row
        keys = np.where(valid, mapped, -1 - np.arange(ids.shape[1]))  # invalid keys distinct
        by_key = np.argsort(keys, axis=1, kind="stable")
        sorted_keys = np.take_along_axis(keys, by_key, axis=1)
        dup_sorted = np.zeros_like(valid)
        dup_sorted[:, 1:] = sorted_keys[:, 1:] == sorted_keys[:, :-1]
        dup = np.zeros_like(valid)
        np.put_along_axis(dup, by_key, dup_sorted, axis=1)
        valid &= ~dup
        compact = np.argsort(~valid, axis=1, kind="stable")
        out_ids[rows] = np.take_along_axis(np.where(valid, mapped, -1), compact, axis=1)
        out_vals[rows] = np.take_along_axis(np.where(valid, vals, -np.inf), compact, axis=1)

    onehot = out_ids[:, 0] < 0
    out_ids[onehot, 0] = dst_ids_of_text[onehot]
    out_vals[onehot, 0] = 0.0
    return out_ids, out_vals


@dataclass(frozen=True)
class AlignedTopK:
    """Result of aligning one text: target ids, 1:1 matches and sparse top-K target logits."""

    dst_input_ids: np.ndarray
    """int64 ``[Ld]``: the text's target token ids."""
    match: np.ndarray
    """int64 ``[Ld]``: the source position matched 1:1 to an agreeing token (a soft target), or -1."""
    topk_ids: np.ndarray
    """int64 ``[Ld, K]``: target ids, padding -1."""
    topk_vals: np.ndarray
    """float ``[Ld, K]``: logits, padding -inf."""


def align_topk_for_ids(
    src_input_ids: Sequence[int] | np.ndarray,
    dst_input_ids: Sequence[int] | np.ndarray,
    src_tok: Any,
    dst_tok: Any,
    src_topk_ids: np.ndarray,
    src_topk_vals: np.ndarray,
    vocab_map: VocabMap,
    *,
    src_norm: TokenNormalizer | None = None,
    dst_norm: TokenNormalizer | None = None,
) -> AlignedTopK:
    """Align two tokenizations of one text and map the source top-K onto the target.

    A target position gets the source's distribution only where it is matched 1:1 to a source
    token that agrees with it (:func:`agreeing_matches`); elsewhere a one-hot on its own token.

    ``src_topk_*`` are ``[len(src_input_ids), K]``. Pass prebuilt normalisers to save their
    (small) construction cost when aligning many texts.
    """
    src_input_ids = np.asarray(src_input_ids, dtype=np.int64)
    dst_input_ids = np.asarray(dst_input_ids, dtype=np.int64)
    if np.shape(src_topk_ids)[0] != src_input_ids.shape[0]:
        raise ValueError(
            f"top-K has {np.shape(src_topk_ids)[0]} rows but the source text has "
            f"{src_input_ids.shape[0]} tokens"
        )
    src_norm = src_norm or TokenNormalizer.from_tokenizer(src_tok)
    dst_norm = dst_norm or TokenNormalizer.from_tokenizer(dst_tok)
    src_tokens = src_norm.normalize_ids(src_tok, src_input_ids.tolist())
    dst_tokens = dst_norm.normalize_ids(dst_tok, dst_input_ids.tolist())
    pairs = align_positions(src_tokens, dst_tokens)
    match = agreeing_matches(pairs, src_input_ids, dst_input_ids, src_tokens, dst_tokens, vocab_map)
    ids, vals = map_topk(src_topk_ids, src_topk_vals, match, dst_input_ids, vocab_map)
    return AlignedTopK(dst_input_ids=dst_input_ids, match=match, topk_ids=ids, topk_vals=vals)


def align_topk_for_text(
    text: str,
    src_tok: Any,
    dst_tok: Any,
    src_topk_ids: np.ndarray,
    src_topk_vals: np.ndarray,
    vocab_map: VocabMap,
    *,
    add_special_tokens: bool = False,
) -> AlignedTopK:
    """Tokenise ``text`` with both tokenizers and run :func:`align_topk_for_ids`.

    ``src_topk_*`` must come from the source model run on ``src_tok(text,
    add_special_tokens=add_special_tokens)``, one row per source token.
    """
    src_ids = src_tok(text, add_special_tokens=add_special_tokens)["input_ids"]
    dst_ids = dst_tok(text, add_special_tokens=add_special_tokens)["input_ids"]
    return align_topk_for_ids(src_ids, dst_ids, src_tok, dst_tok, src_topk_ids, src_topk_vals, vocab_map)
