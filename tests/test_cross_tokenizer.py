"""FedCoLLM's mutual distillation between models whose tokenizers differ (MinED alignment)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fedcollm.algorithms.fedcollm.distillation import aligned_teacher
from fedcollm.align.bridge import TokenBridge, needs_bridge
from fedcollm.config import build_config
from fedcollm.engines import run_experiment
from fedcollm.lm.encoding import encode_pair
from fedcollm.lm.loading import load_tokenizer
from tests.helpers import tiny_config


def test_bridge_between_identical_tokenizers_carries_the_teacher_unchanged(
    tiny_llama: Path, tmp_path: Path
) -> None:
    tok = load_tokenizer(str(tiny_llama))
    bridge = TokenBridge.build(tok, tok, cache_dir=tmp_path)
    items = [encode_pair(tok, "Question: The sun is a\nAnswer:", " star. Water boils")]
    logits = torch.randn(items[0].n_target, len(tok))
    ids, vals = aligned_teacher(logits, items, items, bridge, top_k=5, device=torch.device("cpu"))
    top_vals, top_ids = logits.topk(5, dim=-1)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(vals, top_vals)


def test_the_same_vocabulary_with_other_splitting_rules_needs_a_bridge(tiny_llama: Path) -> None:
    """Equal vocabularies are not enough: a normaliser (or other merges) changes the answer ids."""
    from tokenizers import normalizers

    tok = load_tokenizer(str(tiny_llama))
    assert not needs_bridge(tok, load_tokenizer(str(tiny_llama)))  # two loads of one tokenizer
    lowercasing = load_tokenizer(str(tiny_llama))
    lowercasing.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert lowercasing.get_vocab() == tok.get_vocab()
    assert lowercasing("Rocks").input_ids != tok("Rocks").input_ids
    assert needs_bridge(tok, lowercasing)


def test_bridge_between_different_tokenizers_gives_a_distribution_for_every_student_token(
    tiny_llama: Path, tiny_other_tokenizer: Path, tmp_path: Path
) -> None:
    teacher, student = load_tokenizer(str(tiny_other_tokenizer)), load_tokenizer(str(tiny_llama))
    assert needs_bridge(teacher, student)
    bridge = TokenBridge.build(teacher, student, cache_dir=tmp_path)
    context, answer = "Question: Rocks are classified as\nAnswer:", " igneous, metamorphic 🌋 岩石"
    t_item, s_item = encode_pair(teacher, context, answer), encode_pair(student, context, answer)
    ids, vals = aligned_teacher(
        torch.randn(t_item.n_target, len(teacher)), [t_item], [s_item], bridge, 8, torch.device("cpu")
    )
    assert ids.shape == (s_item.n_target, 8)
    assert bool(((ids >= 0).sum(1) >= 1).all())
    assert int(ids.max()) < len(student)
    assert not torch.isnan(vals).any()


def test_fedcollm_runs_between_models_with_different_tokenizers(
    tiny_llama: Path, tiny_other_tokenizer: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FEDCOLLM_CACHE", str(tmp_path / "cache"))
    cfg = build_config(
        tiny_config(
            tiny_llama, tiny_other_tokenizer, federation={"rounds": 1, "num_clients": 2}, distill={"top_k": 8}
        )
    )
    run_experiment(cfg, tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [m["value"] for m in metrics if m["metric"] == "distill_kd"]
    assert len(kd) == 2 and np.isfinite(kd).all() and min(kd) > 0
    assert {m["role"] for m in metrics if m["metric"] == "acc" and m["round"] == 1} == {"slm", "llm"}
    assert any((tmp_path / "cache" / "vocab_maps").iterdir())
