"""A run folder and what goes into it: the resolved config, metrics, communication, adapters.

Layout of `<out>/`:
- `config.toml`          the resolved configuration (every default spelled out)
- `metrics.jsonl`        one JSON object per line: round, role, client, metric, value
- `questions/`           per evaluation (model, round), one line per question: gold, predictions,
                         every choice's log-likelihood and length (`fedcollm.evaluation.records`)
- `communication.json`   parameters and bytes each way per round, and their share of the model
- `adapters/slm`, `adapters/llm`   final adapters in peft format
- `results.md`           accuracy before and after, per model
- `tensorboard/`         with `report_to = ["tensorboard"]`: step losses and round metrics as
                         TensorBoard event files (`fedcollm.experiment.tracking`)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcollm.config import ExperimentConfig
from fedcollm.errors import FedcollmError
from fedcollm.evaluation.records import (
    QUESTIONS_DIR,
    GenerationSet,
    QuestionSet,
    read_generation_sets,
    read_question_sets,
    write_records,
)
from fedcollm.experiment.paired import (
    PairedResult,
    before_after,
    format_p,
    format_points,
    format_sign_flip_p,
    generation_before_after,
)
from fedcollm.experiment.tracking import TENSORBOARD_DIR, tracker_for, tracking_reporter
from fedcollm.lm.lora import count_base_parameters, save_adapter
from fedcollm.lm.precision import dtype_text
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import Arrays, ClientReply, Metric, Payload, Reporter

if TYPE_CHECKING:
    from fedcollm.algorithms import Algorithm


class RunFolderError(FedcollmError, ValueError):
    """The output folder holds something we must not overwrite."""


def _array_bytes(arrays: Arrays) -> tuple[int, int]:
    params = sum(int(a.size) for a in arrays.values())
    return params, sum(int(a.nbytes) for a in arrays.values())


@dataclass
class CommunicationLedger:
    """Parameters and bytes sent each way, per round and client."""

    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add(self, rnd: int, payload: Payload, replies: Sequence[ClientReply]) -> None:
        down_params, down_bytes = _array_bytes(payload.arrays)
        entry = self.rounds.setdefault(
            rnd,
            {
                "round": rnd,
                "clients": 0,
                "down_params": 0,
                "down_bytes": 0,
                "up_params": 0,
                "up_bytes": 0,
            },
        )
        for reply in replies:
            up_params, up_bytes = _array_bytes(reply.arrays)
            entry["clients"] += 1
            entry["down_params"] += down_params
            entry["down_bytes"] += down_bytes
            entry["up_params"] += up_params
            entry["up_bytes"] += up_bytes

    def summary(self, full_model_params: int, adapter_params: int) -> dict[str, Any]:
        rounds = [self.rounds[r] for r in sorted(self.rounds)]
        return {
            "full_model_params": full_model_params,
            "adapter_params": adapter_params,
            "adapter_share_percent": 100.0 * adapter_params / full_model_params
            if full_model_params
            else None,
            "table3": {
                "full_model_params_M": full_model_params / 1e6,
                "transmitted_params_M": adapter_params / 1e6,
                "param_percent": 100.0 * adapter_params / full_model_params if full_model_params else None,
            },
            "rounds": rounds,
            "total_bytes": sum(r["down_bytes"] + r["up_bytes"] for r in rounds),
        }


class RunRecorder:
    """Writes a run folder as the run goes (metrics are flushed line by line)."""

    def __init__(
        self, out: Path, config: ExperimentConfig, overwrite: bool = False, resume: bool = False
    ) -> None:
        self.out = out
        self.config = config
        self.metrics: list[Metric] = []
        self.ledger = CommunicationLedger()
        self.instance = uuid.uuid4().hex
        """This run's identity, kept across resumes (in checkpoints): what clients that checkpoint
        their own state (Flower's SuperNodes) bind it to, so no other run's state is used."""
        existing = out / "config.toml"
        if existing.exists() and not overwrite:
            if existing.read_text(encoding="utf-8") != config.to_toml():
                raise RunFolderError(
                    f"output folder {out} already holds a run of a different experiment (its config.toml "
                    "differs); pass --overwrite to replace it or choose another --out"
                )
            if not resume:
                raise RunFolderError(
                    f"output folder {out} already holds a run of this experiment; pass --resume {out} "
                    "to continue it, --overwrite to start again, or choose another --out"
                )
        out.mkdir(parents=True, exist_ok=True)
        continuing = resume and existing.exists()
        if not continuing:
            (out / "metrics.jsonl").write_text("", encoding="utf-8")
            shutil.rmtree(out / QUESTIONS_DIR, ignore_errors=True)
            shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
            _atomic_write(existing, config.to_toml())
        self.tracker = tracker_for(config, out, resume=continuing)

    def reporter(self, reporter: Reporter, party: str) -> Reporter:
        """`reporter`, also sending the loss of each optimiser step of `party` (`server`,
        `client-K`) to the trackers `report_to` asks for; unchanged without one."""
        return tracking_reporter(reporter, self.tracker, party)

    def record_questions(self, sets: Iterable[QuestionSet | GenerationSet]) -> None:
        """Write per-question records (one file per evaluation; a resumed run rewrites its own)."""
        write_records(self.out, sets)

    def snapshot(self) -> dict[str, Any]:
        """Metrics and communication so far, as JSON-able data (for checkpoints)."""
        snapshot: dict[str, Any] = {
            "metrics": [m.as_dict() for m in self.metrics],
            "communication": [self.ledger.rounds[r] for r in sorted(self.ledger.rounds)],
            "instance": self.instance,
        }
        if self.tracker is not None:
            snapshot["tracking"] = self.tracker.state()
        return snapshot

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Continue from a `snapshot`: metrics.jsonl is rewritten to hold exactly its metrics."""
        self.metrics = [Metric(**line) for line in snapshot["metrics"]]
        self.ledger = CommunicationLedger({int(e["round"]): dict(e) for e in snapshot["communication"]})
        self.instance = str(snapshot.get("instance", self.instance))
        _atomic_write(
            self.out / "metrics.jsonl", "".join(json.dumps(m.as_dict()) + "\n" for m in self.metrics)
        )
        if self.tracker is not None:
            self.tracker.restore(snapshot.get("tracking", {}), self.metrics)

    def record(self, metrics: Iterable[Metric]) -> None:
        new = list(metrics)
        self.metrics += new
        with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as fh:
            for metric in new:
                fh.write(json.dumps(metric.as_dict()) + "\n")
        if self.tracker is not None:
            self.tracker.log_metrics(new)

    def record_exchange(self, rnd: int, payload: Payload, replies: Sequence[ClientReply]) -> None:
        self.ledger.add(rnd, payload, replies)
        self.record(
            [Metric(rnd, "client", r.client, "num_examples", float(r.num_examples)) for r in replies]
            + [
                Metric(rnd, "client", reply.client, key, float(value))
                for reply in replies
                for key, value in reply.metrics.items()
            ]
        )

    def finish(self, algorithm: Algorithm, server: ServerRuntime) -> None:
        """Save the final adapters, write communication.json and results.md, close the trackers."""
        save_adapter(server.slm.model, self.out / "adapters" / "slm", server.global_adapter)
        if server.llm is not None:
            save_adapter(server.llm.model, self.out / "adapters" / "llm")
        adapter_params = sum(int(np.prod(a.shape)) for a in server.global_adapter.values())
        summary = self.ledger.summary(count_base_parameters(server.slm.model), adapter_params)
        summary["slm"] = server.slm.name
        summary |= algorithm.communication_extra(server)
        _atomic_write(self.out / "communication.json", json.dumps(summary, indent=2))
        records: list[QuestionSet | GenerationSet] = [
            *read_question_sets(self.out),
            *read_generation_sets(self.out),
        ]
        results = results_markdown(self.config, self.metrics, summary, records)
        extra = algorithm.results_extra(self.metrics, summary)
        _atomic_write(self.out / "results.md", results + "\n".join(extra) + ("\n" if extra else ""))
        if self.tracker is not None:
            self.tracker.close()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _accuracy(metrics: Sequence[Metric], role: str, rnd: int, key: str) -> float | None:
    for m in metrics:
        if m.role == role and m.round == rnd and m.metric == key and m.client is None:
            return m.value
    return None


MULTIPLE_CHOICE_METRICS = ("acc", "acc_norm")
GENERATION_METRICS = ("exact_match", "f1", "rouge_l")


def results_markdown(
    config: ExperimentConfig,
    metrics: Sequence[Metric],
    comm: dict[str, Any],
    question_sets: Sequence[QuestionSet | GenerationSet] = (),
) -> str:
    """Each model's scores before training and after the last round as a markdown table (acc and
    acc_norm; for answers written in free text, exact match, token F1 and Rouge-L), and from the
    per-question records each model's after − before on the same questions."""
    generated = any(m.metric == "exact_match" for m in metrics)
    keys = GENERATION_METRICS if generated else MULTIPLE_CHOICE_METRICS
    evaluated = sorted({m.round for m in metrics if m.metric == keys[0]})
    last = evaluated[-1] if evaluated else 0
    header = " | ".join(f"{key} before | {key} after" for key in keys)
    lines = [
        f"# {config.name}: {config.algorithm} on {config.task.name}",
        "",
        f"{config.federation.num_clients} clients, {config.federation.rounds} rounds, "
        f"evaluation on {config.task.eval_data or config.eval_split} (n = {_n(metrics)}), "
        f"seed {config.seed}, base models in {dtype_text(config.dtype)}.",
        "",
        f"| model | name | {header} |",
        "|---|---|" + "---|" * (2 * len(keys)),
    ]
    names = {"slm": config.slm.name, "llm": config.llm.name if config.llm else "-"}
    for role in ("slm", "llm"):
        if _accuracy(metrics, role, 0, keys[0]) is None:
            continue
        cells = []
        for key in keys:
            for rnd in (0, last):
                value = _accuracy(metrics, role, rnd, key)
                err = _accuracy(metrics, role, rnd, f"{key}_stderr")
                cells.append(
                    f"{100 * value:.1f} ± {100 * err:.1f}" if value is not None and err is not None else "-"
                )
        lines.append(f"| {role.upper()} | {names[role]} | " + " | ".join(cells) + " |")
    lines += _local_lines(metrics, keys, last)
    if generated:
        lines += _generation_before_after_lines(
            [s for s in question_sets if isinstance(s, GenerationSet)], last
        )
    else:
        lines += _before_after_lines([s for s in question_sets if isinstance(s, QuestionSet)], last)
    table3 = comm["table3"]
    lines += [
        "",
        f"Communication: {table3['transmitted_params_M']:.3f} M adapter parameters per message, "
        f"{table3['param_percent']:.3f}% of the {table3['full_model_params_M']:.1f} M-parameter SLM; "
        f"{comm['total_bytes'] / 1e6:.1f} MB in total over the run.",
        "",
    ]
    lines += _privacy_lines(metrics)
    return "\n".join(lines)


def _local_lines(metrics: Sequence[Metric], keys: Sequence[str], last: int) -> list[str]:
    """The SLM on the clients' own evaluation files (`task.client_eval`): each client's scores and
    their mean, before training and after the last round; nothing without such files."""
    local = [m for m in metrics if m.role == "slm" and m.metric.startswith("local_")]
    if not local:
        return []

    def value(client: int | None, rnd: int, key: str) -> str:
        found = [
            m.value for m in local if m.client == client and m.round == rnd and m.metric == f"local_{key}"
        ]
        return f"{100 * found[0]:.1f}" if found else "-"

    header = " | ".join(f"{key} before | {key} after" for key in keys)
    clients = sorted({m.client for m in local if m.client is not None})
    rows = [
        f"| {'mean over clients' if client is None else f'client {client}'} | "
        + " | ".join(f"{value(client, 0, key)} | {value(client, last, key)}" for key in keys)
        + " |"
        for client in [None, *clients]
    ]
    return [
        "",
        "The SLM each client holds, scored by the client on its own evaluation file "
        "(task.client_eval; only these scores left the sites):",
        "",
        f"| clients' own files | {header} |",
        "|---|" + "---|" * (2 * len(keys)),
        *rows,
    ]


def _generation_before_after_lines(sets: Sequence[GenerationSet], last: int) -> list[str]:
    """The paired after − before table for generated answers, or nothing without records."""
    rows = []
    for role in ("slm", "llm"):
        found = generation_before_after(sets, role, last)
        if found is None:
            continue
        first = found["exact_match"]
        cells = [role.upper(), str(first.n)]
        for metric in GENERATION_METRICS:
            result = found[metric]
            if isinstance(result, PairedResult):
                several = len(result.tests) > 1
                p = format_p(result.p) + (
                    f" (largest of {len(result.tests)})" if several else ""
                ) + f", b/c {result.b}/{result.c}"
            else:
                p = format_sign_flip_p(result.p)
            cells += [
                format_points(result.delta),
                f"[{format_points(result.ci_low)}, {format_points(result.ci_high)}]",
                p,
            ]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        f"After round {last} − before training, on the same examples: Δ in points, 95 % paired "
        "bootstrap interval, and p: exact McNemar for exact match (b = examples right only after, "
        "c = right only before), sign-flip permutation test for token F1 and Rouge-L "
        "(docs/statistics.md).",
        "",
        "| model | n | Δ exact_match | 95 % CI | p | Δ f1 | 95 % CI | p | Δ rouge_l | 95 % CI | p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def _privacy_lines(metrics: Sequence[Metric]) -> list[str]:
    """The privacy spent, where central DP ran: ε per round and its settings."""
    spent = sorted((m for m in metrics if m.metric == "dp_epsilon"), key=lambda m: m.round)
    if not spent:
        return []
    per_round = ", ".join(f"round {m.round}: {m.value:.3g}" for m in spent)
    return [
        f"Differential privacy: ε = {spent[-1].value:.3g} after round {spent[-1].round} ({per_round}); "
        f"{spent[-1].note}.",
        "",
    ]


def _before_after_lines(question_sets: Sequence[QuestionSet], last: int) -> list[str]:
    """The paired after − before table (`fedcollm.experiment.paired.before_after`), or nothing
    when no role has records of both rounds."""
    rows = []
    for role in ("slm", "llm"):
        found = before_after(question_sets, role, last)
        if found is None:
            continue
        cells = [role.upper(), str(found[0].n)]
        for result in found:
            several = len(result.tests) > 1
            cells += [
                format_points(result.delta),
                f"[{format_points(result.ci_low)}, {format_points(result.ci_high)}]",
                format_p(result.p) + (f" (largest of {len(result.tests)})" if several else ""),
                f"{result.b}/{result.c}",
            ]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        f"After round {last} − before training, on the same questions: Δ in points, 95 % paired "
        "bootstrap interval, exact McNemar p (b = questions right only after, c = right only before; "
        "with one SLM per client, p is the largest of the per-client tests and b/c their sums; "
        "docs/statistics.md).",
        "",
        "| model | n | Δ acc | acc 95 % CI | acc McNemar p | acc b/c "
        "| Δ acc_norm | acc_norm 95 % CI | acc_norm McNemar p | acc_norm b/c |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def _n(metrics: Sequence[Metric]) -> int:
    for m in metrics:
        if m.metric == "n":
            return int(m.value)
    return 0
