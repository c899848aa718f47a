"""Zero-shot multiple-choice accuracy, as lm-evaluation-harness defines `acc` and `acc_norm`.

`acc`: the choice whose continuation has the highest summed log-likelihood. `acc_norm`: the same
sum divided by the choice text's length in characters. Every choice of every question is one
sequence; sequences are batched across questions, sorted by length, and only continuation
positions go through the LM head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.data import MCRequest
from fedcollm.encoding import Encoded, collate, encode_pair
from fedcollm.forward import per_sequence_sum, target_logits


@dataclass
class EvalResult:
    """Accuracy over a question set, with per-question predictions for audits."""

    acc: float
    acc_norm: float
    n: int
    predictions: list[int] = field(default_factory=list)
    predictions_norm: list[int] = field(default_factory=list)
    loglikelihoods: list[list[float]] = field(default_factory=list)

    @property
    def acc_stderr(self) -> float:
        """Standard error of the mean accuracy (lm-eval's sample stderr)."""
        return _stderr(self.acc, self.n)

    @property
    def acc_norm_stderr(self) -> float:
        return _stderr(self.acc_norm, self.n)

    def summary(self) -> dict[str, float]:
        return {
            "acc": self.acc,
            "acc_stderr": self.acc_stderr,
            "acc_norm": self.acc_norm,
            "acc_norm_stderr": self.acc_norm_stderr,
            "n": float(self.n),
        }


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


@dataclass(frozen=True)
class EncodedRequests:
    """Every (question, choice) sequence of a request set, encoded once for one tokenizer."""

    sequences: tuple[Encoded, ...]
    question_of: tuple[int, ...]
    requests: tuple[MCRequest, ...]


def encode_requests(
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[MCRequest],
    *,
    add_bos: bool,
    max_length: int | None = None,
) -> EncodedRequests:
    """Encode all choices of all questions (cacheable across rounds: it depends on no weights)."""
    sequences: list[Encoded] = []
    question_of: list[int] = []
    for q, request in enumerate(requests):
        for continuation in request.continuations:
            sequences.append(
                encode_pair(tokenizer, request.context, continuation, add_bos=add_bos, max_length=max_length)
            )
            question_of.append(q)
    return EncodedRequests(tuple(sequences), tuple(question_of), tuple(requests))


@torch.no_grad()
def sequence_loglikelihoods(
    model: PeftModel | PreTrainedModel,
    sequences: Sequence[Encoded],
    pad_id: int,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Summed log-likelihood of each sequence's continuation tokens, float64 [N].

    Single-token continuations of one context (CommonsenseQA's " A" ... " E") share one forward
    pass: the same position's log-softmax scores all of them, as lm-eval's one-token cache does.
    """
    was_training = model.training
    model.eval()
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, seq in enumerate(sequences):
        key = seq.input_ids[:-1] if seq.n_target == 1 else (*seq.input_ids, -1 - i)
        groups.setdefault(key, []).append(i)
    heads = sorted(groups.values(), key=lambda members: -len(sequences[members[0]].input_ids))
    out = np.zeros(len(sequences), dtype=np.float64)
    total = -(-len(heads) // batch_size)
    for b, start in enumerate(range(0, len(heads), batch_size)):
        chunk = heads[start : start + batch_size]
        batch = collate([sequences[members[0]] for members in chunk], pad_id)
        logprobs = torch.log_softmax(target_logits(model, batch), dim=-1).double()
        firsts = [members[0] for members in chunk]
        picked = logprobs.gather(1, batch.targets.unsqueeze(1)).squeeze(1)
        out[firsts] = per_sequence_sum(picked, batch, len(chunk)).numpy()
        last_row = {int(r): p for p, r in enumerate(batch.rows.tolist())}  # row -> its last target
        for row, members in enumerate(chunk):
            for i in members[1:]:
                out[i] = float(logprobs[last_row[row], sequences[i].input_ids[-1]])
        if on_batch is not None:
            on_batch(b + 1, total)
    model.train(was_training)
    return out


def score(encoded: EncodedRequests, loglikelihoods: np.ndarray) -> EvalResult:
    """Turn per-choice log-likelihoods into acc / acc_norm, exactly as lm-eval does."""
    question_of = np.asarray(encoded.question_of)
    preds: list[int] = []
    preds_norm: list[int] = []
    lls_all: list[list[float]] = []
    correct = correct_norm = 0
    for q, request in enumerate(encoded.requests):
        lls = loglikelihoods[question_of == q]
        lengths = np.array([float(len(text)) for text in request.choice_texts])
        pred = int(np.argmax(lls))
        pred_norm = int(np.argmax(lls / lengths))
        preds.append(pred)
        preds_norm.append(pred_norm)
        lls_all.append(lls.tolist())
        correct += pred == request.gold
        correct_norm += pred_norm == request.gold
    n = len(encoded.requests)
    return EvalResult(
        acc=correct / n if n else float("nan"),
        acc_norm=correct_norm / n if n else float("nan"),
        n=n,
        predictions=preds,
        predictions_norm=preds_norm,
        loglikelihoods=lls_all,
    )


def evaluate(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[MCRequest] | EncodedRequests,
    *,
    add_bos: bool,
    batch_size: int = 16,
    max_length: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Zero-shot accuracy of a model on multiple-choice requests."""
    encoded = (
        requests
        if isinstance(requests, EncodedRequests)
        else encode_requests(tokenizer, requests, add_bos=add_bos, max_length=max_length)
    )
    if not encoded.requests:
        raise ValueError("no questions to evaluate")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lls = sequence_loglikelihoods(model, encoded.sequences, pad_id, batch_size, on_batch)
    return score(encoded, lls)
