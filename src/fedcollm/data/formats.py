"""Named prompt formats and ``render``: question -> the request a language model scores."""

from dataclasses import dataclass
from typing import Protocol

from fedcollm.data.errors import DataError
from fedcollm.data.tasks import TaskSpec, get_task
from fedcollm.data.templates import PromptTemplate, QuestionAnswerTemplate
from fedcollm.data.types import MCQuestion, MCRequest


class PromptFormat(Protocol):
    """Chooses the prompt template for a task."""

    @property
    def description(self) -> str:
        """One line for listings of the available choices."""
        ...

    def template_for(self, task: TaskSpec) -> PromptTemplate:
        """The template this format uses for ``task``."""
        ...


@dataclass(frozen=True)
class LmEvalFormat:
    """Each task's own lm-evaluation-harness 0.4 prompt, so scores compare with lm-eval's."""

    description: str = "lm-evaluation-harness 0.4 task YAMLs (per-task prompts)"

    def template_for(self, task: TaskSpec) -> PromptTemplate:
        """The task's lm-eval template, stored on its spec."""
        return task.lm_eval_template


@dataclass(frozen=True)
class UniformFormat:
    """One template for every task (e.g. OLMES' cloze "answer text" style)."""

    template: PromptTemplate
    description: str

    def template_for(self, task: TaskSpec) -> PromptTemplate:
        """The same template regardless of task."""
        return self.template


FORMATS: dict[str, PromptFormat] = {
    "lm_eval": LmEvalFormat(),
    "answer_text": UniformFormat(
        template=QuestionAnswerTemplate(),
        description='OLMES cloze style: "Question: {question}\\nAnswer:" + " " + answer text',
    ),
}


def get_format(name: str) -> PromptFormat:
    """Look up a format, raising DataError listing the available formats if it is unknown."""
    try:
        return FORMATS[name]
    except KeyError:
        raise DataError(f"unknown prompt format {name!r}; available formats: {', '.join(FORMATS)}") from None


def render(task: str, question: MCQuestion, fmt: str = "lm_eval") -> MCRequest:
    """Render ``question`` of ``task`` in prompt format ``fmt``.

    The task matters because lm-eval prompts each benchmark differently (ARC wraps the
    question, OpenBookQA uses the bare stem, CommonsenseQA scores option letters).
    """
    spec = get_task(task)
    return get_format(fmt).template_for(spec).build(question)
