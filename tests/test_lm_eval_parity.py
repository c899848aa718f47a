"""Our evaluation is lm-evaluation-harness 0.4.13's, question by question.

The same questions (the OLMo package's copy) are written in each task's original Hugging Face
schema next to a copy of lm-eval's own task YAML whose only change is the data source; lm-eval's
`simple_evaluate` (HFLM, zero-shot, `log_samples=True`) and
`fedcollm.evaluation.multiple_choice.evaluate` then score the same loaded model. Per question, the
prompt and continuations, `acc` and `acc_norm` must be equal, and the log-likelihoods equal up to
float32 rounding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip(
    "lm_eval",
    reason="lm-evaluation-harness is not installed; install the extra: pip install -e '.[eval]'",
)

from tokenizers import Tokenizer, processors

from fedcollm.config import default_eval_split
from fedcollm.data import MCQuestion, load_questions, render
from fedcollm.evaluation import harness
from fedcollm.evaluation.multiple_choice import context_window, evaluate
from fedcollm.lm.loading import load_base_model, load_tokenizer, needs_bos, resolve_model
from tests.tiny import make_model

TASKS = ("arc_easy", "arc_challenge", "openbookqa", "commonsense_qa")


def _questions(tasks: Sequence[str], n: int) -> dict[str, list[MCQuestion]]:
    """The first `n` questions of each task's evaluation split: where lm-eval scores it (test for
    ARC and OpenBookQA, validation for CommonsenseQA)."""
    return {task: load_questions(task, default_eval_split(task), "olmo", limit=n) for task in tasks}


def assert_parity(model_name: str, questions: Mapping[str, list[MCQuestion]], folder: Path) -> dict[str, Any]:
    """Score `questions` with lm-eval and with ours on one loaded model; assert they agree."""
    tokenizer = load_tokenizer(model_name)
    model = load_base_model(model_name)
    local = {task: harness.write_local_task(task, qs, folder) for task, qs in questions.items()}
    results = harness.simple_evaluate(
        harness.hf_lm(model, tokenizer, batch_size=16),
        [t.name for t in local.values()],
        task_manager=harness.local_task_manager(folder),
        log_samples=True,
    )
    add_bos = needs_bos(tokenizer)
    for task, qs in questions.items():
        requests = [render(task, q) for q in qs]
        ours = evaluate(model, tokenizer, requests, add_bos=add_bos, batch_size=16)
        theirs = harness.per_question(results, local[task].name)
        assert len(theirs) == len(requests)
        for i, (request, row) in enumerate(zip(requests, theirs, strict=True)):
            where = f"{task} question {i} ({request.id})"
            assert row["context"] == request.context, where
            assert row["continuations"] == list(request.continuations), where
            assert float(ours.predictions[i] == request.gold) == row["acc"], where
            if row["acc_norm"] is not None:
                assert float(ours.predictions_norm[i] == request.gold) == row["acc_norm"], where
            np.testing.assert_allclose(
                ours.loglikelihoods[i], row["loglikelihoods"], rtol=1e-4, atol=1e-3, err_msg=where
            )
        metrics = results["results"][local[task].name]
        assert ours.acc == pytest.approx(metrics["acc,none"]), task
        if "acc_norm,none" in metrics:
            assert ours.acc_norm == pytest.approx(metrics["acc_norm,none"]), task
    return results


def _add_bos_post_processor(folder: Path) -> None:
    """Make the tiny tokenizer prepend <bos> by default, as Gemma's and Llama-3's do."""
    path = folder / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer.save(str(path))


def test_local_task_copies_lm_evals_config(tmp_path: Path) -> None:
    """The local YAML keeps lm-eval's prompt, choices, target and metrics; only data changes."""
    import yaml

    for task in TASKS:
        local = harness.write_local_task(task, _questions([task], 2)[task], tmp_path)
        ours = yaml.safe_load(local.yaml_path.read_text(encoding="utf-8"))
        original = harness.lm_eval_task_config(task)
        for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list"):
            assert ours[key] == original[key], (task, key)
        assert ours["dataset_path"] == "json"
        assert "test_split" not in ours


def test_parity_tiny_llama_all_tasks(tiny_llama: Path, tmp_path: Path) -> None:
    """50 questions of each task on a tiny random llama: acc/acc_norm equal per question."""
    assert_parity(str(tiny_llama), _questions(TASKS, 50), tmp_path)


def test_long_contexts_are_cut_on_the_left_as_lm_eval_cuts_them(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A model with a 64-token window: lm-eval keeps the last 65 tokens of context+continuation
    and feeds 64; our default cut (the model's window, not `train.max_length`) must give the same
    log-likelihoods, question by question."""
    folder = make_model(tmp_path_factory.mktemp("tiny-short-window"), "llama", seed=5)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    questions = _questions(("arc_easy",), 10)
    tokenizer = load_tokenizer(str(folder))
    lengths = [len(tokenizer(render("arc_easy", q).context)["input_ids"]) for q in questions["arc_easy"]]
    assert max(lengths) > 64  # the cut happens
    assert_parity(str(folder), questions, tmp_path_factory.mktemp("tasks"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma3_text"])
def test_context_window_is_lm_evals_max_length(arch: str, tmp_path: Path) -> None:
    from lm_eval.models.utils import DEFAULT_MAX_LENGTH, resolve_max_length

    folder = make_model(tmp_path / arch, arch)
    model, tokenizer = load_base_model(str(folder)), load_tokenizer(str(folder))
    assert context_window(model, tokenizer) == resolve_max_length(
        model.config, tokenizer, default=DEFAULT_MAX_LENGTH
    )
    no_length = SimpleNamespace(config=SimpleNamespace())  # a config without a window
    for limit in (77, 1000000000000000019884624838656):  # the tokenizer's, then unset
        tokenizer.model_max_length = limit
        assert context_window(no_length, tokenizer) == resolve_max_length(  # type: ignore[arg-type]
            no_length.config, tokenizer, default=DEFAULT_MAX_LENGTH
        )


@pytest.mark.parametrize("tokenizer_adds_bos", [False, True])
def test_parity_tiny_gemma_bos_follows_tokenizer(
    tokenizer_adds_bos: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """lm-eval prepends BOS when the tokenizer adds it by default, whatever the architecture.

    A Gemma-architecture model whose tokenizer adds no BOS is scored without it by lm-eval;
    one whose tokenizer adds it, with it. `needs_bos` must follow, or scores differ.
    """
    folder = make_model(tmp_path_factory.mktemp("tiny-gemma"), "gemma3_text", seed=3)
    if tokenizer_adds_bos:
        _add_bos_post_processor(folder)
    assert needs_bos(load_tokenizer(str(folder))) is tokenizer_adds_bos
    assert_parity(str(folder), _questions(("arc_easy", "openbookqa"), 10), tmp_path_factory.mktemp("tasks"))


@pytest.mark.slow
def test_parity_smollm2(tmp_path: Path) -> None:
    """The real SmolLM2-135M (no BOS) on 4 questions of each task."""
    name = resolve_model("smollm2-135m")
    assert not needs_bos(load_tokenizer(name))
    assert_parity(name, _questions(TASKS, 4), tmp_path)


@pytest.mark.slow
def test_parity_gemma3_bos(tmp_path: Path) -> None:
    """The real Gemma-3-270M, whose tokenizer adds BOS: lm-eval and we both prepend it."""
    name = resolve_model("gemma3-270m")
    assert needs_bos(load_tokenizer(name))
    assert_parity(name, _questions(("arc_easy",), 5), tmp_path)


def test_lm_eval_own_task_offline_says_it_needs_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-eval's own arc_easy (hub data) fails offline with a message naming the cause."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    shutil.copy(harness.lm_eval_tasks_dir() / "arc" / "arc_easy.yaml", tmp_path / "arc_easy.yaml")
    with pytest.raises(harness.HarnessError, match="needs the Hugging Face hub"):
        harness.load_tasks(["arc_easy"], harness.local_task_manager(tmp_path))


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(harness.HarnessError, match=r"fedcollm\[eval\]"):
        harness.import_lm_eval()
