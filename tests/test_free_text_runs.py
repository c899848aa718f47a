"""Tasks answered in free text, in runs: every registered algorithm trains on instruction data (or
short-answer questions) and is evaluated on generated answers, with per-example records and the
paired before/after table; the pieces underneath (task families, records, statistics, CrossLM's
instruction/response pairs) each pinned on its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedcollm.config import build_config
from fedcollm.data import DataError, QAExample
from fedcollm.data.families import task_family
from fedcollm.data.generative import GenerationItem, TextPair
from fedcollm.data.instructions import InstructionExample, Message
from fedcollm.engines import run_experiment
from fedcollm.evaluation.records import (
    GeneratedRecord,
    GenerationSet,
    generation_scores_from_wire,
    generation_scores_to_wire,
    read_generation_sets,
    read_question_sets,
    write_records,
)
from fedcollm.experiment.paired import generation_before_after, sign_flip_p
from fedcollm.parties.data import ExperimentData
from tests.helpers import ALGORITHM_CONFIGS, TinyModels, read_metrics, tiny_config

COLOURS = ["red", "blue", "green", "yellow", "white", "black"]


def instruction_file(path: Path, n: int, offset: int = 0) -> Path:
    """`n` small instruction records (JSONL), each with a topic field."""
    lines = []
    for i in range(offset, offset + n):
        colour = COLOURS[i % len(COLOURS)]
        lines.append(
            {
                "instruction": f"Name the colour of item {i}.",
                "input": "" if i % 2 else f"Item {i} is {colour}.",
                "output": colour,
                "topic": "even" if i % 2 == 0 else "odd",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return path


def free_text_config(models: TinyModels, name: str, tmp_path: Path) -> dict:
    data = ALGORITHM_CONFIGS[name](models)
    data["task"] = {
        "name": "instructions",
        "source": str(instruction_file(tmp_path / "train.jsonl", 24)),
        "eval_data": str(instruction_file(tmp_path / "eval.jsonl", 12, offset=100)),
        "aux_fraction": 0.25,
    }
    data["eval"] = {**data.get("eval", {}), "limit": 6, "max_new_tokens": 6, "batch_size": 4}
    if name == "crosslm":
        data["crosslm"] = {**data["crosslm"], "max_new_tokens": 16}
    return data


@pytest.mark.parametrize("name", sorted(ALGORITHM_CONFIGS))
def test_every_algorithm_runs_on_instruction_data_and_is_scored_on_generated_answers(
    tiny_models: TinyModels, tmp_path: Path, name: str
) -> None:
    config = build_config(free_text_config(tiny_models, name, tmp_path))
    out = tmp_path / "run"
    run_experiment(config, out)
    metrics = read_metrics(out)
    scored = {m["metric"] for m in metrics if m["role"] in ("slm", "llm")}
    assert {"exact_match", "f1", "rouge_l", "exact_match_stderr"} <= scored
    assert "acc" not in scored
    sets = read_generation_sets(out)
    assert sets
    # Only CrossLM's held-out task, a multiple-choice one by default, is scored by choices.
    assert all(q.set == "heldout" for q in read_question_sets(out))
    for gset in sets:
        assert len(gset.examples) == 6
        assert all(0 <= e.f1 <= 1 and e.exact_match in (0.0, 1.0) for e in gset.examples)
        reported = {
            m["metric"]: m["value"]
            for m in metrics
            if m["role"] == gset.role and m["round"] == gset.round and m["client"] == gset.client
        }
        if "f1" in reported:  # the records are what the metrics were computed from
            assert reported["f1"] == pytest.approx(gset.mean("f1"))
    results = (out / "results.md").read_text()
    assert "exact_match before" in results and "rouge_l after" in results


def test_fedcollm_on_short_answer_questions_trains_on_answers_and_writes_paired_tests(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    data = tiny_config(
        tiny_llama,
        tiny_llama_big,
        task={"name": "nq_open", "train_limit": 24, "aux_fraction": 0.25},
        eval={"limit": 8, "max_new_tokens": 4, "batch_size": 4},
    )
    out = tmp_path / "run"
    run_experiment(build_config(data), out)
    results = (out / "results.md").read_text()
    assert "| model | n | Δ exact_match | 95 % CI | p |" in results
    assert "| SLM | 8 |" in results and "| LLM | 8 |" in results
    (before,) = [s for s in read_generation_sets(out) if s.round == 0 and s.role == "slm"]
    assert before.examples[0].references, "the references travel with each record"
    from fedcollm.experiment.render import render_run

    report = render_run(out)  # fedcollm report: tables and plots from the files alone
    assert {"exact_match before", "f1 after", "rouge_l after"} <= set(report.rows[0])
    assert (out / "plots" / "accuracy_slm.png").is_file()


# ---------------------------------------------------------------------------------------------
# Task families


def test_short_answer_questions_train_on_their_first_answer_in_lm_evals_prompt() -> None:
    family = task_family("nq_open")
    example = QAExample("q1", "who wrote hamlet", ("William Shakespeare", "Shakespeare"))
    item = family.train_item(example, "lm_eval")
    assert isinstance(item, TextPair)
    assert item.prompt == "Answer these questions:\n\nQ: who wrote hamlet?\nA:"
    assert item.target == " William Shakespeare\n", "the answer, then where evaluation stops"
    evaluated = family.eval_item(example, "lm_eval")
    assert isinstance(evaluated, GenerationItem)
    assert evaluated.references == example.answers and evaluated.until == ("\n", ".", ",")
    with pytest.raises(DataError, match="takes no files of its own"):
        family.read_file("site.jsonl", None, ())


def test_instruction_data_needs_its_files_and_the_server_may_bring_its_own(tmp_path: Path) -> None:
    train = instruction_file(tmp_path / "train.jsonl", 20)
    aux = instruction_file(tmp_path / "aux.jsonl", 5, offset=50)
    evaluation = instruction_file(tmp_path / "eval.jsonl", 7, offset=80)
    base = {"name": "t", "slm": {"name": "s"}, "federation": {"num_clients": 2}}
    with pytest.raises(DataError, match=r"set task\.source to the training file"):
        ExperimentData.load(build_config({**base, "task": {"name": "instructions"}}))
    config = build_config(
        {
            **base,
            "task": {
                "name": "instructions",
                "source": str(train),
                "aux_data": str(aux),
                "eval_data": str(evaluation),
            },
        }
    )
    data = ExperimentData.load(config)
    assert [r.id for r in data.aux_records()] == [f"aux-{i}" for i in range(1, 6)]
    assert sum(len(c) for c in data.split.clients) == 20, (
        "with the server's own file, every record to a client"
    )
    assert len(data.eval_records) == 7
    item = data.eval_requests(config)[0]
    assert isinstance(item, GenerationItem) and isinstance(item.prompt, InstructionExample)
    assert item.references == (item.prompt.response,)
    field = build_config(
        {
            **base,
            "task": {
                "name": "instructions",
                "source": str(train),
                "eval_data": str(evaluation),
                "partition": "field",
                "partition_field": "topic",
            },
        }
    )
    split = ExperimentData.load(field).split
    topics = [{ExperimentData.load(field).train[i].fields["topic"] for i in shard} for shard in split.clients]
    assert sorted(map(sorted, topics)) == [["even"], ["odd"]], "one topic per client"
    with pytest.raises(DataError, match="skews clients by the gold answer"):
        ExperimentData.load(
            build_config(
                {
                    **base,
                    "task": {
                        "name": "instructions",
                        "source": str(train),
                        "eval_data": str(evaluation),
                        "partition": "dirichlet",
                    },
                }
            )
        )


# ---------------------------------------------------------------------------------------------
# Records and paired statistics of generated answers


def _gset(rnd: int, em: list[float], f1: list[float], client: int | None = None) -> GenerationSet:
    return GenerationSet(
        rnd,
        "slm",
        client,
        "eval",
        tuple(
            GeneratedRecord(f"e{i:03d}", f"answer {i}", ("ref",), e, f, f)
            for i, (e, f) in enumerate(zip(em, f1, strict=True))
        ),
    )


def test_generated_answer_records_round_trip(tmp_path: Path) -> None:
    sets = [_gset(0, [1, 0, 1], [1, 0.5, 1]), _gset(2, [0, 0, 1], [0.2, 0.0, 1], client=1)]
    write_records(tmp_path, sets)
    assert read_generation_sets(tmp_path) == sorted(sets, key=lambda s: s.file_name)
    assert read_question_sets(tmp_path) == [], "multiple-choice readers skip generated answers"
    wire = generation_scores_to_wire(sets[0].examples)
    back = generation_scores_from_wire(wire, ["e000", "e001", "e002"], [("ref",)] * 3, client=0)
    assert [(r.exact_match, r.f1, r.rouge_l) for r in back] == [(1, 1, 1), (0, 0.5, 0.5), (1, 1, 1)]
    assert all(r.prediction == "" for r in back), "a client's answers stay on its node"


def test_before_after_on_generated_answers_agrees_with_scipy() -> None:
    rng = np.random.default_rng(3)
    before_em = rng.integers(0, 2, 40).astype(float)
    after_em = np.where(rng.random(40) < 0.3, 1.0, before_em)
    before_f1, after_f1 = rng.random(40), rng.random(40)
    found = generation_before_after(
        [_gset(0, list(before_em), list(before_f1)), _gset(2, list(after_em), list(after_f1))], "slm", 2
    )
    assert found is not None
    em, f1 = found["exact_match"], found["f1"]
    b = int(np.sum((after_em == 1) & (before_em == 0)))
    c = int(np.sum((after_em == 0) & (before_em == 1)))
    assert (em.b, em.c) == (b, c)  # type: ignore[union-attr]
    assert em.p == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue)
    assert f1.delta == pytest.approx(100 * np.mean(after_f1 - before_f1))
    assert f1.p == pytest.approx(sign_flip_p(after_f1 - before_f1))
    assert f1.ci_low < f1.delta < f1.ci_high
    assert generation_before_after([_gset(0, [1.0], [1.0])], "slm", 2) is None


# ---------------------------------------------------------------------------------------------
# CrossLM's instruction/response pairs


def _pair_kind(models: TinyModels, tmp_path: Path, task: str = "instructions"):  # type: ignore[no-untyped-def]
    from fedcollm.algorithms.crosslm.kinds import synthetic_kind

    data = free_text_config(models, "crosslm", tmp_path)
    if task != "instructions":
        data["task"] = {"name": task}
    config = build_config(data)
    return config, synthetic_kind(config, task_family(task))


def test_crosslm_parses_written_pairs_strictly(tiny_models: TinyModels, tmp_path: Path) -> None:
    from fedcollm.algorithms.crosslm.kinds import WrittenPair

    _, kind = _pair_kind(tiny_models, tmp_path)
    demo = WrittenPair("d", "Name a fruit.", "An apple.")
    prompt = kind.build_prompt([demo])
    assert prompt.endswith("\n\nInstruction:") and "Instruction: Name a fruit.\nResponse: An apple." in prompt
    ok = kind.parse(
        kind.completion(WrittenPair("x", "Name a tree.", "An oak.")),
        finished=False,
        example_id="r1-0",
        demonstrations=[demo],
    )
    assert ok.ok and ok.question == WrittenPair("r1-0", "Name a tree.", "An oak.")
    assert (
        kind.parse(" Name a tree.\nAn oak.\n\n", finished=True, example_id="x", demonstrations=[]).status
        == "malformed"
    )
    assert (
        kind.parse(" Name a tree.\nResponse:", finished=True, example_id="x", demonstrations=[]).status
        == "malformed"
    )
    assert (
        kind.parse(" Name a tree.\nResponse: An", finished=False, example_id="x", demonstrations=[]).status
        == "truncated"
    )
    marked = kind.mark_duplicates(
        [ok, ok], known=[], evaluation=[kind.key(WrittenPair("e", "name a TREE", "x"))]
    )
    assert marked[0].status == "eval_overlap"
    assert kind.unpack(kind.pack([demo, ok.question], "c"), "c") == [demo, ok.question]
    _, qa = _pair_kind(tiny_models, tmp_path, "nq_open")
    two_lines = qa.parse(
        " who wrote hamlet\nResponse: Shakespeare\nand others\n\n",
        finished=True,
        example_id="x",
        demonstrations=[],
    )
    assert two_lines.status == "malformed", "a short answer is one line"


def test_crosslm_scores_a_pair_by_the_slms_per_token_likelihood_of_the_response(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    import torch

    from fedcollm.algorithms.crosslm.kinds import WrittenPair
    from fedcollm.parties.loading import load_models

    config, kind = _pair_kind(tiny_models, tmp_path)
    slm, _ = load_models(config, with_llm=False)
    pairs = [
        WrittenPair("a", "Name a fruit.", "An apple."),
        WrittenPair("b", "Say hi.", "Hello there, friend."),
    ]
    scores = kind.scores(slm, pairs)
    assert np.all((scores > 0) & (scores <= 1))
    (item,) = kind.train_items(pairs[:1])
    encoded = slm.encode_sft([item], config.train.max_length)[0]
    with torch.no_grad():
        logits = slm.model(torch.tensor([encoded.input_ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    targets = encoded.input_ids[encoded.n_context :]
    total = sum(float(logp[encoded.n_context - 1 + i, t]) for i, t in enumerate(targets))
    assert scores[0] == pytest.approx(np.exp(total / len(targets)), rel=1e-4)
    assert isinstance(item, InstructionExample) and item.messages == (
        Message("user", "Name a fruit."),
        Message("assistant", "An apple."),
    )


EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def test_the_documented_instruction_example_files_read_as_instructions() -> None:
    family = task_family("instructions")
    a = family.read_file(str(EXAMPLES / "instructions-a.jsonl"), None, ["topic"])
    b = family.read_file(str(EXAMPLES / "chat-b.jsonl"), None, ["topic"])
    evaluation = family.read_file(str(EXAMPLES / "instructions-eval.csv"), None, ())
    assert [len(a), len(b), len(evaluation)] == [3, 2, 2]
    assert all(isinstance(r, InstructionExample) for r in [*a, *b, *evaluation])
    assert b[1].messages[-1].role == "assistant" and len(b[1].messages) == 4
    assert evaluation[0].response == "without fever"
    with pytest.raises(DataError, match=r"field 'colour' is required"):
        family.read_file(str(EXAMPLES / "chat-b.jsonl"), None, ["colour"])


def test_compare_refuses_free_text_tasks_before_running_anything(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    from fedcollm.config import ConfigError
    from fedcollm.experiment.compare import run_comparison

    config = build_config(free_text_config(tiny_models, "fedcollm", tmp_path))

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may run")

    with pytest.raises(ConfigError, match="answered in free text"):
        run_comparison(config, tmp_path / "cmp", never, tasks=["instructions"])  # type: ignore[arg-type]


def test_fedcollm_distils_over_the_response_tokens_of_instruction_data(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's mutual distillation compares the two models at the response positions only:
    each aligned sequence's target is the conversation's response (and the end the template
    writes after it), in each model's own tokenisation."""
    import fedcollm.algorithms.fedcollm.algorithm as fedcollm_module

    seen: list[tuple[list, list]] = []
    distil = fedcollm_module.mutual_distill

    def recording(llm_model, slm_model, llm_examples, slm_examples, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((list(llm_examples), list(slm_examples)))
        return distil(llm_model, slm_model, llm_examples, slm_examples, *args, **kwargs)

    monkeypatch.setattr(fedcollm_module, "mutual_distill", recording)
    config = build_config(free_text_config(tiny_models, "fedcollm", tmp_path))
    run_experiment(config, tmp_path / "run")
    from fedcollm.data.families import task_family
    from fedcollm.lm.loading import load_tokenizer

    aux = ExperimentData.load(config).aux_records()
    llm_examples, slm_examples = seen[0]
    for examples, name in ((llm_examples, config.llm.name), (slm_examples, config.slm.name)):  # type: ignore[union-attr]
        tokenizer = load_tokenizer(name)
        for encoded, record in zip(examples, aux, strict=True):
            target = tokenizer.decode(list(encoded.answer_ids), skip_special_tokens=True)
            assert target.strip() == record.response, "the loss positions are the response's"
            context = tokenizer.decode(list(encoded.input_ids[: encoded.n_context]), skip_special_tokens=True)
            assert record.messages[0].content.split("\n")[0] in context
    assert task_family(config.task.name).kind == "generation"
