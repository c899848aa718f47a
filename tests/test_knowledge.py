"""FedMKT knowledge sets: computation, compact packing, validation, alignment, DualMinCE, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcollm.algorithms.fedmkt.knowledge import (
    KnowledgeError,
    KnowledgeSet,
    align_knowledge,
    compute_knowledge,
    dense_reference_bytes,
    dual_min_ce,
    select_teachers,
    train_with_knowledge,
    validate_knowledge,
)
from fedcollm.align.bridge import TokenBridge
from fedcollm.config import LoraConfig, TrainConfig
from fedcollm.data import MCRequest
from fedcollm.lm.lora import get_adapter
from fedcollm.lm.models import load_with_lora

pass

REQUESTS = [
    MCRequest(
        id=f"q{i}",
        context=f"Question: Which factor will most likely cause a fever {i}?\nAnswer:",
        continuations=(" a bacterial population in the bloodstream", " a leg muscle relaxing"),
        choice_texts=("a bacterial population in the bloodstream", "a leg muscle relaxing"),
        gold=i % 2,
    )
    for i in range(6)
]


@pytest.fixture(scope="module")
def slm(tiny_llama: Path):
    return load_with_lora(str(tiny_llama), LoraConfig(r=4), seed=0)


@pytest.fixture(scope="module")
def other(tiny_other_tokenizer: Path):
    return load_with_lora(str(tiny_other_tokenizer), LoraConfig(r=4), seed=0)


@pytest.fixture(scope="module")
def knowledge(slm) -> KnowledgeSet:
    examples = slm.encode_sft(REQUESTS, 128)
    return compute_knowledge(
        slm.model, examples, pad_id=slm.pad_id, top_k=5, batch_size=4, vocab_size=len(slm.tokenizer)
    )


def test_knowledge_has_one_row_per_answer_token_and_the_model_loss(slm, knowledge: KnowledgeSet) -> None:
    examples = slm.encode_sft(REQUESTS, 128)
    assert len(knowledge) == len(REQUESTS)
    assert knowledge.lengths.tolist() == [e.n_target for e in examples]
    assert knowledge.ids.shape == (sum(e.n_target for e in examples), 5)
    # every row is the model's top-5 in descending order; losses are positive and finite
    assert (np.diff(knowledge.values, axis=1) <= 0).all()
    assert np.isfinite(knowledge.loss).all() and (knowledge.loss > 0).all()
    # batch size does not change the result
    again = compute_knowledge(
        slm.model, examples, pad_id=slm.pad_id, top_k=5, batch_size=1, vocab_size=len(slm.tokenizer)
    )
    np.testing.assert_allclose(again.loss, knowledge.loss, rtol=1e-4)
    np.testing.assert_array_equal(again.ids, knowledge.ids)


def test_pack_unpack_round_trip_is_compact(knowledge: KnowledgeSet) -> None:
    packed = knowledge.pack("knowledge.")
    assert {k: v.dtype for k, v in packed.items()} == {
        "knowledge.loss": np.float32,
        "knowledge.lengths": np.int32,
        "knowledge.ids": np.int32,
        "knowledge.values": np.float16,
    }
    back = KnowledgeSet.unpack(packed, "knowledge.")
    np.testing.assert_array_equal(back.ids, knowledge.ids)
    np.testing.assert_array_equal(back.lengths, knowledge.lengths)
    np.testing.assert_allclose(back.values.astype(np.float32), knowledge.values, rtol=1e-3, atol=1e-3)
    # only answer positions travel: P*K*(4+2) + N*(4+4) bytes, far below the paper's N*S*K
    n, p, k = len(knowledge), int(knowledge.lengths.sum()), knowledge.top_k
    assert sum(a.nbytes for a in packed.values()) == p * k * 6 + n * 8 == knowledge.nbytes
    assert knowledge.nbytes < dense_reference_bytes(n, 128, k) / 5


def _broken(knowledge: KnowledgeSet, what: str) -> KnowledgeSet:
    packed = knowledge.pack()
    if what == "nan":
        packed["values"] = packed["values"].copy()
        packed["values"][1, 2] = np.nan
    elif what == "vocab":
        packed["ids"] = packed["ids"].copy()
        packed["ids"][0, 0] = 10_000
    elif what == "count":
        packed["loss"] = packed["loss"][:-1]
    elif what == "lengths":
        packed["lengths"] = packed["lengths"].copy()
        packed["lengths"][0] += 1
    elif what == "loss":
        packed["loss"] = packed["loss"].copy()
        packed["loss"][3] = np.inf
    return KnowledgeSet.unpack(packed)


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("nan", "NaN or infinite"),
        ("vocab", "outside its vocabulary"),
        ("count", "public set has 6 samples"),
        ("lengths", "answer positions"),
        ("loss", "losses are NaN"),
    ],
)
def test_validation_rejects_bad_sets_naming_the_sender(
    knowledge: KnowledgeSet, what: str, message: str
) -> None:
    validate_knowledge(
        knowledge, who="client 3", num_samples=6, lengths=knowledge.lengths, vocab_size=300, max_top_k=16
    )
    with pytest.raises(KnowledgeError, match=rf"^client 3: .*{message}"):
        validate_knowledge(
            _broken(knowledge, what),
            who="client 3",
            num_samples=6,
            lengths=knowledge.lengths,
            vocab_size=300,
            max_top_k=16,
        )


def test_unpack_names_the_sender_when_arrays_are_missing() -> None:
    with pytest.raises(KnowledgeError, match=r"client 1: knowledge set lacks .*knowledge\.ids"):
        KnowledgeSet.unpack({"knowledge.loss": np.zeros(2, np.float32)}, "knowledge.", who="client 1")


def test_dual_min_ce_picks_the_lowest_loss_only_when_it_beats_the_learner() -> None:
    clients = np.array([[1.0, 3.0, 0.5, np.nan], [2.0, 1.0, 0.7, 0.1]])
    own = np.array([1.5, 0.9, 0.6, 0.2])
    assert dual_min_ce(clients, own).tolist() == [0, -1, 0, 1]
    assert dual_min_ce(clients[:1], np.array([0.1, 0.1, 0.1, 0.1])).tolist() == [-1, -1, -1, -1]


def test_alignment_to_another_tokenizer_lands_on_its_answer_tokens(slm, other, knowledge) -> None:
    src = slm.encode_sft(REQUESTS, 128)
    dst = other.encode_sft(REQUESTS, 128)
    assert [e.input_ids[e.n_context :] for e in src] != [e.input_ids[e.n_context :] for e in dst]
    bridge = TokenBridge.build(slm.tokenizer, other.tokenizer)
    aligned = align_knowledge(knowledge, src, dst, bridge, dst_vocab_size=len(other.tokenizer))
    assert aligned.lengths.tolist() == [e.n_target for e in dst]
    assert aligned.ids.shape[0] == sum(e.n_target for e in dst)
    assert aligned.ids.max() < len(other.tokenizer)
    assert ((aligned.ids >= 0).any(axis=1)).all()  # every row has a teacher entry
    np.testing.assert_array_equal(aligned.loss, knowledge.loss)
    # the same tokenizer needs no bridge and changes nothing
    same = align_knowledge(knowledge, src, src, None)
    np.testing.assert_array_equal(same.ids, knowledge.ids)


def test_training_on_selected_knowledge_moves_the_adapter(slm, knowledge) -> None:
    examples = slm.encode_sft(REQUESTS, 128)
    before = get_adapter(slm.model)
    chosen = np.array([0, -1, 0, -1, -1, 0])
    teachers = select_teachers(chosen, [knowledge])
    result = train_with_knowledge(
        slm.model,
        examples,
        teachers,
        pad_id=slm.pad_id,
        lr=1e-2,
        cfg=TrainConfig(batch_size=4),
        epochs=1,
        ce_weight=0.9,
        temperature=1.0,
        seed=0,
    )
    assert result.num_selected == 3 and result.steps == 2
    assert np.isfinite(result.mean_loss) and result.mean_kd > 0
    after = get_adapter(slm.model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
