"""Benchmark: exact MinED vocabulary mapping vs brute force, on real tokenizers.

For each tokenizer pair it times ``build_vocab_map`` (both directions, cold cache), the cache
load, and brute force on a random sample of source tokens against the full target vocabulary,
extrapolated linearly to every source token; the sampled rows must agree exactly.

Run: ``.venv/bin/python bench/bench_vocab_map.py [--sample 200] [--pairs smollm2-gemma3 ...]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PAIRS = {
    "smollm2-gemma3": ("load_smollm2", "load_gemma3"),
    "neox-dolma2": ("load_neox", "load_dolma2"),
}


def _brute_seconds(
    src: list[str], dst: list[str], sample: int, rng: np.random.Generator
) -> tuple[float, np.ndarray, np.ndarray]:
    """Brute force on a random sample of ``src``: (seconds extrapolated to all of ``src``,
    sampled ids, their reference targets)."""
    from fedcollm.align import brute_force_map

    ids = rng.choice(len(src), size=min(sample, len(src)), replace=False)
    t0 = time.perf_counter()
    ref = brute_force_map([src[i] for i in ids], dst)
    per_row = (time.perf_counter() - t0) / len(ids)
    return per_row * len(src), ids, ref


def bench_pair(name: str, sample: int, seed: int) -> dict[str, float]:
    """Time one tokenizer pair; returns the measured figures."""
    from tests import _tokenizers

    from fedcollm.align import build_vocab_map, normalize_vocab
    from fedcollm.align.vocab import special_role_ids

    load_src, load_dst = (getattr(_tokenizers, f) for f in PAIRS[name])
    t0 = time.perf_counter()
    src_tok, dst_tok = load_src(), load_dst()
    if src_tok is None or dst_tok is None:
        print(f"{name}: tokenizer package missing, skipped")
        return {}
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        vm = build_vocab_map(src_tok, dst_tok, cache_dir=Path(tmp), progress=True)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_vocab_map(src_tok, dst_tok, cache_dir=Path(tmp))
        cache_s = time.perf_counter() - t0

    rng = np.random.default_rng(seed)
    src, dst = normalize_vocab(src_tok), normalize_vocab(dst_tok)
    brute_s = 0.0
    directions = ((src, dst, src_tok, vm.src_to_dst), (dst, src, dst_tok, vm.dst_to_src))
    for a, b, a_tok, mapping in directions:
        secs, ids, ref = _brute_seconds(a, b, sample, rng)
        brute_s += secs
        roles = set(special_role_ids(a_tok).values())
        keep = np.array([i not in roles for i in ids.tolist()])
        if not np.array_equal(mapping[ids[keep]], ref[keep]):
            raise SystemExit(f"{name}: MISMATCH against brute force")
    pairs = 2 * len(src) * len(dst)
    out = {
        "vocab_src": len(src),
        "vocab_dst": len(dst),
        "load_s": load_s,
        "build_s": build_s,
        "cache_s": cache_s,
        "brute_s": brute_s,
        "ratio": brute_s / build_s,
        "pairs": pairs,
    }
    print(
        f"{name}: |V|={len(src)}x{len(dst)}  build both directions {build_s:.1f} s  "
        f"cache load {cache_s:.2f} s  brute force (extrapolated from {sample}/direction) "
        f"{brute_s:.0f} s for {pairs:.2e} distances  speed-up x{out['ratio']:.1f}  "
        f"(tokenizer load {load_s:.1f} s; sample agrees exactly)",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and benchmark the requested pairs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=200, help="source tokens per direction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=list(PAIRS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    for name in args.pairs:
        bench_pair(name, args.sample, args.seed)


if __name__ == "__main__":
    main()
