"""Conversations rendered for a model, with the loss on the response tokens only.

A tokenizer that has a chat template renders the conversation with it (transformers'
`apply_chat_template`): the prompt is the turns before the response with the generation prompt
added, the whole is every turn, and the response is what the whole adds to the prompt (the
response text and the template's end of turn). A tokenizer without one uses a named plain
template: `alpaca` (Stanford Alpaca's prompt, the FederatedScope-LLM and OpenFedLLM default for
instruction data) or `turns` (`User:` / `Assistant:` lines, for multi-turn chats). Either way the
result is an `Encoded` whose context is the prompt and whose continuation is the response, so
training's loss on continuation tokens is the loss on the response only.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.data.instructions import InstructionExample, Message
from fedcollm.lm.encoding import Encoded, EncodingError

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)


def _alpaca(prompt: Sequence[Message]) -> str:
    system = "".join(f"{m.content}\n\n" for m in prompt if m.role == "system")
    users = [m.content for m in prompt if m.role != "system"]
    if len(users) != 1 or prompt[-1].role != "user":
        raise EncodingError("the 'alpaca' template takes one instruction (one user turn)")
    return f"{system or ALPACA_HEADER}### Instruction:\n{users[0]}\n\n### Response:\n"


def _turns(prompt: Sequence[Message]) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "".join(f"{names[m.role]}: {m.content}\n" for m in prompt) + "Assistant:"


PLAIN_TEMPLATES = {"alpaca": _alpaca, "turns": _turns}
"""Prompt renderers for tokenizers without a chat template."""


def _with_template(tokenizer: PreTrainedTokenizerBase, example: InstructionExample) -> tuple[str, str]:
    turns = [{"role": m.role, "content": m.content} for m in example.messages]
    prompt = str(tokenizer.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True))
    whole = str(tokenizer.apply_chat_template(turns, tokenize=False))
    if not whole.startswith(prompt) or len(whole) == len(prompt):
        raise EncodingError(
            f"example {example.id!r}: the chat template does not render the conversation as its "
            "prompt followed by the response; set a plain template (alpaca, turns)"
        )
    return prompt, whole[len(prompt) :]


def render_chat(
    tokenizer: PreTrainedTokenizerBase, example: InstructionExample, plain: str = "alpaca"
) -> tuple[str, str]:
    """(prompt, response) as the model sees them: its chat template, else the `plain` template."""
    if tokenizer.chat_template:
        return _with_template(tokenizer, example)
    if plain not in PLAIN_TEMPLATES:
        raise EncodingError(f"unknown plain template {plain!r}; available: {', '.join(PLAIN_TEMPLATES)}")
    response = example.response
    if tokenizer.eos_token:
        response += tokenizer.eos_token  # the model learns to stop after its answer
    try:
        prompt = PLAIN_TEMPLATES[plain](example.prompt)
    except EncodingError as exc:
        raise EncodingError(
            f"example {example.id!r}: {exc} (the model has no chat template of its own: set "
            'task.plain_template = "turns")'
        ) from None
    return prompt, " " + response if plain == "turns" else response


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    example: InstructionExample,
    *,
    add_bos: bool,
    max_length: int | None = None,
    plain: str = "alpaca",
) -> Encoded:
    """The conversation as one training sequence: the loss-carrying tokens are the response's.

    Prompt and response are encoded apart and joined, so the boundary is exactly the prompt's
    end (lm-eval's `encode_pair` would move the prompt's trailing newline into the target). A
    chat template writes its own BOS into the text, so `add_bos` applies to plain templates
    only. A prompt longer than `max_length` loses tokens on the left; the response stays whole.
    """
    prompt, response = render_chat(tokenizer, example, plain)
    context = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if add_bos and not tokenizer.chat_template and tokenizer.bos_token_id is not None:
        context = [int(tokenizer.bos_token_id), *context]
    target = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if not target:
        raise EncodingError(f"example {example.id!r}: the response encodes to no tokens")
    if max_length is not None and len(context) + len(target) > max_length:
        keep = max_length - len(target)
        if keep < 1:
            raise EncodingError(
                f"example {example.id!r}: its response of {len(target)} tokens does not fit "
                f"max_length={max_length} (train.max_length)"
            )
        context = context[-keep:]
    return Encoded(tuple(int(t) for t in context + target), len(context))
