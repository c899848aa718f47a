"""CrossLM: feedback weighting, strict parsing of generations, what clients reveal, a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fedcollm.algorithms.crosslm.algorithm as crosslm_module
import fedcollm.algorithms.crosslm.kinds as crosslm_kinds
from fedcollm.algorithms.crosslm.algorithm import CANDIDATES, FEEDBACK, SYNTHETIC, CrossLM, feedback_weights
from fedcollm.algorithms.crosslm.synthetic import (
    DUPLICATE,
    EVAL_OVERLAP,
    MALFORMED,
    OK,
    TRUNCATED,
    Generation,
    SamplingSettings,
    build_prompt,
    completion_of,
    encode_prompt,
    encode_written,
    format_block,
    generate_texts,
    mark_duplicates,
    pack_questions,
    parse_generation,
    question_key,
    shuffle_choices,
    unpack_questions,
)
from fedcollm.config import LoraConfig, TrainConfig, build_config
from fedcollm.data import MCQuestion
from fedcollm.engines import run_experiment
from fedcollm.lm.encoding import Encoded, collate
from fedcollm.lm.loading import load_tokenizer, needs_bos
from fedcollm.lm.logits import answer_cross_entropy
from fedcollm.lm.lora import get_adapter, set_adapter
from fedcollm.lm.models import load_with_lora
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.data import ExperimentData
from fedcollm.protocol import Payload, Reporter
from fedcollm.training.sft import train_sft, weighted_answer_cross_entropy
from tests.helpers import read_metrics, tiny_config

FOUR = {4}
VALID = " Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nC. helium\nD. neon\nAnswer: B\n\n"


# ------------------------------------------------------------------------------ weighting


def test_a_zero_weight_candidate_contributes_exactly_no_gradient() -> None:
    items = [Encoded((5, 6, 7, 8), 2), Encoded((5, 9, 3), 1), Encoded((4, 4, 2, 2, 1), 3)]
    batch = collate(items, pad_id=0, device="cpu")
    torch.manual_seed(0)
    logits = torch.randn(batch.num_targets, 11, requires_grad=True)
    weights = torch.tensor([1.0, 0.0, 0.5])
    loss = weighted_answer_cross_entropy(logits, batch, weights)
    loss.backward()
    assert logits.grad is not None
    zero_rows = batch.rows == 1
    assert torch.count_nonzero(logits.grad[zero_rows]) == 0
    assert torch.count_nonzero(logits.grad[~zero_rows]) > 0
    # The zero-weight row does not enter the normaliser either: same loss without it.
    keep = [0, 2]
    sub = collate([items[i] for i in keep], pad_id=0, device="cpu")
    sub_logits = logits.detach()[batch.rows != 1]
    assert torch.allclose(weighted_answer_cross_entropy(sub_logits, sub, weights[keep]), loss.detach())


def test_unit_weights_on_one_token_answers_equal_the_plain_task_loss() -> None:
    batch = collate([Encoded((1, 2, 3), 2), Encoded((4, 5), 1)], pad_id=0, device="cpu")
    logits = torch.randn(batch.num_targets, 7)
    plain = answer_cross_entropy(logits, batch)
    assert torch.allclose(weighted_answer_cross_entropy(logits, batch, torch.ones(2)), plain)


def test_train_sft_with_a_zero_weight_example_matches_training_without_it(tiny_llama: Path) -> None:
    lm = load_with_lora(str(tiny_llama), LoraConfig(r=4), seed=0)
    initial = get_adapter(lm.model)
    good, ignored = Encoded((3, 4, 5, 6, 7), 3), Encoded((8, 9, 10, 11), 2)
    cfg = TrainConfig(batch_size=4, epochs=2)
    common = {"pad_id": 0, "lr": 1e-2, "cfg": cfg, "seed": 3}
    train_sft(lm.model, [good, ignored], weights=[2.0, 0.0], **common)
    with_zero = get_adapter(lm.model)
    set_adapter(lm.model, initial)
    train_sft(lm.model, [good], weights=[2.0], **common)
    alone = get_adapter(lm.model)
    assert any(not np.array_equal(with_zero[k], initial[k]) for k in initial)
    for name in alone:
        np.testing.assert_array_equal(with_zero[name], alone[name])
    with pytest.raises(ValueError, match="positive weight"):
        train_sft(lm.model, [good], weights=[0.0], **common)


def test_feedback_weights_zero_below_threshold_and_favour_better_scores() -> None:
    # 4 choices: chance 0.25; advantages 0.867, -0.2, 0.333, 0.067
    weights = feedback_weights(np.array([0.9, 0.1, 0.5, 0.3]), 1 / 4, threshold=0.05)
    assert weights[1] == 0.0
    assert weights[0] > weights[2] > weights[3] > 0
    assert np.isclose(weights[weights > 0].mean(), 1.0)
    assert np.allclose(weights[[0, 2, 3]] / weights[0], np.array([0.65, 0.25, 0.05]) / 0.65)
    assert not feedback_weights(np.array([0.1, 0.2]), 1 / 4, threshold=0.5).any()


def test_feedback_threshold_is_relative_to_chance_of_each_candidate() -> None:
    # 0.3 is above chance for 4 choices (0.25) but below it for 3 (0.333...)
    weights = feedback_weights(np.array([0.3, 0.3]), 1 / np.array([4, 3]), threshold=0.0)
    assert weights[0] > 0 and weights[1] == 0.0
    # a score exactly at chance never counts, even with threshold 0
    assert not feedback_weights(np.array([0.2]), 1 / 5, threshold=0.0).any()


# ------------------------------------------------------------------------------ parsing


def test_a_valid_generation_parses_into_the_question() -> None:
    parsed = parse_generation(VALID, choice_counts=FOUR, finished=True)
    assert parsed.status == OK
    assert parsed.question is not None
    assert parsed.question.question == "Which gas do plants take in?"
    assert parsed.question.choices == ("oxygen", "carbon dioxide", "helium", "neon")
    assert parsed.question.gold == 1


def test_a_block_ends_at_the_next_question_or_at_end_of_sequence() -> None:
    next_question = VALID.rstrip("\n") + "\nQuestion: Another one?\nA. x"
    assert parse_generation(next_question, choice_counts=FOUR, finished=False).ok
    assert parse_generation(VALID.rstrip("\n"), choice_counts=FOUR, finished=True).ok


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("\nWhich gas?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n", "no question"),
        (" Which gas?\nA. a\nC. b\nC. c\nD. d\nAnswer: A\n\n", "where B was expected"),
        (" Which gas?\nA. a\nB. b\nC. c\nAnswer: A\n\n", "3 choices"),
        (" Which gas?\nA. a\nB. b\nC. c\nD. d\n\n", "no 'Answer:'"),
        (" Which gas?\nA. a\nB. b\nC. c\nD. d\nAnswer: E\n\n", "not one of the 4"),
        (" Which gas?\nA. a\nB. b\nC. c\nD. d\nAnswer: B because\n\n", "expected 'Answer: <letter>'"),
        (" Which gas?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\nExplanation: x\n\n", "after the answer"),
        (" Which gas?\nA. air\nB. Air.\nC. c\nD. d\nAnswer: B\n\n", "same"),
        (" Which gas?\nA. a\nB. b\nC. c\nD. " + "x" * 200 + "\nAnswer: A\n\n", "longer than"),
        ("", "no question"),
    ],
)
def test_malformed_generations_are_discarded_with_a_reason(text: str, why: str) -> None:
    parsed = parse_generation(text, choice_counts=FOUR, finished=True)
    assert parsed.status == MALFORMED
    assert parsed.question is None
    assert why in parsed.reason


def test_a_generation_cut_off_by_the_token_budget_is_truncated() -> None:
    for cut in (" Which gas do plants take in?\nA. oxygen\nB. carb", VALID.rstrip("\n")):
        parsed = parse_generation(cut, choice_counts=FOUR, finished=False)
        assert parsed.status == TRUNCATED
        assert parsed.question is None


def test_duplicates_of_demonstrations_earlier_candidates_and_eval_questions_are_discarded() -> None:
    demo = MCQuestion("d", "What do bees make?", ("honey", "milk"), 0)
    held = MCQuestion("e", "What is ice?", ("frozen water", "hot air"), 0)
    texts = [
        " what do BEES make\nA. wax\nB. honey\nAnswer: B\n\n",
        " What is ice?\nA. frozen water\nB. steam\nAnswer: A\n\n",
        " Why is the sky blue?\nA. scattering\nB. paint\nAnswer: A\n\n",
        " Why is the sky blue ?\nA. light\nB. paint\nAnswer: A\n\n",
    ]
    parsed = [parse_generation(t, choice_counts={2}, finished=True) for t in texts]
    marked = mark_duplicates(parsed, known=[question_key(demo)], evaluation=[question_key(held)])
    assert [p.status for p in marked] == [DUPLICATE, EVAL_OVERLAP, OK, DUPLICATE]


def test_prompt_and_completion_round_trip_through_the_parser() -> None:
    question = MCQuestion("q", "Where do fish live?", ("water", "trees", "sky"), 0)
    prompt = build_prompt("Some task.", [question])
    assert prompt.endswith("\n\nQuestion:") and format_block(question) in prompt
    parsed = parse_generation(completion_of(question), choice_counts={3}, finished=False)
    assert parsed.ok and parsed.question is not None
    assert (parsed.question.question, parsed.question.choices, parsed.question.gold) == (
        question.question,
        question.choices,
        question.gold,
    )


def test_shuffled_choices_keep_the_gold_text_and_packing_round_trips() -> None:
    question = MCQuestion("q", "Größte Stadt? «quoted»", ("Berlin", "Köln", "Ulm", "Jena", "Kiel"), 1)
    rng = np.random.default_rng(0)
    shuffled = [shuffle_choices(question, rng) for _ in range(20)]
    assert all(q.choices[q.gold] == "Köln" for q in shuffled)
    assert len({q.gold for q in shuffled}) > 1
    arrays = pack_questions(shuffled, CANDIDATES)
    assert arrays[CANDIDATES + ".bytes"].dtype == np.uint8
    assert unpack_questions(arrays, CANDIDATES) == shuffled
    assert unpack_questions({}, SYNTHETIC) == []
    assert unpack_questions(pack_questions([], SYNTHETIC), SYNTHETIC) == []


# ------------------------------------------------------------------------------ the write objective


@pytest.mark.parametrize("add_bos", [False, True])
def test_the_write_objective_conditions_on_the_token_ids_generation_saw(
    tiny_llama_big: Path, monkeypatch: pytest.MonkeyPatch, add_bos: bool
) -> None:
    """The ids `model.generate` receives (padding removed) are the write example's context."""
    llm = load_with_lora(str(tiny_llama_big), LoraConfig(r=4), seed=0)
    demos = [
        MCQuestion(f"d{i}", f"Which is number {i}?", ("one", "two", "three", "four"), i % 4) for i in range(3)
    ]
    prompts = [build_prompt("Write a question.", demos[: n + 1]) for n in range(3)]  # different lengths
    seen: list[list[int]] = []
    generate = llm.model.generate

    def recording(*, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True))
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(llm.model, "generate", recording)
    settings = SamplingSettings(max_new_tokens=8, batch_size=3)
    generate_texts(llm.model, llm.tokenizer, prompts, add_bos=add_bos, settings=settings, seed=0)
    assert len(seen) == len(prompts)
    completion = completion_of(demos[0])
    for prompt, ids in zip(prompts, seen, strict=True):
        written = encode_written(llm.tokenizer, prompt, completion, add_bos=add_bos)
        assert list(written.input_ids[: written.n_context]) == ids
        assert (ids[0] == llm.tokenizer.bos_token_id) == add_bos
        assert llm.tokenizer.decode(written.answer_ids) == completion


def test_a_token_merging_across_the_prompt_boundary_leaves_the_prompt_as_generation_saw_it(
    tiny_llama: Path,
) -> None:
    tokenizer = load_tokenizer(str(tiny_llama))
    prompt, completion = "Ques", "tion: Which gas?"  # "Question" is one token of the tiny vocabulary
    assert (
        tokenizer(prompt + completion)["input_ids"][: len(tokenizer(prompt)["input_ids"])]
        != (tokenizer(prompt)["input_ids"])
    )
    written = encode_written(tokenizer, prompt, completion, add_bos=False)
    assert list(written.input_ids[: written.n_context]) == encode_prompt(tokenizer, prompt, add_bos=False)
    assert tokenizer.decode(written.answer_ids) == completion


# ------------------------------------------------------------------------------ privacy of the feedback


def test_a_client_returns_only_one_float_per_candidate(tiny_llama: Path, tiny_llama_big: Path) -> None:
    config = build_config(_crosslm_config(tiny_llama, tiny_llama_big))
    data = ExperimentData.load(config)
    slm = load_with_lora(str(tiny_llama), config.slm.lora, seed=0)
    client = ClientRuntime.create(config, data, 0, slm)
    candidates = [
        MCQuestion(f"c{i}", f"Which is number {i}?", ("one", "two", "three", "four"), i % 4) for i in range(5)
    ]
    synthetic = candidates[:2]
    payload = Payload(
        get_adapter(slm.model)
        | pack_questions(candidates, CANDIDATES)
        | pack_questions(synthetic, SYNTHETIC),
        {"round": 1},
    )
    reply = CrossLM(config).client_fit(client, payload, 1, Reporter())
    assert list(reply.arrays) == [FEEDBACK]
    feedback = reply.arrays[FEEDBACK]
    assert feedback.dtype == np.float32 and feedback.shape == (len(candidates) + 1,)
    assert feedback[0] == 1.0 and np.all((feedback[1:] > 0) & (feedback[1:] < 1))
    assert reply.num_examples == len(client.train)
    assert set(reply.metrics) == {"train_loss", "steps", "synthetic_examples"}
    assert all(isinstance(v, float) for v in reply.metrics.values())
    assert reply.metrics["synthetic_examples"] == 2.0
    assert "adapter" in client.state  # the adapter stays on the client


# ------------------------------------------------------------------------------ end to end


def _crosslm_config(slm: Path, llm: Path, **crosslm: object) -> dict:
    settings = {
        "num_candidates": 6,
        "max_new_tokens": 16,
        "generation_batch_size": 6,
        "heldout_task": "arc_challenge",
        "heldout_limit": 8,
    }
    return tiny_config(slm, llm, algorithm="crosslm", crosslm=settings | crosslm)


def test_tiny_run_with_a_scripted_generator_trains_both_sides_and_saves_each_round(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny random LLM writes garbage, so the generator is scripted: 3 valid, 3 discards."""

    def scripted(model, tokenizer, prompts, **kwargs) -> list[Generation]:
        rnd = len(calls) + 1
        calls.append(len(prompts))
        valid = [
            Generation(f" Round {rnd} question {i}?\nA. w{i}\nB. x{i}\nC. y{i}\nD. z{i}\nAnswer: C\n\n", True)
            for i in range(3)
        ]
        broken = [
            Generation(" No choices at all\nAnswer: A\n\n", True),
            Generation(" Cut off\nA. x\nB.", False),
            valid[0],  # a repeat of an earlier candidate
        ]
        return (valid + broken)[: len(prompts)]

    def confident(lm, questions, **kwargs) -> np.ndarray:  # tiny random SLMs sit at chance
        return np.linspace(0.9, 0.4, len(questions)).astype(np.float32)

    calls: list[int] = []
    monkeypatch.setattr(crosslm_module, "generate_texts", scripted)
    monkeypatch.setattr(crosslm_kinds, "choice_probabilities", confident)
    config = build_config(_crosslm_config(tiny_llama, tiny_llama_big, score_threshold=0.0))
    out = tmp_path / "run"
    run_experiment(config, out)

    assert calls == [6, 6, 6]  # 2 rounds + the closing round
    metrics = read_metrics(out)

    def server(metric: str) -> dict[int, float]:
        return {m["round"]: m["value"] for m in metrics if m["role"] == "server" and m["metric"] == metric}

    assert server("generated") == {1: 6.0, 2: 6.0, 3: 6.0}
    assert server("valid") == {1: 3.0, 2: 3.0, 3: 3.0}
    assert server("discard_rate") == {1: 0.5, 2: 0.5, 3: 0.5}
    assert server("discarded_malformed") == {1: 1.0, 2: 1.0, 3: 1.0}
    assert server("discarded_truncated") == {1: 1.0, 2: 1.0, 3: 1.0}
    assert server("discarded_duplicate") == {1: 1.0, 2: 1.0, 3: 1.0}
    assert all(0 < v < 1 for v in server("feedback_mean").values())
    llm_train = [m["round"] for m in metrics if m["role"] == "llm" and m["metric"] == "train_loss"]
    assert llm_train == [1, 2]  # the closing round leaves the LLM as it is
    synthetic = {
        (m["round"], m["client"]): m["value"] for m in metrics if m["metric"] == "synthetic_examples"
    }
    assert synthetic == {(1, 0): 0.0, (1, 1): 0.0, (2, 0): 3.0, (2, 1): 3.0, (3, 0): 3.0, (3, 1): 3.0}
    heldout = sorted(m["round"] for m in metrics if m["role"] == "llm" and m["metric"] == "heldout_acc")
    assert heldout == [0, 1, 2, 3]
    slm_acc = sorted(
        m["round"] for m in metrics if m["role"] == "slm" and m["metric"] == "acc" and m["client"] is None
    )
    assert slm_acc == [0, 1, 2, 3]
    for rnd in (1, 2, 3):
        lines = [json.loads(x) for x in (out / "synthetic" / f"round_{rnd}.jsonl").read_text().splitlines()]
        assert [x["status"] for x in lines] == [OK, OK, OK, MALFORMED, TRUNCATED, DUPLICATE]
        assert all(x["score"] is not None and x["selected"] for x in lines[:3])
        assert all(x["score"] is None and not x["selected"] for x in lines[3:])
        assert all(x["raw"] for x in lines)
    results = (out / "results.md").read_text()
    assert "held-out task arc_challenge" in results and "| 1 | 6 | 3 | 50% |" in results
    comm = json.loads((out / "communication.json").read_text())
    assert all(r["up_params"] == 2 * 4 for r in comm["rounds"])  # 2 clients x (1 check + 3 scores)


def _one_round_with(
    monkeypatch: pytest.MonkeyPatch, generations: list[Generation]
) -> tuple[list[str], list[tuple[list[Encoded], list[float]]]]:
    """Script the generator and the SLMs' scores (all well above chance), record the LLM's SFT."""
    prompts: list[str] = []
    trained: list[tuple[list[Encoded], list[float]]] = []

    def scripted(model, tokenizer, given, **kwargs) -> list[Generation]:
        prompts.extend(given)
        return generations[: len(given)]

    def recording_sft(config, llm, examples, rnd, reporter, **kwargs):
        trained.append((list(examples), list(kwargs["weights"])))
        return llm_sft(config, llm, examples, rnd, reporter, **kwargs)

    llm_sft = crosslm_module.llm_sft
    monkeypatch.setattr(crosslm_module, "generate_texts", scripted)
    monkeypatch.setattr(crosslm_module, "llm_sft", recording_sft)
    monkeypatch.setattr(crosslm_kinds, "choice_probabilities", lambda lm, qs, **kw: np.full(len(qs), 0.9))
    return prompts, trained


def _candidate(i: int) -> Generation:
    return Generation(f" Which is item {i}?\nA. w{i}\nB. x{i}\nC. y{i}\nD. z{i}\nAnswer: C\n\n", True)


def test_the_write_objective_keeps_a_generation_prompt_longer_than_train_max_length(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the prompt was encoded with max_length and lost its left (its instruction)."""
    max_length = 48
    prompts, trained = _one_round_with(monkeypatch, [_candidate(i) for i in range(3)])
    config = build_config(
        _crosslm_config(tiny_llama, tiny_llama_big, num_candidates=3, shots=1, closing_round=False)
        | {
            "federation": {"rounds": 1, "num_clients": 2},
            "train": {"batch_size": 4, "max_length": max_length},
        }
    )
    out = tmp_path / "run"
    run_experiment(config, out)

    tokenizer = load_tokenizer(str(tiny_llama_big))
    seen = [encode_prompt(tokenizer, p, add_bos=needs_bos(tokenizer)) for p in prompts]
    assert len(trained) == 1 and all(len(ids) > max_length for ids in seen)
    examples, weights = trained[0]
    assert len(examples) == 6  # per candidate, its answer example then its write example
    written = examples[1::2]
    assert weights == [1.0] * 6  # equal scores: unit weights, generation_loss_weight 1
    assert [list(e.input_ids[: e.n_context]) for e in written] == seen
    assert all(tokenizer.decode(e.answer_ids).startswith(" Which is item") for e in written)
    skipped = [m for m in read_metrics(out) if m["metric"] == "write_skipped"]
    assert [(m["round"], m["role"], m["value"]) for m in skipped] == [(1, "server", 0.0)]


def test_a_write_example_beyond_the_context_window_is_skipped_and_counted(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny LLM's window is 512 tokens; one candidate's prompt + block is longer.

    One demonstration per prompt: the tiny tokenizer needs a token per 1.4 characters, and three
    would already take the prompts past 512 tokens."""
    long = "".join(chr(0x3B1 + i % 20) for i in range(150))  # Greek letters: 2 bytes, no merges
    huge = Generation(f" {long}?\nA. {long}a\nB. {long}b\nC. {long}c\nD. short\nAnswer: D\n\n", True)
    prompts, trained = _one_round_with(monkeypatch, [_candidate(0), huge, _candidate(2)])
    config = build_config(
        _crosslm_config(tiny_llama, tiny_llama_big, num_candidates=3, shots=1, closing_round=False)
        | {"federation": {"rounds": 1, "num_clients": 2}}
    )
    out = tmp_path / "run"
    run_experiment(config, out)

    tokenizer = load_tokenizer(str(tiny_llama_big))
    record = json.loads((out / "synthetic" / "round_1.jsonl").read_text().splitlines()[1])
    assert record["status"] == OK and record["selected"]
    question = MCQuestion("r1-1", record["question"], tuple(record["choices"]), record["gold"])
    assert len(encode_written(tokenizer, prompts[1], completion_of(question), add_bos=False).input_ids) > 512
    examples, weights = trained[0]
    seen = [encode_prompt(tokenizer, p, add_bos=False) for p in prompts]
    # Per kept candidate, its answer example then its write example: candidate 1 has no write one.
    assert len(examples) == len(weights) == 3 + 2
    assert [list(e.input_ids[: e.n_context]) for e in (examples[1], examples[4])] == [seen[0], seen[2]]
    answers = [tokenizer.decode(e.answer_ids) for e in (examples[0], examples[2], examples[3])]
    assert answers == [" y0", " short", " y2"]  # the gold choices (shuffled, the text follows)
    skipped = [m for m in read_metrics(out) if m["metric"] == "write_skipped"]
    assert [(m["round"], m["role"], m["value"]) for m in skipped] == [(1, "server", 1.0)]


def test_a_round_of_garbage_generations_is_discarded_without_crashing(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    config = build_config(
        _crosslm_config(tiny_llama, tiny_llama_big, closing_round=False)
        | {"federation": {"rounds": 1, "num_clients": 2}}
    )
    out = tmp_path / "run"
    run_experiment(config, out)
    metrics = read_metrics(out)
    rate = [m["value"] for m in metrics if m["metric"] == "discard_rate"]
    assert rate == [1.0]
    assert all(m["value"] == m["value"] for m in metrics), "no NaN in metrics.jsonl"
    assert not any(m["role"] == "llm" and m["metric"] == "train_loss" for m in metrics)
    lines = (out / "synthetic" / "round_1.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["status"] != OK for x in lines)


def test_the_heldout_task_must_differ_from_the_training_task(tiny_llama: Path, tiny_llama_big: Path) -> None:
    config = build_config(_crosslm_config(tiny_llama, tiny_llama_big, heldout_task="arc_easy"))
    assert any("heldout_task" in problem for problem in CrossLM.check_config(config))
