"""Token sequences split into a context and a scored continuation, batched with right padding.

Training (loss on answer tokens only), distillation and evaluation all work on the same unit: a
context followed by a continuation whose tokens carry a loss or a score. The split follows
lm-evaluation-harness exactly, so that a model scores here what it scores there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.errors import FedcollmError


class EncodingError(FedcollmError, ValueError):
    """A text that cannot become a training or scoring sequence (e.g. longer than `max_length`)."""


@dataclass(frozen=True)
class Encoded:
    """One sequence: `input_ids[n_context:]` are the continuation tokens that carry loss/score."""

    input_ids: tuple[int, ...]
    n_context: int

    @property
    def n_target(self) -> int:
        return len(self.input_ids) - self.n_context

    @property
    def answer_ids(self) -> tuple[int, ...]:
        """The continuation's tokens (those that carry a loss or a score)."""
        return self.input_ids[self.n_context :]


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    context: str,
    continuation: str,
    *,
    add_bos: bool = False,
    max_length: int | None = None,
) -> Encoded:
    """Encode context+continuation the way lm-evaluation-harness does (`_encode_pair`).

    Trailing spaces of the context move to the continuation; the whole string is encoded once
    and the continuation is what follows the context's own encoding, so merges across the
    boundary are kept. Sequences longer than `max_length` lose tokens on the left, as lm-eval
    truncates; the continuation is always kept whole.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        whole = [tokenizer.bos_token_id, *whole]
        ctx = [tokenizer.bos_token_id, *ctx]
    n_context = len(ctx)
    if n_context == 0:
        # lm-eval scores an empty context after a prefix token (EOT); do the same.
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        whole, n_context = [prefix, *whole], 1
    if n_context >= len(whole):
        raise EncodingError(f"continuation {continuation!r} encodes to no tokens after its context")
    if max_length is not None and len(whole) > max_length:
        cut = len(whole) - max_length
        if cut >= n_context:
            raise EncodingError(
                f"continuation of {len(whole) - n_context} tokens does not fit max_length={max_length} "
                "(train.max_length)"
            )
        whole, n_context = whole[cut:], n_context - cut
    return Encoded(tuple(int(t) for t in whole), n_context)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads a batch: the tokenizer's pad token, else 0.

    Padded positions are masked out of attention and never carry a target, so the value only
    has to be a valid id; `load_tokenizer` sets the pad token to EOS where a tokenizer has none.
    """
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


@dataclass
class Batch:
    """Right-padded token ids and a mask of the positions whose *next* token is a target."""

    input_ids: torch.Tensor  # [B, L] long, on the device of the model it is for
    attention_mask: torch.Tensor  # [B, L] long
    predict_mask: torch.Tensor  # [B, L] bool: position i predicts target token i+1
    targets: torch.Tensor  # [P] long: the target tokens, row-major over predict_mask
    rows: torch.Tensor  # [P] long: the batch row of each target

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())


def collate(items: Sequence[Encoded], pad_id: int, *, device: torch.device | str) -> Batch:
    """Batch sequences with right padding (positions stay 0..n-1, as in an unpadded pass), on
    `device` (the model's: `fedcollm.lm.devices.model_device`).

    The batch is laid out on the host and moved once: a few small copies, not one per row.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    length = max(len(e.input_ids) for e in items)
    host = torch.device("cpu")
    ids = torch.full((len(items), length), pad_id, dtype=torch.long, device=host)
    attention = torch.zeros((len(items), length), dtype=torch.long, device=host)
    predict = torch.zeros((len(items), length), dtype=torch.bool, device=host)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long, device=host)
        attention[row, :n] = 1
        predict[row, item.n_context - 1 : n - 1] = True
    shifted = torch.zeros_like(ids)
    shifted[:, :-1] = ids[:, 1:]
    rows = torch.arange(len(items), device=host).unsqueeze(1).expand_as(ids)
    parts = (ids, attention, predict, shifted[predict], rows[predict])
    return Batch(*(part.to(device) for part in parts))


def batches(items: Sized, batch_size: int, order: Sequence[int] | None = None) -> Iterator[list[int]]:
    """Yield index lists of consecutive batches over `items` in the given order."""
    index = list(range(len(items))) if order is None else list(order)
    for start in range(0, len(index), batch_size):
        yield index[start : start + batch_size]
