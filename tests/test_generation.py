"""Generation evaluation: answers decoded as lm-eval's `generate_until` decodes them, and scored
with exact match and token F1 (SQuAD) and Rouge-L (`rouge-score`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcollm.data import load_questions
from fedcollm.evaluation.generation import (
    GenerationError,
    GenerationSettings,
    cut_at_stop,
    evaluate_generation,
    generate_until,
    stop_sequences,
)
from fedcollm.evaluation.text_metrics import exact_match, normalize_answer, rouge_l, score_text, token_f1
from fedcollm.lm.loading import load_base_model, load_tokenizer, needs_bos, resolve_model

_WORDS = ["a", "an", "the", "The", "An", "cat", "Cat,", "dog!", "it's", "-", "band", "  ", "x.y"]
_TEXT = st.lists(st.sampled_from(_WORDS), max_size=8).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(prediction=_TEXT, reference=_TEXT)
def test_normalisation_and_f1_are_lm_evals_squad_copy(prediction: str, reference: str) -> None:
    squad = pytest.importorskip("lm_eval.tasks.qasper.metrics")
    assert normalize_answer(prediction) == squad.normalize_answer(prediction)
    assert token_f1(prediction, [reference]) == pytest.approx(squad.f1_abstractive([prediction], [reference]))


def test_exact_match_and_f1_take_the_best_reference() -> None:
    assert exact_match("The Eiffel Tower!", ["Paris", "eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0
    assert token_f1("Eiffel", ["Paris", "eiffel tower"]) == pytest.approx(2 / 3)
    assert token_f1("", ["x"]) == 0.0


def test_rouge_l_is_the_lcs_f_measure() -> None:
    # LCS "the cat sat" = 3 tokens: precision 3/3, recall 3/6, F = 2/3
    assert rouge_l("the cat sat", ["the cat sat on the mat", "dog"]) == pytest.approx(2 / 3)
    assert score_text("the cat sat", ["the cat sat"]).rouge_l == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one reference"):
        score_text("x", [])


def test_answers_are_cut_before_the_first_stop_sequence(tiny_llama: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_llama))
    stops = stop_sequences(tokenizer, ["\n", "\n"])
    assert stops[0] == "\n" and stops.count("\n") == 1 and stops[-1] == tokenizer.eos_token
    assert cut_at_stop("Paris\nQuestion: next", stops) == "Paris"
    assert cut_at_stop("Paris.", ["\n", "."]) == "Paris"


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"until": ("",)}, "stop sequences must not be empty"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"do_sample": True, "temperature": 0.0}, "temperature > 0"),
    ],
)
def test_unworkable_settings_are_refused(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(GenerationError, match=pattern):
        GenerationSettings(**kwargs)  # type: ignore[arg-type]


def _prompts(n: int) -> list[str]:
    return [f"Question: {q.question}\nAnswer:" for q in load_questions("arc_easy", "test", limit=n)]


def test_greedy_answers_do_not_depend_on_batching_and_respect_the_token_budget(tiny_llama: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_llama))
    model = load_base_model(str(tiny_llama))
    prompts = _prompts(6)
    one = generate_until(
        model, tokenizer, prompts, add_bos=False, settings=GenerationSettings(8, batch_size=1)
    )
    batched = generate_until(
        model, tokenizer, prompts, add_bos=False, settings=GenerationSettings(8, batch_size=4)
    )
    assert one == batched
    assert all("\n" not in a for a in one)
    new_tokens: list[int] = []
    generate = model.generate

    def counting(**kwargs: object) -> object:
        out = generate(**kwargs)
        new_tokens.append(out.shape[1] - kwargs["input_ids"].shape[1])  # type: ignore[attr-defined]
        return out

    model.generate = counting  # type: ignore[method-assign]
    generate_until(model, tokenizer, prompts, add_bos=False, settings=GenerationSettings(3, until=("zzzz",)))
    assert new_tokens and max(new_tokens) == 3


def test_sampling_is_seeded(tiny_llama: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_llama))
    model = load_base_model(str(tiny_llama))
    sample = GenerationSettings(12, do_sample=True, temperature=1.5, batch_size=3)
    first = generate_until(model, tokenizer, _prompts(3), add_bos=False, settings=sample, seed=1)
    assert generate_until(model, tokenizer, _prompts(3), add_bos=False, settings=sample, seed=1) == first
    greedy = generate_until(model, tokenizer, _prompts(3), add_bos=False, settings=GenerationSettings(12))
    assert first != greedy


def test_evaluation_keeps_one_record_per_example_with_its_scores(tiny_llama: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_llama))
    model = load_base_model(str(tiny_llama))
    examples = [(f"q{i}", prompt, ["an answer", "another"]) for i, prompt in enumerate(_prompts(4))]
    result = evaluate_generation(model, tokenizer, examples, add_bos=False, settings=GenerationSettings(6))
    assert [r.id for r in result.records] == ["q0", "q1", "q2", "q3"]
    for record in result.records:
        assert record.scores == score_text(record.prediction, ["an answer", "another"])
        assert set(record.as_dict()) == {"id", "prediction", "references", "exact_match", "f1", "rouge_l"}
    assert result.summary()["f1"] == pytest.approx(sum(r.scores.f1 for r in result.records) / 4)
    with pytest.raises(GenerationError, match="no examples"):
        evaluate_generation(model, tokenizer, [], add_bos=False)


def _lm_eval_answers(model: object, tokenizer: object, prompts: list[str], max_new: int) -> list[str]:
    from lm_eval.api.instance import Instance

    from fedcollm.evaluation import harness

    lm = harness.hf_lm(model, tokenizer, batch_size=4)
    kwargs = {"until": ["\n"], "max_gen_toks": max_new, "do_sample": False}
    requests = [
        Instance(request_type="generate_until", doc={}, arguments=(p, dict(kwargs)), idx=i)
        for i, p in enumerate(prompts)
    ]
    return list(lm.generate_until(requests, disable_tqdm=True))


def _assert_generation_parity(name: str, n: int, max_new: int) -> None:
    pytest.importorskip("lm_eval")
    tokenizer = load_tokenizer(name)
    model = load_base_model(name)
    prompts = _prompts(n)
    ours = generate_until(
        model,
        tokenizer,
        prompts,
        add_bos=needs_bos(tokenizer),
        settings=GenerationSettings(max_new, batch_size=4),
    )
    assert any(answer.strip() for answer in ours)  # a parity of empty answers would show nothing
    assert ours == _lm_eval_answers(model, tokenizer, prompts, max_new)


def test_greedy_answers_are_lm_evals_generate_until_tiny(tiny_llama: Path) -> None:
    _assert_generation_parity(str(tiny_llama), 6, 10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_greedy_answers_are_lm_evals_generate_until_real(name: str) -> None:
    """The packaged models (SmolLM2 without BOS, Gemma-3 with it) on 6 ARC-Easy questions."""
    _assert_generation_parity(resolve_model(name), 6, 16)
