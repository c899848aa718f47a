"""Multiple-choice scoring: acc / acc_norm as lm-eval defines them, batching, a model that knows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedcollm.config import LoraConfig, TrainConfig
from fedcollm.data import MCRequest
from fedcollm.evaluation.multiple_choice import (
    EncodedRequests,
    encode_requests,
    evaluate,
    score,
    sequence_loglikelihoods,
)
from fedcollm.lm.encoding import Encoded, collate, encode_pair
from fedcollm.lm.logits import full_logits
from fedcollm.lm.lora import get_adapter, set_adapter
from fedcollm.lm.models import load_with_lora
from fedcollm.training.sft import train_sft
from tests.tiny import ARCHITECTURES, CORPUS, make_model

HAND_MADE = [
    MCRequest(
        "q1",
        "Question: The sun is a\nAnswer:",
        (" star", " rock", " plant"),
        ("star", "rock", "plant"),
        0,
    ),
    MCRequest(
        "q2",
        "Question: Water boils at one hundred\nAnswer:",
        (" light", " degrees"),
        ("light", "degrees"),
        1,
    ),
    MCRequest(
        "q3",
        "Question: Plants need light to\nAnswer:",
        (" sleep", " fever", " grow"),
        ("sleep", "fever", "grow"),
        2,
    ),
    MCRequest(
        "q4",
        "Question: Rocks are classified as\nA. igneous\nB. water\nAnswer:",
        (" A", " B"),
        ("A", "B"),
        0,
    ),
]


def test_acc_is_argmax_of_sum_and_acc_norm_divides_by_characters() -> None:
    request = MCRequest("x", "ctx", (" ab", " abcdefgh"), ("ab", "abcdefgh"), 1)
    encoded = EncodedRequests((Encoded((1, 2), 1), Encoded((1, 3), 1)), (0, 0), (request,))
    # sums: -2 beats -4 for acc; per character -2/2=-1 loses to -4/8=-0.5 for acc_norm
    result = score(encoded, np.array([-2.0, -4.0]))
    assert (result.predictions, result.predictions_norm) == ([0], [1])
    assert (result.acc, result.acc_norm) == (0.0, 1.0)


def test_stderr_is_the_sample_standard_error() -> None:
    encoded = EncodedRequests(
        tuple(Encoded((1, 2), 1) for _ in range(8)),
        tuple(q for q in range(4) for _ in range(2)),
        tuple(MCRequest(str(q), "c", (" a", " b"), ("a", "b"), 0) for q in range(4)),
    )
    result = score(encoded, np.array([0.0, -1, 0, -1, -1, 0, -1, 0]))
    assert result.acc == 0.5
    assert result.acc_stderr == pytest.approx(np.sqrt(0.25 / 3))


def test_batched_scores_equal_one_sequence_at_a_time_reference(tiny_llama: Path) -> None:
    lm = load_with_lora(str(tiny_llama), LoraConfig(r=4), seed=0)
    encoded = encode_requests(lm.tokenizer, HAND_MADE, add_bos=False)
    batched = sequence_loglikelihoods(lm.model, encoded.sequences, 0, batch_size=3)
    reference = []
    with torch.no_grad():
        for seq in encoded.sequences:
            batch = collate([seq], 0, device="cpu")
            logprobs = torch.log_softmax(full_logits(lm.model, batch), -1)
            reference.append(float(logprobs.gather(1, batch.targets[:, None]).sum()))
    np.testing.assert_allclose(batched, reference, rtol=1e-5, atol=1e-5)


def test_a_model_trained_on_the_answers_scores_them_all_correct(tiny_llama: Path) -> None:
    lm = load_with_lora(
        str(tiny_llama),
        LoraConfig(r=8, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"]),
        seed=0,
    )
    before = evaluate(lm.model, lm.tokenizer, HAND_MADE, add_bos=False)
    examples = [encode_pair(lm.tokenizer, r.context, r.continuations[r.gold]) for r in HAND_MADE]
    train_sft(lm.model, examples, pad_id=0, lr=3e-2, cfg=TrainConfig(epochs=40, batch_size=4), seed=0)
    after = evaluate(lm.model, lm.tokenizer, HAND_MADE, add_bos=False)
    assert after.acc == 1.0
    assert after.acc > before.acc
    assert after.n == len(HAND_MADE)


def test_encode_pair_splits_like_lm_eval(tiny_llama: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tiny_llama))
    enc = encode_pair(tok, "Question: The sun is a\nAnswer: ", "star")  # trailing space moves over
    whole = tok("Question: The sun is a\nAnswer: star", add_special_tokens=False)["input_ids"]
    ctx = tok("Question: The sun is a\nAnswer:", add_special_tokens=False)["input_ids"]
    assert list(enc.input_ids) == whole
    assert enc.n_context == len(ctx)
    with_bos = encode_pair(tok, "The sun is", " a star", add_bos=True)
    assert with_bos.input_ids[0] == tok.bos_token_id
    full = encode_pair(tok, "The sun is a star. Water boils at one hundred degrees.", " Plants")
    cut = encode_pair(
        tok,
        "The sun is a star. Water boils at one hundred degrees.",
        " Plants",
        max_length=full.n_target + 2,
    )
    assert cut.input_ids == full.input_ids[-(full.n_target + 2) :]  # cut on the left, answer whole
    assert cut.n_target == full.n_target
    with pytest.raises(ValueError, match="does not fit"):
        encode_pair(tok, "The sun is", " Plants", max_length=full.n_target)


SHARED_CONTEXTS = [
    *HAND_MADE,
    MCRequest(  # choices of different lengths after one context, one of them sharing a first token
        "q5",
        "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:",
        (" a leg muscle relaxing after exercise", " a bacterial population in the bloodstream", " a"),
        ("a leg muscle relaxing after exercise", "a bacterial population in the bloodstream", "a"),
        1,
    ),
    MCRequest("q6", "", (" The sun is a star", " Water"), ("The sun is a star", "Water"), 0),  # empty context
    MCRequest(  # a context longer than the tiny Gemma's 64-token sliding window
        "q7",
        " ".join(CORPUS[4:] * 3) + "\nQuestion: Rocks are classified as\nAnswer:",
        (" igneous, metamorphic, or sedimentary", " water"),
        ("igneous, metamorphic, or sedimentary", "water"),
        0,
    ),
]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shared_context_scoring_equals_the_full_forward_of_each_sequence(
    tmp_path_factory: pytest.TempPathFactory, arch: str
) -> None:
    folder = tmp_path_factory.mktemp(f"tiny-{arch}")
    lm = load_with_lora(str(make_model(folder, arch, seed=3)), LoraConfig(r=4), seed=0)
    # A non-zero adapter, so the LoRA path is exercised too; eval mode: no dropout in the reference.
    set_adapter(lm.model, {k: np.full_like(v, 0.05) for k, v in get_adapter(lm.model).items()})
    lm.model.eval()
    for add_bos in (False, True):
        encoded = encode_requests(lm.tokenizer, SHARED_CONTEXTS, add_bos=add_bos)
        reference = []
        with torch.no_grad():
            for seq in encoded.sequences:
                batch = collate([seq], 0, device="cpu")
                logprobs = torch.log_softmax(full_logits(lm.model, batch), -1).double()
                reference.append(float(logprobs.gather(1, batch.targets[:, None]).sum()))
        for batch_size in (1, 3, 16):
            ours = sequence_loglikelihoods(lm.model, encoded.sequences, 0, batch_size=batch_size)
            where = f"{arch}, bos={add_bos}, batch_size={batch_size}"
            np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5, err_msg=where)
