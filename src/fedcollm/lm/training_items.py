"""Any training item as one sequence in a model's tokenisation: a context, then the target tokens
that carry the loss (and that distillation and knowledge transfer compare across models).

- a multiple-choice question (`MCRequest`): its context and gold continuation, split as
  lm-evaluation-harness splits them (`encode_pair`);
- a plain-text pair (`TextPair`, a short-answer question): its prompt and target, split the same way;
- a conversation (`InstructionExample`): rendered with the model's own chat template, or the
  named plain template where it has none (`fedcollm.lm.chat`), the loss on the response only.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.data import MCRequest
from fedcollm.data.generative import TextPair, TrainItem
from fedcollm.lm.chat import encode_chat
from fedcollm.lm.encoding import Encoded, encode_pair


def encode_item(
    tokenizer: PreTrainedTokenizerBase,
    item: TrainItem,
    *,
    add_bos: bool,
    max_length: int | None,
    plain: str = "alpaca",
) -> Encoded:
    """One training sequence for `item` (see the module docstring)."""
    if isinstance(item, MCRequest):
        return encode_pair(
            tokenizer, item.context, item.continuations[item.gold], add_bos=add_bos, max_length=max_length
        )
    if isinstance(item, TextPair):
        return encode_pair(tokenizer, item.prompt, item.target, add_bos=add_bos, max_length=max_length)
    return encode_chat(tokenizer, item, add_bos=add_bos, max_length=max_length, plain=plain)


def encode_sft(
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[TrainItem],
    *,
    add_bos: bool,
    max_length: int,
    plain: str = "alpaca",
) -> list[Encoded]:
    """Training sequences for `items`, in order."""
    return [
        encode_item(tokenizer, item, add_bos=add_bos, max_length=max_length, plain=plain) for item in items
    ]
