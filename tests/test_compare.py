"""`fedcollm compare`: identical settings across methods, reuse of finished runs, paper tables."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import GPT2Config, LlamaConfig, OPTConfig

from fedcollm.config import ConfigError, LoraConfig, build_config
from fedcollm.data import DataError
from fedcollm.engines import run_experiment
from fedcollm.experiment.compare import config_key, run_comparison, variant
from fedcollm.experiment.plan import adapter_size, plan
from fedcollm.experiment.report import LLM_PAIRS, METHOD_LABELS, SLM_PAIRS
from tests.helpers import tiny_config


@pytest.mark.parametrize(
    ("model_config", "lora", "full_m", "adapter_m", "percent"),
    [
        (GPT2Config(), LoraConfig(r=8), 124.4, 0.295, 0.24),  # S1 clients: GPT-2 small
        (
            OPTConfig(
                hidden_size=2048,
                ffn_dim=8192,
                num_hidden_layers=24,
                num_attention_heads=32,
                word_embed_proj_dim=2048,
                vocab_size=50272,
            ),
            LoraConfig(r=16),
            1315.8,
            3.146,
            0.24,
        ),  # S2 clients: OPT-1.3B
        (
            LlamaConfig(
                hidden_size=2048,
                intermediate_size=5504,
                num_hidden_layers=24,
                num_attention_heads=16,
                vocab_size=32000,
            ),
            LoraConfig(r=16),
            1345.4,
            3.146,
            0.23,
        ),  # S3 clients: Sheared-LLaMA-1.3B
    ],
)
def test_adapter_sizes_reproduce_the_papers_table3(model_config, lora, full_m, adapter_m, percent) -> None:
    size = adapter_size(model_config, lora)
    assert size.full_params / 1e6 == pytest.approx(full_m, abs=0.1)
    assert size.adapter_params / 1e6 == pytest.approx(adapter_m, abs=0.001)
    assert round(size.percent, 2) == percent


def test_variants_differ_only_in_task_and_algorithm(tiny_llama: Path, tiny_llama_big: Path) -> None:
    base = build_config(tiny_config(tiny_llama, tiny_llama_big))
    a, b = variant(base, "arc_easy", "fedavg"), variant(base, "arc_easy", "fedcollm")
    da, db = a.model_dump(), b.model_dump()
    assert {k for k in da if da[k] != db[k]} == {"name", "algorithm"}
    assert config_key(a) != config_key(b)
    assert config_key(a) == config_key(variant(base, "arc_easy", "fedavg"))


def test_unknown_method_or_task_fails_before_training_listing_what_exists(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    base = build_config(tiny_config(tiny_llama, tiny_llama_big))

    def never(*args: object, **kwargs: object) -> None:
        pytest.fail("trained")

    with pytest.raises(ConfigError, match=r"unknown method\(s\) fedprox; available: .*fedcollm"):
        run_comparison(base, tmp_path, never, ["fedavg", "fedprox"], ["arc_easy"])
    with pytest.raises(DataError, match="arc_easy"):
        run_comparison(base, tmp_path, never, ["fedavg"], ["no_such_task"])
    no_test_split = build_config({**tiny_config(tiny_llama, tiny_llama_big), "eval": {"split": "test"}})
    with pytest.raises(DataError, match="test"):
        plan(no_test_split, ["fedavg"], ["commonsense_qa"])  # CommonsenseQA has no test split offline


@pytest.mark.slow
def test_compare_writes_the_paper_tables_and_reuses_finished_runs(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    base = build_config(tiny_config(tiny_llama, tiny_llama_big, federation={"rounds": 1, "num_clients": 2}))
    methods = ["zeroshot", "standalone", "fedavg", "centralized", "fedcollm"]
    runs = run_comparison(base, tmp_path, run_experiment, methods, ["arc_easy"])
    assert [r.method for r in runs] == methods
    report = (tmp_path / "report.md").read_text()
    table1 = report.split("## Table 1")[1].split("## Paired comparisons")[0]
    table2 = report.split("## Table 2")[1].split("## Paired comparisons")[0]
    assert all(m in table1 for m in ("Zero-Shot", "Centralized", "FedCoLLM"))
    assert all(m in table2 for m in ("Zero-Shot", "Standalone", "FedAvg", "FedCoLLM"))
    assert "Standalone" not in table1 and "Centralized" not in table2
    for name in ("table1_llm.csv", "table2_slm.csv", "table3_communication.csv", "accuracy_arc_easy_slm.png"):
        assert (tmp_path / name).is_file()

    calls: list[str] = []

    def counting(config, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(config.name)
        return run_experiment(config, *args, **kwargs)

    run_comparison(base, tmp_path, counting, methods, ["arc_easy"])
    assert calls == []  # every run reused
    run_comparison(base.model_copy(update={"seed": 1}), tmp_path, counting, ["fedavg"], ["arc_easy"])
    assert calls == [f"{base.name}-arc_easy-fedavg"]  # a changed config is a new run

    # Every pair the paper's claims rest on is tested question by question on the real runs.
    slm = report.split("## Paired comparisons: client SLMs")[1].split("\n## ")[0]
    llm = report.split("## Paired comparisons: server LLM")[1].split("\n## ")[0]
    for section, pairs in ((slm, SLM_PAIRS), (llm, LLM_PAIRS)):
        shown = [
            line.split("|")[2].strip() for line in section.splitlines() if line.startswith("| arc_easy |")
        ]
        assert shown == [f"{METHOD_LABELS[a]} − {METHOD_LABELS[b]}" for a, b in pairs]

    # With seeds, seed 0's runs are reused and the pairs are also pooled over the seeds.
    calls.clear()
    shared = ["fedavg", "fedcollm"]
    run_comparison(base, tmp_path / "seeds", counting, shared, ["arc_easy"], seeds=[0, 1])
    assert len(calls) == 4  # a fresh comparison folder: both methods at both seeds
    seeded = (tmp_path / "seeds" / "report.md").read_text()
    pooled = (
        seeded.split("## Paired comparisons: client SLMs")[1].split("Pooled over seeds")[1].split("\n## ")[0]
    )
    assert [
        line.split("|")[2].strip() for line in pooled.splitlines() if line.startswith("| arc_easy |")
    ] == ["FedCoLLM − FedAvg"]
    assert (tmp_path / "seeds" / "pooled_slm.csv").is_file()
