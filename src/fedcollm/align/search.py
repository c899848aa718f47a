"""Exact minimum-edit-distance (MinED) nearest-string search, plus a brute-force reference.

For every query string we want the target with the smallest Levenshtein distance, ties broken
to the lexicographically smallest target string and then to the smallest target position. A
brute-force scan of SmolLM2 x Gemma is 1.3e10 distances; the exact search below avoids most of
them while returning *identical* answers:

1. Targets are de-duplicated and sorted, so "smallest sorted index" *is* the tie-break rule.
2. Distance 0: a dict lookup.
3. Distance 1: hashing. ``lev(q, t) == 1`` iff ``t`` is ``q`` with one character deleted,
   inserted or substituted; we index every target by its one-deletion variants (and by
   (position, one-deletion variant) for substitutions) and look up the query's variants.
   Each key stores the smallest sorted index, so the tie-break comes for free.
4. Distance >= 2: staged search with growing cutoffs k = 2, 4, 8, ... Since
   ``lev(q, t) >= |len(q) - len(t)|``, only targets whose length is within k of the query's can
   be at distance <= k; queries are grouped by length and compared with that window only using
   RapidFuzz's C++ ``cdist`` with ``score_cutoff=k``. A query whose window minimum is <= k is
   final (every target at that distance lies in the window, and the first minimum in sorted
   order is the tie-break winner); the others move on to the next, wider stage. A final
   unbounded stage scans all targets.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

STAGES: tuple[int, ...] = (2, 4, 8, 16, 32)
"""Cutoffs of the staged search after the hashed distance-1 stage (then one unbounded stage)."""

_CHUNK_CELLS = 20_000_000  # distance-matrix cells computed per cdist call (bounds memory)


def log_progress(progress: bool, msg: str) -> None:
    """Print a progress line to stderr when ``progress`` is set (kept off the logging tree)."""
    if progress:
        print(f"[fedcollm.align] {msg}", file=sys.stderr, flush=True)


def _distance_one(pending: list[str], uniq: list[str]) -> dict[str, int]:
    """Smallest sorted target index at Levenshtein distance exactly 1, for the queries having one.

    Precondition: no query occurs in ``uniq`` (distance 0 handled before).
    """
    exact = {s: j for j, s in enumerate(uniq)}
    deletions: dict[str, int] = {}
    substitutions: dict[tuple[int, str], int] = {}
    for j, s in enumerate(uniq):  # sorted order: setdefault keeps the smallest index
        for i in range(len(s)):
            rest = s[:i] + s[i + 1 :]
            deletions.setdefault(rest, j)
            substitutions.setdefault((i, rest), j)
    none = len(uniq)
    found: dict[str, int] = {}
    for q in pending:
        best = deletions.get(q, none)  # target = query + one inserted character
        for i in range(len(q)):
            rest = q[:i] + q[i + 1 :]
            best = min(best, exact.get(rest, none), substitutions.get((i, rest), none))
        if best < none:
            found[q] = best
    return found


def _staged(pending: list[str], uniq: list[str], workers: int, progress: bool) -> dict[str, int]:
    """Exact nearest sorted index for queries known to be at distance >= 2 from every target."""
    lengths = np.fromiter((len(s) for s in uniq), dtype=np.int64, count=len(uniq))
    uniq_arr = np.array(uniq, dtype=object)
    found: dict[str, int] = {}
    remaining = pending
    for cutoff in (*STAGES, None):
        if not remaining:
            break
        qlen = np.fromiter((len(s) for s in remaining), dtype=np.int64, count=len(remaining))
        bound = np.inf if cutoff is None else cutoff
        nxt: list[str] = []
        for n in np.unique(qlen):
            group = [remaining[i] for i in np.flatnonzero(qlen == n)]
            window = np.flatnonzero(np.abs(lengths - n) <= bound)
            if window.size == 0:
                nxt.extend(group)
                continue
            choices = uniq_arr[window].tolist()
            step = max(1, _CHUNK_CELLS // window.size)
            for start in range(0, len(group), step):
                chunk = group[start : start + step]
                # Window strings as cdist "queries" (preprocessed once) is slightly faster.
                dist = cdist(
                    choices,
                    chunk,
                    scorer=Levenshtein.distance,
                    score_cutoff=cutoff,
                    workers=workers,
                    dtype=np.int32 if cutoff is None else np.int16,
                ).T
                arg = dist.argmin(axis=1)  # first minimum = lexicographically smallest
                best = dist[np.arange(len(chunk)), arg]
                for q, a, d in zip(chunk, arg.tolist(), best.tolist(), strict=True):
                    if cutoff is None or d <= cutoff:
                        found[q] = int(window[a])
                    else:
                        nxt.append(q)
        done = len(remaining) - len(nxt)
        log_progress(progress, f"  cutoff {cutoff}: {done} resolved, {len(nxt)} left")
        remaining = nxt
    return found


def nearest_indices(
    queries: Sequence[str],
    targets: Sequence[str],
    *,
    workers: int = -1,
    progress: bool = False,
) -> np.ndarray:
    """For each query, the position in ``targets`` of its MinED nearest string (exact).

    Rule: minimum Levenshtein distance, then lexicographically smallest target string (Python
    code-point order), then smallest position. Returns int64 ``[len(queries)]``.
    ``workers`` is passed to RapidFuzz (-1 = all cores).
    """
    if len(targets) == 0:
        raise ValueError("cannot map onto an empty target vocabulary")
    first: dict[str, int] = {}
    for pos, s in enumerate(targets):
        first.setdefault(s, pos)
    uniq = sorted(first)
    rep = np.array([first[s] for s in uniq], dtype=np.int64)
    exact = {s: j for j, s in enumerate(uniq)}

    result: dict[str, int] = {}
    pending: list[str] = []
    for q in dict.fromkeys(queries):
        j = exact.get(q)
        if j is None:
            pending.append(q)
        else:
            result[q] = j
    log_progress(progress, f"{len(result)} exact, {len(pending)} to search in {len(uniq)} targets")
    if pending:
        one = _distance_one(pending, uniq)
        result.update(one)
        pending = [q for q in pending if q not in one]
        log_progress(progress, f"  distance 1: {len(one)} resolved, {len(pending)} left")
    if pending:
        result.update(_staged(pending, uniq, workers, progress))
    idx = np.fromiter((result[q] for q in queries), dtype=np.int64, count=len(queries))
    return rep[idx]


def brute_force_map(
    src_strings: Sequence[str], dst_strings: Sequence[str], *, workers: int = -1
) -> np.ndarray:
    """Reference MinED map: full distance rows, then the tie-break rule applied literally.

    Independent of the pruning in :func:`nearest_indices` (no de-duplication, no hashing, no
    length windows); used by tests and the benchmark. Cost: ``len(src) * len(dst)`` distances.
    """
    if len(dst_strings) == 0:
        raise ValueError("cannot map onto an empty target vocabulary")
    dst = list(dst_strings)
    out = np.empty(len(src_strings), dtype=np.int64)
    step = max(1, _CHUNK_CELLS // len(dst))
    src = list(src_strings)
    for start in range(0, len(src), step):
        chunk = src[start : start + step]
        dist = cdist(chunk, dst, scorer=Levenshtein.distance, workers=workers, dtype=np.int32)
        mins = dist.min(axis=1)
        for r in range(len(chunk)):
            ties = np.flatnonzero(dist[r] == mins[r]).tolist()
            out[start + r] = min(ties, key=lambda j: (dst[j], j))
    return out
