"""What an experiment will do, checked offline before anything trains (`fedcollm run --dry-run`).

Adapter sizes and the memory plan come from the models' configurations alone
(`fedcollm.experiment.sizes`, `fedcollm.experiment.memory`); the checks are the ones every run
makes before it loads a weight (`fedcollm.experiment.setup`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedcollm.algorithms import ALGORITHMS, check_config
from fedcollm.config import ConfigError, ExperimentConfig, build_config
from fedcollm.data import DataError
from fedcollm.experiment.memory import DeviceMemory, memory_plan, placed_device, refuse_what_does_not_fit
from fedcollm.experiment.setup import check_data, check_models
from fedcollm.experiment.sizes import AdapterSize, adapter_size, local_model_config
from fedcollm.lm.devices import available_devices
from fedcollm.lm.precision import dtype_text, dtype_warning
from fedcollm.parties.data import ExperimentData


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


def split_text(data: ExperimentData) -> str:
    """Who holds how many training examples: ``server 200, clients 629 / 94 / 84 / 27``."""
    server = f"server {len(data.aux_records())}" + (" (task.aux_data)" if data.aux is not None else "")
    if not data.split.clients:
        return f'{server}, clients: each its own file (task.client_source = "files")'
    return f"{server}, clients " + " / ".join(str(len(shard)) for shard in data.split.clients)


def _clients_text(config: ExperimentConfig) -> str:
    task, fed = config.task, config.federation
    share = f"{task.aux_fraction:.0%}"
    if task.client_source == "files":
        where = (
            "task.client_data, or each SuperNode's data-path"
            if task.client_data
            else "each SuperNode's data-path"
        )
        return f"{fed.num_clients} (each its own file: {where}; {share} of the training split to the server)"
    by = f" by {task.partition_field}" if task.partition == "field" else ""
    return f"{fed.num_clients} ({task.partition} split{by}, {share} of the training questions to the server)"


def _client_file_lines(config: ExperimentConfig, data: ExperimentData) -> list[PlanLine]:
    """Each client file of `task.client_data`, read and checked as the run will: its size, or
    why the run would leave that client out."""
    lines = []
    for k, path in enumerate(config.task.client_data):
        try:
            text = f"{path}: {len(data.client_records(config, k))} {data.family.record_name}s"
        except DataError as exc:
            text = f"refused, the run goes on without it only if robustness.min_clients allows: {exc}"
        lines.append(PlanLine(f"client {k}", text))
    for k, path in enumerate(config.task.client_eval_data):
        try:
            size = len(data.client_eval_records(config, k))
            text = f"{path}: {size} {data.family.record_name}s to evaluate on"
        except DataError as exc:
            text = f"refused, the run goes on without it only if robustness.min_clients allows: {exc}"
        lines.append(PlanLine(f"client {k} evaluation", text))
    return lines


def plan(
    config: ExperimentConfig,
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    *,
    secure_aggregation: bool = False,
    devices: Sequence[str] | None = None,
    capacities: Mapping[str, int | None] | None = None,
) -> list[PlanLine]:
    """The plan of a run (or comparison), raising what a run would raise on what cannot work.

    `secure_aggregation`: the run aggregates with SecAgg+ (`--engine flower --secagg`).
    `devices` and `capacities` stand for this machine's devices and their memory (a plan for
    another machine; tests): a method whose memory plan does not fit raises `MemoryPlanError`.
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
        PlanLine("clients", _clients_text(config)),
        *(PlanLine(f"{task} split", split_text(data)) for task, data in loaded.items()),
        *_client_file_lines(config, loaded[tasks[0]]),
        PlanLine("evaluation", f"{config.eval_split}, {config.eval.limit or 'all'} questions"),
    ]
    uses_llm = any(ALGORITHMS[method].uses_llm for method in methods)
    roles = [("slm", config.slm)] + ([("llm", config.llm)] if config.llm is not None and uses_llm else [])
    placed = {
        role: placed_device(config, model, role, devices or available_devices()) for role, model in roles
    }
    for role, model in roles:
        where = torch.device(placed[role])
        storage = "" if model.quantization == "none" else f", weights {model.quantization}"
        lines.append(PlanLine(f"{role} on", f"{where} in {dtype_text(config.dtype, where)}{storage}"))
        warning = dtype_warning(config.dtype, where)
        if warning:
            lines.append(PlanLine("warning", warning))
    lines.append(PlanLine("adapters", "float32 (weights, gradients, AdamW state)"))
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
    lines += _memory_lines(config, methods, loaded[tasks[0]], devices, capacities)
    return lines


def _memory_lines(
    config: ExperimentConfig,
    methods: Sequence[str],
    data: ExperimentData,
    devices: Sequence[str] | None,
    capacities: Mapping[str, int | None] | None,
) -> list[PlanLine]:
    """Per device, the largest estimated peak over the methods; refused where one does not fit."""
    largest: dict[str, DeviceMemory] = {}
    unknown: set[str] = set()
    for method in methods:
        run = _run_of(config, config.task.name, method)
        memory, missing = memory_plan(run, ALGORITHMS[method], data, devices=devices, capacities=capacities)
        unknown.update(missing)
        refuse_what_does_not_fit(memory)
        for device in memory:
            if device.device not in largest or device.peak > largest[device.device].peak:
                largest[device.device] = device
    lines = [PlanLine(f"memory {device}", plan.text()) for device, plan in largest.items()]
    if unknown:
        lines.append(
            PlanLine("memory", f"not estimated for {', '.join(sorted(unknown))} (no config offline)")
        )
    return lines


__all__ = ["AdapterSize", "PlanLine", "adapter_size", "check_runs", "local_model_config", "plan", "variant"]
