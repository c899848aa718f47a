"""Tests for fedcollm.align: MinED vocabulary maps, normalisation, DTW alignment, top-K mapping."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import Levenshtein
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from fedcollm.align import (
    WORD_START,
    TokenNormalizer,
    VocabMap,
    agreeing_matches,
    align_positions,
    align_topk_for_ids,
    align_topk_for_text,
    brute_force_map,
    build_vocab_map,
    dtw_path,
    map_topk,
    nearest_indices,
    normalize_vocab,
)
from fedcollm.align import vocab as vocab_module
from fedcollm.align.normalize import byte_decoder
from tests._tokenizers import load_dolma2, load_gemma3, load_neox, load_smollm2

# --------------------------------------------------------------------------- fixtures


def _need(loader: Callable[[], Any], name: str) -> Any:
    tok = loader()
    if tok is None:
        pytest.skip(f"{name} tokenizer package not installed")
    return tok


@pytest.fixture(scope="session")
def neox() -> Any:
    return _need(load_neox, "GPT-NeoX-20B")


@pytest.fixture(scope="session")
def dolma2() -> Any:
    return _need(load_dolma2, "dolma2")


@pytest.fixture(scope="session")
def smollm2() -> Any:
    return _need(load_smollm2, "SmolLM2")


@pytest.fixture(scope="session")
def gemma3() -> Any:
    return _need(load_gemma3, "Gemma-3")


def _byte_level_tokenizer(extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Tiny GPT-2-style byte-level tokenizer with bos/eos/pad specials (no unk)."""
    vocab = {ch: i for i, ch in enumerate(byte_decoder())}
    for piece in ("Ġthe", "Ġcat", "ĊĊ", "ĠĠ", "ðŁĺ", *extra):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    return fast


def _sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Tiny Gemma/Llama-style tokenizer: ``▁`` word starts, ``<0xNN>`` byte fallback."""
    pieces = ["<unk>", "<bos>", "<eos>", "<pad>", "<0x0A>", "<0xE2>", "<0xF0>"]
    pieces += ["▁the", "▁cat", "▁", "▁▁", "the", "a", "b", "c", "\n\n", "<start_of_turn>"]
    tok = Tokenizer(BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens(
        {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    )
    return fast


def _lev(a: str, b: str) -> int:
    """Textbook O(len(a) * len(b)) Levenshtein distance (independent reference)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


# --------------------------------------------------------------------------- normalisation


def test_byte_level_normalisation() -> None:
    tok = _byte_level_tokenizer()
    norm = TokenNormalizer.from_tokenizer(tok)
    assert norm.byte_level
    strings = normalize_vocab(tok)
    vocab = tok.get_vocab()
    assert strings[vocab["Ġthe"]] == WORD_START + "the"
    assert strings[vocab["Ċ"]] == "\n"
    assert strings[vocab["ĊĊ"]] == "\n\n"
    assert strings[vocab["ĠĠ"]] == WORD_START * 2
    assert strings[vocab["â"]] == "\udce2"  # lone byte 0xE2: one surrogate-escaped code point
    assert strings[vocab["ðŁĺ"]] == "\udcf0\udc9f\udc98"  # 3 of the 4 bytes of an emoji
    assert strings[vocab["<s>"]] == "<s>"  # added tokens keep their content
    assert len(strings) == len(tok)


def test_sentencepiece_normalisation() -> None:
    tok = _sentencepiece_tokenizer()
    norm = TokenNormalizer.from_tokenizer(tok)
    assert not norm.byte_level and norm.byte_fallback
    strings = normalize_vocab(tok)
    vocab = tok.get_vocab()
    assert strings[vocab["▁the"]] == WORD_START + "the"
    assert strings[vocab["<0x0A>"]] == "\n"
    assert strings[vocab["<0xE2>"]] == "\udce2"
    assert strings[vocab["<bos>"]] == "<bos>"


def test_cross_family_twins_and_special_roles(tmp_path: Path) -> None:
    bl, sp = _byte_level_tokenizer(), _sentencepiece_tokenizer()
    vm = build_vocab_map(bl, sp, cache_dir=tmp_path)
    b, s = bl.get_vocab(), sp.get_vocab()
    assert vm.src_to_dst.shape == (len(bl),) and vm.dst_to_src.shape == (len(sp),)
    assert vm.src_to_dst.dtype == np.int64 and vm.dst_to_src.dtype == np.int64
    assert vm.src_to_dst[b["Ġthe"]] == s["▁the"]
    assert vm.src_to_dst[b["Ċ"]] == s["<0x0A>"]
    assert vm.src_to_dst[b["â"]] == s["<0xE2>"]
    assert vm.src_to_dst[b["ĊĊ"]] == s["\n\n"]
    assert vm.src_to_dst[b["Ġ"]] == s["▁"]
    # special tokens by role: bos<->bos, eos<->eos, pad<->pad
    for role in ("bos", "eos", "pad"):
        src_id, dst_id = getattr(bl, f"{role}_token_id"), getattr(sp, f"{role}_token_id")
        assert vm.src_to_dst[src_id] == dst_id
        assert vm.dst_to_src[dst_id] == src_id
    # unk exists only on the target side: mapped by MinED over "<unk>", not by role
    assert vm.dst_to_src[s["<unk>"]] == brute_force_map(["<unk>"], normalize_vocab(bl))[0]
    assert vm.dst_to_src[s["▁the"]] == b["Ġthe"]


# --------------------------------------------------------------------------- MinED search


def test_tie_breaking_rules() -> None:
    # all four targets at distance 1: lexicographically smallest string wins
    targets = ["ac", "aa", "ab2", "b"]
    assert nearest_indices(["ab"], targets).tolist() == [1]
    assert brute_force_map(["ab"], targets).tolist() == [1]
    # duplicated strings: smallest id wins
    targets = ["zz", "xy", "q", "xy"]
    assert nearest_indices(["xz", "xy"], targets).tolist() == [1, 1]
    assert brute_force_map(["xz", "xy"], targets).tolist() == [1, 1]
    # exact twin beats everything; empty strings are fine on both sides
    assert nearest_indices(["", "abc"], ["abd", "", "abc"]).tolist() == [1, 2]
    # only far targets: the unbounded stage still finds the right one
    far = ["x" * 70, "y" * 40 + "a", "a" * 50]
    assert nearest_indices(["a"], far).tolist() == brute_force_map(["a"], far).tolist() == [1]


_ALPHABET = st.sampled_from([*"ab▁é\n", "\udce2", "😀", "中"])


@settings(max_examples=60, deadline=None)
@given(
    queries=st.lists(st.text(_ALPHABET, max_size=40), min_size=1, max_size=25),
    targets=st.lists(st.text(_ALPHABET, max_size=40), min_size=1, max_size=60),
)
def test_nearest_matches_brute_force_property(queries: list[str], targets: list[str]) -> None:
    assert nearest_indices(queries, targets).tolist() == brute_force_map(queries, targets).tolist()


@settings(max_examples=150, deadline=None)
@given(a=st.text(_ALPHABET, max_size=12), b=st.text(_ALPHABET, max_size=12))
def test_rapidfuzz_levenshtein_matches_textbook(a: str, b: str) -> None:
    assert Levenshtein.distance(a, b) == _lev(a, b)


def _exactness_sample(src: list[str], dst: list[str], n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Sample of source ids: half without an exact twin (the hard part), half uniform."""
    rng = np.random.default_rng(seed)
    dst_set = set(dst)
    hard = np.array([i for i, s in enumerate(src) if s not in dst_set])
    ids = np.concatenate(
        [
            rng.choice(hard, size=min(n // 2, hard.size), replace=False),
            rng.choice(len(src), size=n - min(n // 2, hard.size), replace=False),
        ]
    )
    return ids, [src[i] for i in ids]


@pytest.mark.parametrize("direction", ["neox->dolma2", "dolma2->neox"])
def test_exact_on_real_tokenizers_sample(neox: Any, dolma2: Any, direction: str) -> None:
    src_tok, dst_tok = (neox, dolma2) if direction == "neox->dolma2" else (dolma2, neox)
    src, dst = normalize_vocab(src_tok), normalize_vocab(dst_tok)
    _, sample = _exactness_sample(src, dst, 1500, seed=0)
    assert nearest_indices(sample, dst).tolist() == brute_force_map(sample, dst).tolist()


def _check_full_map_sample(src_tok: Any, dst_tok: Any, mapping: np.ndarray, n: int) -> None:
    src, dst = normalize_vocab(src_tok), normalize_vocab(dst_tok)
    roles = set(vocab_module.special_role_ids(src_tok).values())
    ids, sample = _exactness_sample(src, dst, n, seed=1)
    keep = np.array([i not in roles for i in ids.tolist()])
    expected = brute_force_map([s for s, k in zip(sample, keep, strict=True) if k], dst)
    np.testing.assert_array_equal(mapping[ids[keep]], expected)


@pytest.mark.slow
def test_full_map_neox_dolma2_exact(neox: Any, dolma2: Any, tmp_path: Path) -> None:
    vm = build_vocab_map(neox, dolma2, cache_dir=tmp_path)
    _check_full_map_sample(neox, dolma2, vm.src_to_dst, 3000)
    _check_full_map_sample(dolma2, neox, vm.dst_to_src, 3000)


@pytest.mark.slow
def test_full_map_smollm2_gemma3_exact(smollm2: Any, gemma3: Any, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    vm = build_vocab_map(smollm2, gemma3, cache_dir=tmp_path)
    build_s = time.perf_counter() - t0
    assert vm.src_to_dst.shape == (len(smollm2),) and vm.dst_to_src.shape == (len(gemma3),)
    assert build_s < 240  # target <= 120 s on an idle 2-core machine; slack for shared CPUs
    _check_full_map_sample(smollm2, gemma3, vm.src_to_dst, 3000)
    _check_full_map_sample(gemma3, smollm2, vm.dst_to_src, 3000)
    # special tokens by role; SmolLM2's <|im_end|> is both eos and pad: eos (first role) wins
    assert vm.src_to_dst[smollm2.bos_token_id] == gemma3.bos_token_id
    assert vm.src_to_dst[smollm2.eos_token_id] == gemma3.eos_token_id
    assert vm.dst_to_src[gemma3.pad_token_id] == smollm2.pad_token_id
    assert vm.src_to_dst[smollm2.convert_tokens_to_ids("Ċ")] == gemma3.convert_tokens_to_ids("\n")
    # cache hit returns identical arrays
    again = build_vocab_map(smollm2, gemma3, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.src_to_dst, vm.src_to_dst)
    np.testing.assert_array_equal(again.dst_to_src, vm.dst_to_src)


# --------------------------------------------------------------------------- cache


def test_cache_hit_identical_and_keyed_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bl, sp = _byte_level_tokenizer(), _sentencepiece_tokenizer()
    first = build_vocab_map(bl, sp, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 2

    def boom(*args: Any, **kwargs: Any) -> np.ndarray:
        raise AssertionError("cache miss: search was run again")

    monkeypatch.setattr(vocab_module, "nearest_indices", boom)
    second = build_vocab_map(bl, sp, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.src_to_dst, second.src_to_dst)
    np.testing.assert_array_equal(first.dst_to_src, second.dst_to_src)
    # the reverse pair reuses the same two files
    rev = build_vocab_map(sp, bl, cache_dir=tmp_path)
    np.testing.assert_array_equal(rev.src_to_dst, first.dst_to_src)
    monkeypatch.undo()

    # a different vocabulary (one extra token) must not hit the old entries
    other = _byte_level_tokenizer(extra=("Ġdog",))
    third = build_vocab_map(other, sp, cache_dir=tmp_path)
    assert len(sorted(tmp_path.glob("*.npy"))) == 4
    assert third.src_to_dst.shape == (len(other),)


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCOLLM_CACHE", str(tmp_path))
    build_vocab_map(_byte_level_tokenizer(), _sentencepiece_tokenizer())
    assert len(list((tmp_path / "vocab_maps").glob("*.npy"))) == 2


# --------------------------------------------------------------------------- alignment


def test_identical_tokenizers_align_as_identity(neox: Any) -> None:
    text = "the the the cat sat on the mat.\n\n  Indented   spaces and 😀 中文 العربية"
    ids = neox(text, add_special_tokens=False)["input_ids"]
    strings = TokenNormalizer.from_tokenizer(neox).normalize_ids(neox, ids)
    match = align_positions(strings, strings)
    np.testing.assert_array_equal(match, np.arange(len(ids)))
    identity = VocabMap(np.arange(len(neox)), np.arange(len(neox)))
    rng = np.random.default_rng(0)
    topk_ids = rng.integers(0, len(neox), size=(len(ids), 5))
    topk_vals = -np.sort(rng.random((len(ids), 5)), axis=1)
    topk_ids = np.array([rng.permutation(len(neox))[:5] for _ in ids])  # distinct per row
    out = align_topk_for_ids(ids, ids, neox, neox, topk_ids, topk_vals, identity)
    np.testing.assert_array_equal(out.topk_ids, topk_ids)
    np.testing.assert_array_equal(out.topk_vals, topk_vals)


def test_dtw_path_shapes() -> None:
    assert dtw_path([], ["a"]).shape == (0, 2)
    path = dtw_path(["▁hello", "▁world"], ["▁hel", "lo", "▁world"])
    assert path.tolist() == [[0, 0], [0, 1], [1, 2]]
    assert align_positions(["▁hello", "▁world"], ["▁hel", "lo", "▁world"]).tolist() == [-1, -1, 1]
    # many:1 — target token covers two source tokens
    assert align_positions(["▁hel", "lo", "▁world"], ["▁hello", "▁world"]).tolist() == [-1, 2]


def test_first_assignment_wins_on_collisions() -> None:
    # source ids 0,1,2,3 -> target ids 7,7,5,5
    vm = VocabMap(np.array([7, 7, 5, 5, 9]), np.zeros(10, dtype=np.int64))
    ids = np.array([[1, 0, 3, 2, 4]])
    vals = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    out_ids, out_vals = map_topk(ids, vals, np.array([0]), np.array([3]), vm)
    assert out_ids.tolist() == [[7, 5, 9, -1, -1]]
    assert out_vals.tolist() == [[5.0, 3.0, 1.0, -np.inf, -np.inf]]
    # ranking is by logit, not by column order
    out_ids, out_vals = map_topk(ids[:, ::-1], vals[:, ::-1], np.array([0]), np.array([3]), vm)
    assert out_ids.tolist() == [[7, 5, 9, -1, -1]]
    assert out_vals[0, :3].tolist() == [5.0, 3.0, 1.0]


def test_map_topk_fallbacks_and_invalid_entries() -> None:
    vm = VocabMap(np.array([0, 1, 2]), np.array([0, 1, 2]))
    ids = np.array([[5, -1, 2], [0, 1, 2], [7, 8, 9]])  # ids beyond the map: padding rows
    vals = np.array([[1.0, 2.0, np.nan], [0.5, np.inf, -1.0], [1.0, 1.0, 1.0]])
    match = np.array([0, 1, -1, 2])
    out_ids, out_vals = map_topk(ids, vals, match, np.array([10, 11, 12, 13]), vm)
    # row 0: only NaN entry had a valid id -> nothing valid -> one-hot on target token 10
    assert out_ids[0].tolist() == [10, -1, -1] and out_vals[0, 0] == 0.0
    assert out_ids[1].tolist() == [0, 2, -1]  # +inf dropped, order by logit
    assert out_ids[2].tolist() == [12, -1, -1]  # unmatched -> one-hot
    assert out_ids[3].tolist() == [13, -1, -1]  # all ids out of range -> one-hot
    assert not np.isnan(out_vals).any()


_ROBUST_TEXTS = [
    "",
    "   ",
    " \n\t \n\n",
    "<|endoftext|>",
    "Hello<|endoftext|>world <|padding|>",
    "😀🎉👩‍👩‍👧 emoji 🇫🇷",
    "中文分词测试，日本語のテキスト、한국어",
    "مرحبا بالعالم، هذا نص عربي",
    "mixed: naïve café — “quotes” ≠ ≤ ∑ \u200b zero-width",
]


@pytest.mark.parametrize("text", _ROBUST_TEXTS)
def test_align_topk_robust(neox: Any, dolma2: Any, text: str) -> None:
    rng = np.random.default_rng(len(text))
    vm = VocabMap(rng.integers(0, len(dolma2), size=len(neox)), rng.integers(0, len(neox), len(dolma2)))
    n_src = len(neox(text, add_special_tokens=False)["input_ids"])
    topk_ids = rng.integers(0, len(neox) + 100, size=(n_src, 8))  # includes padding-row ids
    topk_vals = rng.normal(size=(n_src, 8)).astype(np.float32)
    out = align_topk_for_text(text, neox, dolma2, topk_ids, topk_vals, vm)
    n_dst = len(out.dst_input_ids)
    assert out.topk_ids.shape == out.topk_vals.shape == (n_dst, 8)
    assert not np.isnan(out.topk_vals).any()
    assert (out.topk_ids[:, 0] >= 0).all() and np.isfinite(out.topk_vals[:, 0]).all()
    assert ((out.topk_ids >= 0) == np.isfinite(out.topk_vals)).all()
    assert (out.topk_ids < len(dolma2)).all()
    if text.strip():
        assert n_dst > 0


def test_align_long_text_fast(neox: Any, dolma2: Any) -> None:
    rng = np.random.default_rng(0)
    words = ["the", "federated", "😀", "中文", "co-tuning", "of", "LLMs", "\n", "  ", "ÿ", "x=1;"]
    text = " ".join(rng.choice(words, size=3200).tolist())
    src_ids = neox(text, add_special_tokens=False)["input_ids"]
    assert len(src_ids) >= 5000
    vm = VocabMap(np.zeros(len(neox), dtype=np.int64), np.zeros(len(dolma2), dtype=np.int64))
    topk_ids = rng.integers(0, len(neox), size=(len(src_ids), 4))
    topk_vals = rng.normal(size=(len(src_ids), 4))
    t0 = time.perf_counter()
    out = align_topk_for_text(text, neox, dolma2, topk_ids, topk_vals, vm)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, elapsed
    assert not np.isnan(out.topk_vals).any() and (out.topk_ids[:, 0] >= 0).all()
    assert (out.match >= 0).mean() > 0.5  # these tokenizers agree on most word pieces


def test_mismatched_topk_rows_rejected(neox: Any, dolma2: Any) -> None:
    vm = VocabMap(np.zeros(len(neox), dtype=np.int64), np.zeros(len(dolma2), dtype=np.int64))
    with pytest.raises(ValueError, match="top-K has"):
        align_topk_for_text("hello world", neox, dolma2, np.zeros((1, 2)), np.zeros((1, 2)), vm)


def _bpe_tokenizer(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """Byte-level BPE over single characters plus the pieces `merges` build, in that priority."""
    vocab = {ch: i for i, ch in enumerate(byte_decoder())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_a_pair_of_different_tokens_gets_a_one_hot_unless_the_vocabulary_map_joins_them() -> None:
    """FuseLLM's soft alignment: DTW pairs `Par`/`Pa` and `is`/`ris` one to one; only the pair the
    MinED map joins (`Par` -> `Pa`) carries the teacher's distribution, `ris` keeps its own token."""
    teacher = _bpe_tokenizer([("P", "a"), ("Pa", "r"), ("i", "s")])
    student = _bpe_tokenizer([("P", "a"), ("r", "i"), ("ri", "s")])
    src = teacher("Paris", add_special_tokens=False)["input_ids"]
    dst = student("Paris", add_special_tokens=False)["input_ids"]
    assert teacher.convert_ids_to_tokens(src) == ["Par", "is"]
    assert student.convert_ids_to_tokens(dst) == ["Pa", "ris"]
    svocab = student.get_vocab()
    nearest = {"Par": "Pa", "is": "i", "Pa": "Pa"}  # what MinED picks where the string is absent
    src_to_dst = np.array(
        [svocab.get(nearest.get(t, t), 0) for t in teacher.convert_ids_to_tokens(list(range(len(teacher))))]
    )
    vm = VocabMap(src_to_dst, np.zeros(len(student), dtype=np.int64))
    topk_ids = np.array([[src[0], src[1]], [src[1], src[0]]])
    topk_vals = np.array([[2.0, 1.0], [3.0, 0.5]])
    out = align_topk_for_ids(src, dst, teacher, student, topk_ids, topk_vals, vm)
    assert out.match.tolist() == [0, -1]
    assert out.topk_ids[0].tolist() == [svocab["Pa"], svocab["i"]]  # the teacher's row, mapped
    assert out.topk_ids[1].tolist() == [dst[1], -1] and out.topk_vals[1, 0] == 0.0  # one-hot on `ris`


def test_agreeing_matches_keeps_equal_strings_and_mapped_pairs_only() -> None:
    vm = VocabMap(np.array([10, 11, 12]), np.zeros(13, dtype=np.int64))
    match = np.array([0, 1, 2, -1])
    kept = agreeing_matches(
        match,
        np.array([0, 1, 2]),
        np.array([99, 11, 98, 97]),
        ["▁the", "x", "y"],
        ["▁the", "z", "w", "v"],
        vm,
    )
    # 0: same string (map disagrees); 1: the map sends 1 -> 11; 2: neither; 3: unmatched
    assert kept.tolist() == [0, 1, -1, -1]
