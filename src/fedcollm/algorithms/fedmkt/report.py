"""FedMKT's communication report: knowledge-set traffic against the paper's N*S*K accounting,
and the lines it adds to results.md (each client's own SLM, rejected uploads, traffic)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedcollm.algorithms.fedmkt.knowledge import KnowledgeSet, dense_reference_bytes
from fedcollm.config import ExperimentConfig
from fedcollm.lm.encoding import Encoded
from fedcollm.protocol import Metric


def round_traffic(
    config: ExperimentConfig, rnd: int, accepted: int, up_bytes: int, server_set: KnowledgeSet
) -> dict[str, Any]:
    """One round's knowledge-set bytes each way, and the paper's dense N*S*K size of one set."""
    dense = dense_reference_bytes(len(server_set), config.train.max_length, config.fedmkt.top_k)
    return {
        "round": rnd,
        "up_sets": accepted,
        "up_bytes": up_bytes,
        "down_bytes_per_client": server_set.nbytes,
        "down_bytes": server_set.nbytes * config.federation.num_clients,
        "dense_bytes_per_set": dense,
    }


def traffic_metrics(entry: dict[str, Any]) -> list[Metric]:
    """A round's traffic as metrics.jsonl lines (role "server")."""
    rnd = int(entry["round"])
    return [
        Metric(rnd, "server", None, "knowledge_up_bytes", float(entry["up_bytes"])),
        Metric(rnd, "server", None, "knowledge_down_bytes", float(entry["down_bytes"])),
        Metric(rnd, "server", None, "knowledge_dense_bytes_per_set", float(entry["dense_bytes_per_set"])),
    ]


def knowledge_traffic(
    config: ExperimentConfig, rounds: Sequence[dict[str, Any]], n: int, public: Sequence[Encoded]
) -> dict[str, Any]:
    """The run's knowledge-set traffic against the paper's N*S*K, for communication.json.

    `n` is the number of public samples; `public` the public set in the LLM's tokenisation, for
    the mean sequence length (empty before the first server step).
    """
    sets = sum(r["up_sets"] for r in rounds) + sum(config.federation.num_clients for _ in rounds)
    sent = sum(r["up_bytes"] + r["down_bytes"] for r in rounds)
    dense = sets * dense_reference_bytes(n, config.train.max_length, config.fedmkt.top_k)
    mean_len = float(np.mean([len(e.input_ids) for e in public])) if public else 0.0
    all_positions = sets * round(n * mean_len) * config.fedmkt.top_k * 8
    return {
        "formula": "paper: N*S*K entries per knowledge set (N samples, S positions, K logits)",
        "public_samples_N": n,
        "sequence_length_S": config.train.max_length,
        "top_k_K": config.fedmkt.top_k,
        "dense_entry_bytes": 8,
        "dense_entry": "float32 logit + int32 id",
        "compact_form": ("only answer positions; ids int32, values float16; loss float32, lengths int32"),
        "sets_sent": sets,
        "bytes_sent": sent,
        "dense_bytes_N_S_K": dense,
        "dense_bytes_actual_lengths": all_positions,
        "saving_vs_N_S_K_percent": 100.0 * (1 - sent / dense) if dense else None,
        "saving_vs_actual_lengths_percent": 100.0 * (1 - sent / all_positions) if all_positions else None,
        "mean_sequence_length": mean_len,
        "rounds": rounds,
    }


def results_lines(
    config: ExperimentConfig, metrics: Sequence[Metric], communication: dict[str, Any]
) -> list[str]:
    """Per-client SLM accuracy before/after and the knowledge-set traffic, for results.md."""
    lines: list[str] = [""]
    if not config.fedmkt.fedavg_homogeneous:
        lines += [
            "FedMKT sends no adapters (the line above gives the SLM adapter's size only); clients and "
            "server exchange knowledge sets.",
            "",
        ]
    evaluated = sorted({m.round for m in metrics if m.metric == "acc" and m.role == "slm"})
    if evaluated:
        first, last = evaluated[0], evaluated[-1]
        lines += [
            "Clients' own SLMs (FedMKT never averages them; the SLM row above is their mean):",
            "",
            "| client | model | acc before | acc after | acc_norm before | acc_norm after |",
            "|---|---|---|---|---|---|",
        ]
        for k in range(config.federation.num_clients):
            cells = []
            for key in ("acc", "acc_norm"):
                for rnd in (first, last):
                    value = next(
                        (
                            m.value
                            for m in metrics
                            if m.role == "slm" and m.client == k and m.round == rnd and m.metric == key
                        ),
                        None,
                    )
                    cells.append("-" if value is None else f"{100 * value:.1f}")
            lines.append(
                f"| {k} | {config.federation.client_model(k, config.slm.name)} | {' | '.join(cells)} |"
            )
        lines.append("")
    rejected = [m for m in metrics if m.metric == "rejected"]
    if rejected:
        lines += [
            f"Rejected uploads: {', '.join(f'client {m.client} (round {m.round})' for m in rejected)}.",
            "",
        ]
    knowledge = communication.get("knowledge")
    if knowledge and knowledge["sets_sent"]:
        lines += [
            f"Knowledge sets: {knowledge['sets_sent']} sent, "
            f"{knowledge['bytes_sent'] / 1e6:.2f} MB in the "
            f"compact form (answer positions only, int32 ids, float16 logits) vs "
            f"{knowledge['dense_bytes_N_S_K'] / 1e6:.1f} MB as the paper's N·S·K "
            f"(N={knowledge['public_samples_N']}, S={knowledge['sequence_length_S']}, "
            f"K={knowledge['top_k_K']}, 8 B per entry): "
            f"{knowledge['saving_vs_N_S_K_percent']:.2f}% saved "
            f"({knowledge['saving_vs_actual_lengths_percent']:.2f}% vs every position of the "
            "actual sequences).",
            "",
        ]
    return lines
