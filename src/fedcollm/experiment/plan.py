"""What an experiment will do, checked offline before anything trains (`fedcollm run --dry-run`).

Adapter sizes come from the model's configuration alone: the model is built on PyTorch's meta
device (no weights, no memory), LoRA is attached, and the parameters are counted. This needs only
`config.json` (offline alias, local folder, or a hub id already in the local HF cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from fedcollm.algorithms import ALGORITHMS, check_config
from fedcollm.config import ConfigError, ExperimentConfig, LoraConfig, build_config
from fedcollm.data import Partition
from fedcollm.experiment.setup import check_data, check_models
from fedcollm.lm.loading import ModelError, resolve_model
from fedcollm.lm.lora import LORA_TARGETS
from fedcollm.lm.precision import dtype_text, dtype_warning
from fedcollm.parties.data import ExperimentData


@dataclass(frozen=True)
class AdapterSize:
    """Parameters of the full base model and of its LoRA adapter (the paper's Table 3)."""

    full_params: int
    adapter_params: int

    @property
    def percent(self) -> float:
        return 100.0 * self.adapter_params / self.full_params


def adapter_size(model_config: PretrainedConfig, lora: LoraConfig) -> AdapterSize:
    """Count base and LoRA parameters of an architecture without materialising any weight."""
    targets = list(lora.target_modules) or LORA_TARGETS.get(model_config.model_type)
    if not targets:
        raise ModelError(f"no default LoRA targets for {model_config.model_type!r}; set lora.target_modules")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    full = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(
        model,
        PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; alpha / r is float math
            lora_dropout=lora.dropout,
            target_modules=targets,
        ),
    )
    adapter = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return AdapterSize(full, adapter)


def local_model_config(name: str) -> PretrainedConfig | None:
    """A model's configuration if it is available without the network, else None (a hub id
    not in the local cache). A name that can never load raises `ModelError`."""
    source = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise ModelError(f"model {name!r}: cannot read {Path(source) / 'config.json'}: {exc}") from None
        return None


def variant(base: ExperimentConfig, task: str, method: str) -> ExperimentConfig:
    """The base configuration with only the task and the algorithm changed (one run of a comparison).

    An evaluation split left unset stays unset, so each task is scored where lm-eval scores it
    (`ExperimentConfig.eval_split`); one that was set stays set.
    """
    data = base.model_dump(mode="json")
    data["algorithm"] = method
    data["task"]["name"] = task
    data["name"] = f"{base.name}-{task}-{method}"
    return build_config(data, f"{base.name} ({task}, {method})")


def with_seed(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    """`config` with another experiment seed, scored on the questions its own seed draws.

    The seed moves the partition, LoRA initialisation, shuffling and dropout; `eval.seed` is
    pinned to the original evaluation seed so the evaluation set stays the same. The original
    seed returns `config` itself (so runs made without seeds are reused).
    """
    if seed == config.seed:
        return config
    data = config.model_dump(mode="json")
    data["seed"] = seed
    data["eval"]["seed"] = config.eval_seed
    return build_config(data, f"{config.name} (seed {seed})")


def _run_of(config: ExperimentConfig, task: str, method: str) -> ExperimentConfig:
    """The experiment itself for its own task and algorithm, else its `variant`."""
    if (task, method) == (config.task.name, config.algorithm):
        return config
    return variant(config, task, method)


@dataclass(frozen=True)
class PlanLine:
    label: str
    value: str


def check_runs(
    config: ExperimentConfig,
    methods: Sequence[str],
    tasks: Sequence[str],
    *,
    secure_aggregation: bool = False,
) -> dict[str, ExperimentData]:
    """Everything a run of each (task, method) would refuse before training, checked offline.

    The algorithm's `check_config` (with `secure_aggregation`: as the engine that aggregates with
    SecAgg+ checks it), the data (every training and evaluation question, read and split as the
    run will), and every model name (it must resolve; a hub id need not be cached). Raises the
    error the run would raise. Returns each task's data, as the runs will split it.
    """
    runs = {(task, method): _run_of(config, task, method) for task in tasks for method in methods}
    for run in runs.values():
        check_config(run, secure_aggregation=secure_aggregation)
    loaded = {}
    for task in tasks:
        data = loaded[task] = ExperimentData.load(runs[task, methods[0]])
        for method in methods:
            check_data(ALGORITHMS[method], runs[task, method], data)
    check_models(config, [ALGORITHMS[method] for method in methods])
    return loaded


def split_text(split: Partition) -> str:
    """Who holds how many training questions: ``server 200, clients 629 / 94 / 84 / 27``."""
    return f"server {len(split.aux)}, clients " + " / ".join(str(len(shard)) for shard in split.clients)


def plan(
    config: ExperimentConfig,
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    *,
    secure_aggregation: bool = False,
) -> list[PlanLine]:
    """The plan of a run (or comparison), raising what a run would raise on what cannot work.

    `secure_aggregation`: the run aggregates with SecAgg+ (`--engine flower --secagg`).
    """
    methods = list(methods or [config.algorithm])
    tasks = list(tasks or [config.task.name])
    unknown = sorted(set(methods) - set(ALGORITHMS))
    if unknown:
        raise ConfigError(
            f"unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(ALGORITHMS))}"
        )
    loaded = check_runs(config, methods, tasks, secure_aggregation=secure_aggregation)
    fed = config.federation
    lines = [
        PlanLine("methods", ", ".join(methods)),
        PlanLine("tasks", ", ".join(tasks) + f" (format {config.task.format}, source {config.task.source})"),
        PlanLine("rounds", str(fed.rounds)),
        PlanLine(
            "clients",
            f"{fed.num_clients} ({config.task.partition} split"
            + (f" by {config.task.partition_field}" if config.task.partition == "field" else "")
            + ", "
            f"{config.task.aux_fraction:.0%} of the training questions to the server)",
        ),
        *(PlanLine(f"{task} split", split_text(data.split)) for task, data in loaded.items()),
        PlanLine("evaluation", f"{config.eval_split}, {config.eval.limit or 'all'} questions"),
        PlanLine("dtype", f"base models in {dtype_text(config.dtype)}, adapters in float32"),
        *([PlanLine("warning", warning)] if (warning := dtype_warning(config.dtype)) else []),
    ]
    roles = [("slm", config.slm)] + ([("llm", config.llm)] if config.llm is not None else [])
    for role, model in roles:
        model_config = local_model_config(model.name)
        if model_config is None:
            size = "config not available offline (size unknown until downloaded)"
        else:
            s = adapter_size(model_config, model.lora)
            size = (
                f"{s.full_params / 1e6:.1f} M params, "
                f"adapter {s.adapter_params / 1e6:.3f} M ({s.percent:.2f}%)"
            )
        lines.append(PlanLine(role, f"{model.name}: {size}"))
    return lines


__all__ = ["AdapterSize", "PlanLine", "adapter_size", "check_runs", "local_model_config", "plan", "variant"]
