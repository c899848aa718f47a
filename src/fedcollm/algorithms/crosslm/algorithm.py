"""CrossLM (Deng et al., 2023, arXiv 2312.05842): SLMs steer the LLM's synthetic task data.

Only the paper's abstract is public; the mechanism below is issue 7's, and every choice the
abstract leaves open is listed in docs/algorithms/crosslm.md. One round t, in the loop's hooks:

- `configure_fit` (server): the LLM writes N candidate examples of the task from a task
  description and a few auxiliary-set demonstrations; malformed ones are discarded and counted.
  The payload carries the valid candidates C_t and the synthetic set S_{t-1} selected last round.
- `client_fit`: each client LoRA-trains its own SLM on its private shard plus S_{t-1} (round 1:
  the shard alone), then scores every candidate of C_t with it (its probability of the labelled
  choice among the choices) and replies with those floats only.
- `aggregate_fit`: the mean of the score vectors, weighted as `federation.weighting` says (FedAvg's
  mean, by example count unless set to uniform, so it can run under secure aggregation on the
  Flower engine).
- `server_update`: the LLM's LoRA trains on C_t with a feedback-weighted likelihood (weight 0
  unless the score beats chance by `crosslm.score_threshold`) on two objectives, answering each
  candidate and writing it after the generation prompt; the candidates with a positive weight
  become S_t. Every generation of the round is written to `<run>/synthetic/round_<t>.jsonl`.

With `crosslm.closing_round` the loop runs one more round in which the clients train on S_T and
score the final LLM's candidates, while the LLM is left as it is. Clients never send adapters:
each keeps its own (as in Standalone) and evaluates it itself. Besides the target task, the LLM is
evaluated on a held-out task it never trains on (metrics `heldout_*`, role "llm").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcollm.algorithms.base import Algorithm
from fedcollm.algorithms.crosslm.kinds import Example, SyntheticKind, synthetic_kind
from fedcollm.algorithms.crosslm.synthetic import (
    OK,
    STATUSES,
    GeneratedRecord,
    SamplingSettings,
    encode_written,
    generate_texts,
    write_jsonl,
)
from fedcollm.algorithms.registry import register
from fedcollm.algorithms.steps import (
    client_sft,
    evaluate_llm_while_changed,
    evaluate_role,
    llm_sft,
    score_model,
)
from fedcollm.config import ExperimentConfig, default_eval_split
from fedcollm.data import MCQuestion, load_questions, render, sample_indices
from fedcollm.data.families import task_family
from fedcollm.errors import RoundError
from fedcollm.evaluation.multiple_choice import (
    EncodedRequests,
    context_window,
    encode_requests,
    scoring_length,
)
from fedcollm.evaluation.records import QuestionSet
from fedcollm.federation.robust import Rejection, check_upload
from fedcollm.lm.encoding import Encoded
from fedcollm.lm.lora import get_adapter, set_adapter
from fedcollm.lm.models import LoadedModel
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import Arrays, ClientReply, Metric, Payload, Reporter, Seed, derive_seed

CANDIDATES = "crosslm.candidates"
"""Payload arrays: this round's candidates, which every client scores."""
SYNTHETIC = "crosslm.synthetic"
"""Payload arrays: last round's selected synthetic set, which every client trains on."""
FEEDBACK = "crosslm.feedback"
"""Reply array: [1, s_1, ..., s_n]; the leading 1 must average to 1 (a check on the aggregate)."""
_PREFIX = "crosslm."
_CHECK_TOLERANCE = 1e-3


def feedback_weights(scores: np.ndarray, chance: np.ndarray | float, threshold: float) -> np.ndarray:
    """Per-candidate training weights from the SLMs' mean score of each candidate.

    A score counts by its advantage over chance, a = (s - c) / (1 - c) (0 at chance, 1 for
    certainty): c = 1/m for a question with m choices, so one threshold means the same on tasks
    with 4 or 5 choices and SLMs near chance do not pass by luck; c = 0 for a written response,
    whose score is its per-token likelihood. The weight is a if a >= `threshold` (and a > 0), else
    0; positive weights are rescaled to average 1, which keeps the LLM's step size independent of
    how confident the SLMs happen to be while better-scored candidates still weigh more.
    """
    scores = np.asarray(scores, dtype=np.float64)
    chance = np.asarray(chance, dtype=np.float64)
    advantage = (scores - chance) / (1.0 - chance)
    weights = np.where((advantage >= threshold) & (advantage > 0), advantage, 0.0)
    positive = weights > 0
    if positive.any():
        weights[positive] /= weights[positive].mean()
    return weights


@dataclass
class RoundData:
    """What the server generated in one round, kept until the feedback arrives."""

    records: list[GeneratedRecord]
    prompts: list[str]

    @property
    def valid(self) -> list[GeneratedRecord]:
        return [r for r in self.records if r.status == OK]


@register
class CrossLM(Algorithm):
    """Synthetic task data from the LLM, scored by the clients' SLMs, trains both sides."""

    name = "crosslm"
    uses_llm = True
    secure_aggregation = True
    aggregates_adapters = False
    evaluates_on_clients = True
    server_state_keys = ("selected", "llm_version")
    client_state_keys = ("adapter",)

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> list[str]:
        problems = super().check_config(config)
        if config.crosslm.heldout_task == config.task.name:
            problems.append(
                f"crosslm.heldout_task must differ from the task the LLM trains on ({config.task.name!r})"
            )
        return problems

    @classmethod
    def needs_auxiliary_set(cls, config: ExperimentConfig) -> bool:
        """The generation prompts' demonstrations come from the auxiliary set (unless shots = 0)."""
        return config.crosslm.shots > 0

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__(config)
        self.kind: SyntheticKind = synthetic_kind(config, task_family(config.task.name))
        """What the LLM writes and the SLMs score: questions with choices, or instruction/response pairs."""

    def num_rounds(self) -> int:
        """T rounds, plus the closing round in which the SLMs train on the last selected set."""
        return self.config.federation.rounds + int(self.config.crosslm.closing_round)

    def _closing(self, rnd: int) -> bool:
        return rnd > self.config.federation.rounds

    def server_state(self, server: ServerRuntime) -> dict[str, Any]:
        state = super().server_state(server)
        if "selected" in state["state"]:  # questions travel as arrays, in checkpoints as in messages
            state["state"]["selected"] = self.kind.pack(state["state"]["selected"], SYNTHETIC)
        return state

    def restore_server_state(self, server: ServerRuntime, state: dict[str, Any]) -> None:
        super().restore_server_state(server, state)
        if "selected" in server.state:
            server.state["selected"] = self.kind.unpack(server.state["selected"], SYNTHETIC)

    # ------------------------------------------------------------------ server: generation

    def configure_fit(self, server: ServerRuntime, rnd: int, reporter: Reporter) -> Payload:
        """Generate this round's candidates; send them with last round's selection."""
        generated = self._generate(server, rnd, reporter)
        server.state.setdefault("generated", {})[rnd] = generated
        valid = [r.question for r in generated.valid if r.question is not None]
        selected: list[Example] = server.state.get("selected", [])
        arrays: Arrays = dict(server.global_adapter) if rnd == 1 else {}
        arrays |= self.kind.pack(valid, CANDIDATES) | self.kind.pack(selected, SYNTHETIC)
        return Payload(arrays, {"round": rnd, "candidates": len(valid), "synthetic": len(selected)})

    def _generate(self, server: ServerRuntime, rnd: int, reporter: Reporter) -> RoundData:
        config, cfg, kind = self.config, self.config.crosslm, self.kind
        llm = server.model("llm")
        pool = kind.demonstrations(server.data.aux_records())
        rng = np.random.default_rng(derive_seed(config.seed, Seed.DEMONSTRATIONS, rnd))
        demos = [
            [pool[int(i)] for i in rng.choice(len(pool), size=min(cfg.shots, len(pool)), replace=False)]
            for _ in range(cfg.num_candidates)
        ]
        prompts = [kind.build_prompt(d) for d in demos]
        settings = SamplingSettings(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.generation_batch_size,
        )
        reporter.phase(f"round {rnd} · {llm.name} writing {cfg.num_candidates} candidate examples")
        generations = generate_texts(
            llm.model,
            llm.tokenizer,
            prompts,
            add_bos=llm.add_bos,
            settings=settings,
            seed=derive_seed(config.seed, Seed.GENERATION, rnd),
            on_batch=lambda b, total: reporter.advance(b, total),
            terminators=kind.terminators,
        )
        parsed = [
            kind.parse(g.text, finished=g.finished, example_id=f"r{rnd}-{i}", demonstrations=pool)
            for i, g in enumerate(generations)
        ]
        evaluation = kind.demonstrations(server.data.eval_records)
        parsed = kind.mark_duplicates(parsed, pool, [kind.key(e) for e in evaluation])
        finish_rng = np.random.default_rng(derive_seed(config.seed, Seed.CHOICE_ORDER, rnd))
        records = []
        for i, (g, p) in enumerate(zip(generations, parsed, strict=True)):
            example = p.question
            if p.ok and example is not None:
                example = kind.finalize(example, finish_rng)
            records.append(
                GeneratedRecord(
                    round=rnd,
                    index=i,
                    status=p.status,
                    reason=p.reason,
                    raw=g.text,
                    demonstrations=[e.id for e in demos[i]],
                    question=example,
                    example=kind.to_dict(example) if example is not None else None,
                )
            )
        return RoundData(records, prompts)

    # ------------------------------------------------------------------ client

    def client_fit(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
    ) -> ClientReply:
        """Train the own SLM on private data plus the synthetic set, then score the candidates."""
        config = self.config
        initial = {k: v for k, v in payload.arrays.items() if not k.startswith(_PREFIX)}
        start = client.state.get("adapter", initial)
        if not start:
            raise RoundError(
                f"client {client.client_id} has no SLM adapter to continue from (its state between "
                "rounds was lost: a restarted SuperNode?)"
            )
        set_adapter(client.slm.model, start)
        synthetic = self.kind.unpack(payload.arrays, SYNTHETIC)
        examples = list(client.train) + self._encode(client.slm, synthetic)
        reporter.phase(
            f"round {rnd} · client {client.client_id} training on {len(client.train)} own + "
            f"{len(synthetic)} synthetic examples"
        )
        # The clients train in every round, the closing one too.
        result = client_sft(config, client, examples, rnd, reporter, rounds=self.num_rounds())
        client.state["adapter"] = get_adapter(client.slm.model)
        candidates = self.kind.unpack(payload.arrays, CANDIDATES)
        reporter.phase(f"round {rnd} · client {client.client_id} scoring {len(candidates)} candidates")
        scores = self.kind.scores(client.slm, candidates)
        feedback = np.concatenate([[1.0], scores]).astype(np.float32)
        return ClientReply(
            client=client.client_id,
            arrays={FEEDBACK: feedback},
            num_examples=len(client.train),
            metrics={
                "train_loss": result.mean_loss,
                "steps": float(result.steps),
                "synthetic_examples": float(len(synthetic)),
            },
        )

    def _encode(self, lm: LoadedModel, examples: Sequence[Example]) -> list[Encoded]:
        """Synthetic examples as `lm`'s training sequences, in the task's own form."""
        return lm.encode_sft(self.kind.train_items(examples), self.config.train.max_length)

    # ------------------------------------------------------------------ server: feedback, LLM update

    def server_update(
        self, server: ServerRuntime, aggregate: Arrays, rnd: int, reporter: Reporter
    ) -> list[Metric]:
        """Weigh the candidates by the mean feedback, train the LLM, select S_t, save the round."""
        cfg = self.config.crosslm
        generated: RoundData = server.state["generated"].pop(rnd)
        valid = generated.valid
        scores = self._scores(aggregate, len(valid), rnd)
        chance = self.kind.chance([r.question for r in valid if r.question is not None])
        weights = feedback_weights(scores, chance, cfg.score_threshold)
        for record, score, weight in zip(valid, scores, weights, strict=True):
            record.score, record.weight, record.selected = float(score), float(weight), bool(weight > 0)
        metrics = self._generation_metrics(generated, scores, weights, rnd)
        if not self._closing(rnd):
            server.state["selected"] = [r.question for r in valid if r.selected]
            if (weights > 0).any():
                metrics += self._train_llm(server, generated, weights, rnd, reporter)
                server.state["llm_version"] = server.state.get("llm_version", 0) + 1
            else:
                reporter.message(f"round {rnd}: no candidate reached the score threshold; LLM unchanged")
        if server.run_dir is not None:
            write_jsonl(server.run_dir / "synthetic" / f"round_{rnd}.jsonl", generated.records)
        return metrics

    def screen_fit(
        self, server: ServerRuntime, payload: Payload, replies: Sequence[ClientReply], rnd: int
    ) -> tuple[list[ClientReply], list[Rejection]]:
        """Uploads are feedback vectors, not adapters: refuse those that are not finite floats."""
        accepted, rejected = [], []
        for reply in replies:
            expected = {name: np.zeros(np.shape(value), np.float32) for name, value in reply.arrays.items()}
            reason = check_upload(reply, expected) if reply.arrays else "no feedback sent"
            if reason is None:
                accepted.append(reply)
            else:
                rejected.append(Rejection(reply.client, reason))
        return accepted, rejected

    def _scores(self, aggregate: Arrays, n: int, rnd: int) -> np.ndarray:
        feedback = np.asarray(aggregate.get(FEEDBACK, np.ones(1)), dtype=np.float64)
        if feedback.shape != (n + 1,):
            raise RoundError(f"round {rnd}: feedback for {feedback.size - 1} candidates, expected {n}")
        if abs(feedback[0] - 1.0) > _CHECK_TOLERANCE:
            raise RoundError(
                f"round {rnd}: the aggregated feedback check is {feedback[0]:.6f}, not 1: the mean is not "
                "a weighted mean of the clients' scores (aggregation or quantisation error)"
            )
        return feedback[1:]

    def _generation_metrics(
        self, generated: RoundData, scores: np.ndarray, weights: np.ndarray, rnd: int
    ) -> list[Metric]:
        counts = Counter(r.status for r in generated.records)
        total = len(generated.records)
        kept = weights > 0
        values: dict[str, float] = {
            "generated": float(total),
            "valid": float(counts[OK]),
            "discard_rate": (total - counts[OK]) / total if total else 0.0,
            "selected": float(kept.sum()),
        }
        # Means of nothing are left out rather than written as NaN (not valid JSON).
        if scores.size:
            values["feedback_mean"] = float(scores.mean())
        if kept.any():
            values["selected_feedback_mean"] = float(scores[kept].mean())
        values |= {f"discarded_{s}": float(counts[s]) for s in STATUSES if s != OK}
        golds = [r.question.gold for r in generated.valid if isinstance(r.question, MCQuestion)]
        if golds:
            values["gold_letter_max_share"] = float(max(Counter(golds).values()) / len(golds))
        return [Metric(rnd, "server", None, key, value) for key, value in values.items()]

    def _train_llm(
        self, server: ServerRuntime, generated: RoundData, weights: np.ndarray, rnd: int, reporter: Reporter
    ) -> list[Metric]:
        config, cfg = self.config, self.config.crosslm
        llm = server.model("llm")
        assert config.llm is not None
        examples: list[Encoded] = []
        example_weights: list[float] = []
        window = context_window(llm.model, llm.tokenizer)
        too_long = 0
        for record, weight in zip(generated.valid, weights, strict=True):
            if weight <= 0 or record.question is None:
                continue
            question = record.question
            examples += self._encode(llm, [question])
            example_weights.append(float(weight))
            if cfg.generation_loss_weight > 0:
                # The whole prompt as generation saw it, not cut to train.max_length; only a
                # sequence beyond the model's context window is left out (and counted).
                written = encode_written(
                    llm.tokenizer,
                    generated.prompts[record.index],
                    self.kind.completion(question),
                    add_bos=llm.add_bos,
                )
                if len(written.input_ids) > window:
                    too_long += 1
                    continue
                examples.append(written)
                example_weights.append(float(weight) * cfg.generation_loss_weight)
        if too_long:
            reporter.message(
                f"round {rnd}: {too_long} write example(s) longer than {llm.name}'s context window "
                f"({window} tokens) skipped"
            )
        reporter.phase(f"round {rnd} · {llm.name} training on {len(examples)} weighted examples")
        result = llm_sft(config, llm, examples, rnd, reporter, epochs=cfg.llm_epochs, weights=example_weights)
        metrics = [Metric(rnd, "llm", None, "train_loss", result.mean_loss)]
        if cfg.generation_loss_weight > 0:
            metrics.append(Metric(rnd, "server", None, "write_skipped", float(too_long)))
        return metrics

    # ------------------------------------------------------------------ evaluation

    def eval_roles(self, server: ServerRuntime) -> list[str]:
        """The server evaluates only its LLM; clients evaluate their own SLMs."""
        return [role for role in super().eval_roles(server) if role == "llm"]

    def evaluate(self, server: ServerRuntime, rnd: int, reporter: Reporter) -> list[Metric]:
        """The LLM on the target task and on the held-out task (reused while the LLM is unchanged)."""
        if "llm" not in self.eval_roles(server):
            return []
        return evaluate_llm_while_changed(
            server,
            rnd,
            lambda: (
                evaluate_role(self.config, server, "llm", rnd, reporter)
                + self._heldout(server, rnd, reporter)
            ),
        )

    def _heldout(self, server: ServerRuntime, rnd: int, reporter: Reporter) -> list[Metric]:
        config, cfg = self.config, self.config.crosslm
        if cfg.heldout_task is None:
            return []
        llm = server.model("llm")
        if "heldout" not in server.state:
            split = cfg.heldout_split or default_eval_split(cfg.heldout_task)
            pool = load_questions(cfg.heldout_task, split, cfg.heldout_source)
            chosen = sample_indices(len(pool), cfg.heldout_limit, config.eval_seed)
            requests = [render(cfg.heldout_task, pool[i], cfg.heldout_format) for i in chosen]
            server.state["heldout"] = encode_requests(
                llm.tokenizer,
                requests,
                add_bos=llm.add_bos,
                max_length=scoring_length(llm.model, llm.tokenizer),
            )
        encoded: EncodedRequests = server.state["heldout"]
        reporter.phase(f"round {rnd} · evaluating llm ({llm.name}) on held-out {cfg.heldout_task}")
        result = score_model(config, llm, encoded, reporter, server.resources)
        server.evaluations.append(
            QuestionSet.from_loglikelihoods(
                rnd, "llm", None, encoded.requests, result.loglikelihoods, "heldout"
            )
        )
        return [Metric(rnd, "llm", None, f"heldout_{k}", v) for k, v in result.summary().items()]

    def results_extra(self, metrics: Sequence[Metric], communication: dict[str, Any]) -> list[str]:
        """Held-out accuracy of the LLM and the synthetic data's quality per round, for results.md."""
        cfg = self.config.crosslm
        lines: list[str] = []
        heldout = {m.round: m.value for m in metrics if m.role == "llm" and m.metric == "heldout_acc"}
        if heldout:
            first, last = min(heldout), max(heldout)
            lines += [
                f"LLM on the held-out task {cfg.heldout_task} (never trained on): acc "
                f"{100 * heldout[first]:.1f} before, {100 * heldout[last]:.1f} after.",
                "",
            ]
        per_round: dict[int, dict[str, float]] = {}
        for m in metrics:
            if m.role == "server" and m.client is None:
                per_round.setdefault(m.round, {})[m.metric] = m.value
        if per_round:
            lines += [
                "| round | generated | valid | discard rate | mean feedback | selected |",
                "|---|---|---|---|---|---|",
            ]
            for rnd in sorted(per_round):
                row = per_round[rnd]
                feedback = f"{row['feedback_mean']:.3f}" if "feedback_mean" in row else "-"
                lines.append(
                    f"| {rnd} | {row.get('generated', 0):.0f} | {row.get('valid', 0):.0f} | "
                    f"{100 * row.get('discard_rate', 0.0):.0f}% | {feedback} | {row.get('selected', 0):.0f} |"
                )
            lines.append("")
        return lines
