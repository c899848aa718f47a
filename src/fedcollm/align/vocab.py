"""MinED vocabulary mapping between two tokenizers (FedMKT token alignment), with a disk cache.

Every source id is mapped to one target id: special tokens go to their counterpart by role
(bos, eos, pad, unk, when both tokenizers define that role), every other token to the target
token whose normalised string (:mod:`fedcollm.align.normalize`) is nearest in Levenshtein
distance (exact search, :mod:`fedcollm.align.search`). Both directions are built.

Sizes are ``len(tokenizer)`` (added tokens included). A model's embedding/logit matrix may have
more rows than that (padding rows, e.g. to a multiple of 64); ids beyond the map are not real
tokens and callers must drop them (``fedcollm.align.sequence`` does).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcollm.align.normalize import normalize_vocab
from fedcollm.align.search import log_progress, nearest_indices

ALGO_VERSION = "mined-v1"
"""Bumped whenever normalisation or search rules change, invalidating cached maps."""

SPECIAL_ROLES: tuple[str, ...] = ("bos", "eos", "pad", "unk")


@dataclass(frozen=True)
class VocabMap:
    """Token-id maps in both directions between a source and a target tokenizer."""

    src_to_dst: np.ndarray
    """int64 ``[len(src_tokenizer)]``: target id for every source id."""
    dst_to_src: np.ndarray
    """int64 ``[len(dst_tokenizer)]``: source id for every target id."""

    def reversed(self) -> VocabMap:
        """The same map seen from the target side."""
        return VocabMap(src_to_dst=self.dst_to_src, dst_to_src=self.src_to_dst)


def default_cache_dir() -> Path:
    """``$FEDCOLLM_CACHE/vocab_maps``, else ``~/.cache/fedcollm/vocab_maps``."""
    root = os.environ.get("FEDCOLLM_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "fedcollm"
    return base / "vocab_maps"


def special_role_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of the tokenizer's bos/eos/pad/unk tokens, for the roles it defines."""
    roles: dict[str, int] = {}
    for role in SPECIAL_ROLES:
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < len(tokenizer):
            roles[role] = tid
    return roles


def _fingerprint(strings: list[str], roles: dict[str, int]) -> bytes:
    """Content hash of a normalised vocabulary and its special-token roles."""
    h = hashlib.sha256()
    h.update(len(strings).to_bytes(8, "little"))
    for s in strings:
        data = s.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    h.update(repr(sorted(roles.items())).encode())
    return h.digest()


def _direction(
    src: list[str],
    dst: list[str],
    src_roles: dict[str, int],
    dst_roles: dict[str, int],
    progress: bool,
) -> np.ndarray:
    """One direction: MinED over normalised strings, then role overrides (first role wins)."""
    mapping = nearest_indices(src, dst, progress=progress)
    overridden: set[int] = set()
    for role in SPECIAL_ROLES:
        if role in src_roles and role in dst_roles and src_roles[role] not in overridden:
            mapping[src_roles[role]] = dst_roles[role]
            overridden.add(src_roles[role])
    return mapping


def _load_or_build(path: Path | None, build: Any, expected_len: int, progress: bool, what: str) -> np.ndarray:
    if path is not None and path.is_file():
        arr = np.load(path)
        if arr.shape == (expected_len,) and arr.dtype == np.int64:
            log_progress(progress, f"{what}: cache hit {path}")
            return arr
    t0 = time.perf_counter()
    arr = np.ascontiguousarray(build(), dtype=np.int64)
    log_progress(progress, f"{what}: built in {time.perf_counter() - t0:.1f}s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
    return arr


def build_vocab_map(
    src: Any,
    dst: Any,
    cache_dir: Path | None = None,
    progress: bool = False,
    *,
    use_cache: bool = True,
) -> VocabMap:
    """Build (or load from cache) the exact MinED map between two transformers tokenizers.

    The cache key is a SHA-256 of both normalised vocabularies, their special-token roles and
    :data:`ALGO_VERSION`, so a changed vocabulary never reuses a stale map. Files are
    ``<cache_dir>/<key>.npy`` (one per direction), written atomically. ``cache_dir`` defaults
    to :func:`default_cache_dir`; ``use_cache=False`` neither reads nor writes.
    """
    src_str, dst_str = normalize_vocab(src), normalize_vocab(dst)
    src_roles, dst_roles = special_role_ids(src), special_role_ids(dst)
    fp_src, fp_dst = _fingerprint(src_str, src_roles), _fingerprint(dst_str, dst_roles)
    directory = (cache_dir or default_cache_dir()) if use_cache else None

    def path(a: bytes, b: bytes) -> Path | None:
        if directory is None:
            return None
        key = hashlib.sha256(ALGO_VERSION.encode() + a + b).hexdigest()[:32]
        return directory / f"{key}.npy"

    fwd = _load_or_build(
        path(fp_src, fp_dst),
        lambda: _direction(src_str, dst_str, src_roles, dst_roles, progress),
        len(src_str),
        progress,
        "src->dst",
    )
    bwd = _load_or_build(
        path(fp_dst, fp_src),
        lambda: _direction(dst_str, src_str, dst_roles, src_roles, progress),
        len(dst_str),
        progress,
        "dst->src",
    )
    return VocabMap(src_to_dst=fwd, dst_to_src=bwd)
