"""Zero-shot multiple-choice accuracy, as lm-evaluation-harness defines `acc` and `acc_norm`.

`acc`: the choice whose continuation has the highest summed log-likelihood. `acc_norm`: the same
sum divided by the choice text's length in characters. Every choice of every question is one
sequence; a question's shared context runs once and its key/value cache serves every choice,
contexts are batched across questions by length, and only continuation positions go through
the LM head.
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
from fedcollm.data.generative import EvalItem
from fedcollm.lm import encoding
from fedcollm.lm.devices import model_device, to_numpy
from fedcollm.lm.encoding import Encoded, encode_pair
from fedcollm.lm.logits import decoder_of, head_logits


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


def multiple_choice(items: Sequence[EvalItem]) -> list[MCRequest]:
    """`items` as the multiple-choice questions they are (a task family makes one kind per run)."""
    out = [item for item in items if isinstance(item, MCRequest)]
    if len(out) != len(items):
        raise TypeError("scoring choices needs multiple-choice questions; this task is answered in free text")
    return out


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


LM_EVAL_DEFAULT_MAX_LENGTH = 2048
"""HFLM's window where neither the config nor the tokenizer gives one (`DEFAULT_MAX_LENGTH`)."""
_TOKENIZER_INFINITY = 1000000000000000019884624838656
"""transformers' `model_max_length` of a tokenizer that sets none."""


def context_window(model: PeftModel | PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest input lm-evaluation-harness 0.4 feeds `model` (HFLM's `max_length`).

    lm-eval's `resolve_max_length`, re-stated because lm-eval is an optional extra (a test holds
    the two equal): the text config's `n_positions`, `max_position_embeddings` or `n_ctx`, in
    that order, else the tokenizer's `model_max_length` unless unset, else 2048.
    """
    config = model.config
    text = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(text, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != _TOKENIZER_INFINITY:
        return int(limit)
    return LM_EVAL_DEFAULT_MAX_LENGTH


def scoring_length(model: PeftModel | PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens of context+continuation kept when a choice is scored: the last window + 1.

    lm-eval keeps `(context + continuation)[-(max_length + 1):]` and feeds all but the last token,
    so the model sees at most its window and the left of a long context is cut.
    """
    return context_window(model, tokenizer) + 1


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


@dataclass(frozen=True)
class _SuffixRow:
    """Tokens run after a shared prefix, and the sequences whose continuation they score."""

    tokens: tuple[int, ...]
    """The last context token and the continuation without its last token (one per target)."""
    members: tuple[int, ...]
    """Indices of the sequences scored from this row (same inputs; targets may differ)."""


@dataclass(frozen=True)
class _PrefixGroup:
    """Sequences that share every context token but the last: one prefix forward serves them all."""

    prefix: tuple[int, ...]
    rows: tuple[_SuffixRow, ...]


def _prefix_groups(sequences: Sequence[Encoded]) -> list[_PrefixGroup]:
    """Group sequences by their context minus its last token, then by identical suffix inputs.

    The choices of one question share their context; their continuations need the hidden state
    of the context's last token onwards. Splitting one token before the continuation keeps at
    least one input token per suffix row, and makes choices that differ only in their last
    token (" A" ... " E") share a row: one position's log-softmax scores all of them.
    """
    grouped: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, seq in enumerate(sequences):
        split = seq.n_context - 1
        rows = grouped.setdefault(seq.input_ids[:split], {})
        rows.setdefault(seq.input_ids[split:-1], []).append(i)
    return [
        _PrefixGroup(prefix, tuple(_SuffixRow(tokens, tuple(members)) for tokens, members in rows.items()))
        for prefix, rows in grouped.items()
    ]


def _batches(groups: list[_PrefixGroup], batch_size: int) -> list[list[_PrefixGroup]]:
    """Groups in batches of at most `batch_size` suffix rows, longest prefixes first.

    Sequences without a prefix (a one-token context) are batched apart: they need no cache.
    """
    order = sorted(groups, key=lambda g: (not g.prefix, -len(g.prefix), -max(len(r.tokens) for r in g.rows)))
    out: list[list[_PrefixGroup]] = []
    rows = 0
    for group in order:
        if out and rows + len(group.rows) <= batch_size and bool(out[-1][0].prefix) == bool(group.prefix):
            out[-1].append(group)
            rows += len(group.rows)
        else:
            out.append([group])
            rows = len(group.rows)
    return out


def _pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids [B, L] (right-padded, or left-padded with `left`) and their attention mask, on
    `device` (laid out on the host, moved once)."""
    length = max(len(r) for r in rows)
    host = torch.device("cpu")
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=host)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=host)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long, device=host)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _score_batch(
    model: PeftModel | PreTrainedModel,
    groups: list[_PrefixGroup],
    sequences: Sequence[Encoded],
    pad_id: int,
    out: np.ndarray,
) -> None:
    """Continuation log-likelihoods of every sequence in `groups`, written into `out`.

    The prefixes run once, left-padded as in batched generation (so each prefix's last token is
    the cache's last slot and sliding-window layers see true distances), keeping their key/value
    cache; the cache rows are repeated for each suffix row, and the suffixes (right-padded) run
    on top with positions continuing from each prefix's real length. The LM head runs only at
    the suffix positions, i.e. at the positions that predict continuation tokens.
    """
    decoder = decoder_of(model)
    device = model_device(model)
    rows = [(g, row) for g, group in enumerate(groups) for row in group.rows]
    suffix_ids, suffix_mask = _pad([row.tokens for _, row in rows], pad_id, device)
    length = suffix_ids.shape[1]
    if groups[0].prefix:
        prefix_ids, prefix_mask = _pad([group.prefix for group in groups], pad_id, device, left=True)
        prefix_positions = (prefix_mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = decoder(
            input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=prefix_positions, use_cache=True
        ).past_key_values
        of_row = torch.tensor([g for g, _ in rows], dtype=torch.long, device=device)
        cache.reorder_cache(of_row)
        attention = torch.cat([prefix_mask[of_row], suffix_mask], dim=1)
        positions = prefix_mask.sum(dim=1)[of_row].unsqueeze(1) + torch.arange(length, device=device)
        hidden = decoder(
            input_ids=suffix_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
    else:
        positions = torch.arange(length, device=device).expand(len(rows), length)
        hidden = decoder(
            input_ids=suffix_ids, attention_mask=suffix_mask, position_ids=positions, use_cache=False
        ).last_hidden_state
    logprobs = torch.log_softmax(head_logits(model, hidden[suffix_mask.bool().to(hidden.device)]), dim=-1)
    starts = np.concatenate([[0], np.cumsum([len(row.tokens) for _, row in rows])[:-1]])
    where: list[int] = []
    targets: list[int] = []
    owner: list[int] = []
    for (_, row), start in zip(rows, starts, strict=True):
        for i in row.members:
            seq = sequences[i]
            where += range(int(start), int(start) + seq.n_target)
            targets += seq.input_ids[seq.n_context :]
            owner += [i] * seq.n_target
    on_device = logprobs.device
    picked = logprobs[torch.tensor(where, device=on_device), torch.tensor(targets, device=on_device)]
    members = sorted({i for _, row in rows for i in row.members})
    index = {i: k for k, i in enumerate(members)}
    # Summed in float64 on the host (MPS has no float64): exactly the sums of the float32 terms.
    owners = np.asarray([index[i] for i in owner], dtype=np.int64)
    out[members] = np.bincount(owners, weights=to_numpy(picked).astype(np.float64), minlength=len(members))


@torch.no_grad()
def sequence_loglikelihoods(
    model: PeftModel | PreTrainedModel,
    sequences: Sequence[Encoded],
    pad_id: int,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Summed log-likelihood of each sequence's continuation tokens, float64 [N].

    The choices of a question share their context, so it runs once per question (its key/value
    cache reused by every choice; `_prefix_groups`) and each choice runs only its continuation:
    for ARC's 4 choices of ~6 tokens after a ~45-token context, ~70 tokens go through the model
    instead of ~200. Single-token continuations of one context (CommonsenseQA's " A" ... " E")
    share one position, as lm-eval's one-token cache does. `batch_size` bounds the suffix rows
    per forward.
    """
    was_training = model.training
    model.eval()
    out = np.zeros(len(sequences), dtype=np.float64)
    plan = _batches(_prefix_groups(sequences), batch_size)
    for b, groups in enumerate(plan):
        _score_batch(model, groups, sequences, pad_id, out)
        if on_batch is not None:
            on_batch(b + 1, len(plan))
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
    """Zero-shot accuracy of a model on multiple-choice requests.

    Long sequences lose tokens on the left as lm-eval cuts them: to `max_length` tokens of
    context+continuation, by default `scoring_length(model, tokenizer)`.
    """
    if max_length is None:
        max_length = scoring_length(model, tokenizer)
    encoded = (
        requests
        if isinstance(requests, EncodedRequests)
        else encode_requests(tokenizer, requests, add_bos=add_bos, max_length=max_length)
    )
    if not encoded.requests:
        raise ValueError("no questions to evaluate")
    lls = sequence_loglikelihoods(model, encoded.sequences, encoding.pad_id(tokenizer), batch_size, on_batch)
    return score(encoded, lls)
