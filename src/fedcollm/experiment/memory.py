"""Will the run fit? Each party's peak memory per device, estimated before any weight loads.

For every model a party holds, from its architecture alone (built on the meta device):

- weights at their storage: the compute dtype's bytes per parameter, or for a `quantization`
  base 0.5 (NF4, + 1/64 for double-quantised block scales) or 1 byte (int8) per parameter of the
  decoder's linear layers, and float32 for the rest (peft's k-bit preparation upcasts it);
- the adapter: float32 weights, gradients and the two AdamW moments, 16 bytes per parameter;
- activations of one training micro-batch (`train.batch_size / train.grad_accum_steps` sequences of
  `train.max_length` tokens, an upper bound): what autograd keeps per token and layer, about
  `ACTIVATION_HIDDEN` hidden-size and `ACTIVATION_FFN` MLP-size vectors in the compute dtype
  (plus the attention scores where attention is eager), or with `train.gradient_checkpointing`
  one hidden vector per layer and one layer's full set; and the float32 logits of the answer
  positions (`answer_tokens` per sequence) with their softmax and gradient.

A device's peak is the weights and adapter state of every model on it plus the largest training
step that runs there (the server's distillation trains the LLM and the SLM at once). The
figures are estimates meant to catch a run that cannot fit (a 7B model in float32 on a 24 GB
GPU), not to budget the last gigabyte.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from fedcollm.algorithms import Algorithm
from fedcollm.config import ExperimentConfig, ModelConfig, device_setting
from fedcollm.data.generative import TrainItem, target_text
from fedcollm.errors import FedcollmError
from fedcollm.experiment.sizes import adapter_size, local_model_config
from fedcollm.lm.devices import available_devices, resolve_device
from fedcollm.lm.loading import ATTENTION
from fedcollm.lm.precision import torch_dtype
from fedcollm.parties.data import ExperimentData

GIB = 1024**3
ACTIVATION_HIDDEN = 12
"""Hidden-size vectors autograd keeps per token and layer (norm inputs, q/k/v, attention output,
residuals, LoRA inputs)."""
ACTIVATION_FFN = 3
"""MLP-size vectors kept per token and layer (gate, up and their product in a gated MLP)."""
ADAPTER_BYTES = 16
"""Per adapter parameter: float32 weight, gradient and AdamW's two moments."""


class MemoryPlanError(FedcollmError, ValueError):
    """A run whose estimated peak memory exceeds a device it would run on; names the levers."""


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, from a model's architecture."""

    linear_params: int
    """Parameters of the decoder's linear layers (what bitsandbytes quantises)."""
    other_params: int
    """Embeddings, norms, an untied head: kept at the compute dtype (float32 when quantised)."""
    adapter_params: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    vocab: int


def model_shape(model_config: PretrainedConfig, adapter_params: int) -> ModelShape:
    """The shape of an architecture, counted on the meta device (no weight is materialised)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    head = model.get_output_embeddings()
    # GPT-2's projections are transformers' Conv1D (a transposed Linear); bitsandbytes takes both.
    linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear | Conv1D) and m is not head
    )
    total = sum(p.numel() for p in model.parameters())
    text = model_config.get_text_config()
    hidden = int(_first(text, "hidden_size", "n_embd"))
    return ModelShape(
        linear_params=linear,
        other_params=total - linear,
        adapter_params=adapter_params,
        hidden=hidden,
        ffn=int(_first(text, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden) or 4 * hidden),
        layers=int(_first(text, "num_hidden_layers", "n_layer")),
        heads=int(_first(text, "num_attention_heads", "n_head")),
        vocab=int(text.vocab_size),
    )


def _first(config: PretrainedConfig, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    if default is None:
        raise ValueError(f"model config has none of {names}")
    return default


@dataclass(frozen=True)
class ModelMemory:
    """One model's share of its device: weights, adapter state, one training step's activations."""

    role: str
    device: str
    weights: int
    adapter: int
    activations: int
    levers: tuple[str, ...]
    """Config changes that would shrink it, most effective first."""

    @property
    def resident(self) -> int:
        return self.weights + self.adapter


@dataclass(frozen=True)
class DeviceMemory:
    """A device's estimated peak against what it has."""

    device: str
    peak: int
    capacity: int | None
    models: tuple[ModelMemory, ...] = field(default_factory=tuple)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak <= self.capacity

    def text(self) -> str:
        parts = ", ".join(
            f"{m.role} {_gib(m.weights)} weights + {_gib(m.adapter)} adapter/AdamW + "
            f"{_gib(m.activations)} activations"
            for m in self.models
        )
        have = f" of {_gib(self.capacity)}" if self.capacity is not None else ""
        verdict = "" if self.fits else " — does not fit"
        return f"{_gib(self.peak)}{have} ({parts}){verdict}"


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"


def model_memory(
    config: ExperimentConfig,
    model: ModelConfig,
    role: str,
    shape: ModelShape,
    device: str,
    answer_tokens: int,
) -> ModelMemory:
    """One model's estimated memory on `device` (see the module docstring for the terms); `role`
    is "slm", "llm" or "slm <name>" (another client model, configured by the [slm] section)."""
    key = role.split()[0]
    dtype = torch_dtype(config.dtype, torch.device(device))
    size = torch.empty((), dtype=dtype, device="meta").element_size()
    if model.quantization == "4bit":
        weights = int(shape.linear_params * (0.5 + 1 / 64)) + shape.other_params * 4
    elif model.quantization == "8bit":
        weights = shape.linear_params + shape.other_params * 4
    else:
        weights = (shape.linear_params + shape.other_params) * size
    train = config.train
    micro = -(-train.batch_size // train.grad_accum_steps)
    tokens = micro * train.max_length
    per_layer = ACTIVATION_HIDDEN * shape.hidden + ACTIVATION_FFN * shape.ffn
    if dtype in ATTENTION:  # eager attention keeps its [heads, length] scores per token
        per_layer += shape.heads * train.max_length
    if train.gradient_checkpointing:
        stored = tokens * size * (shape.layers * shape.hidden + per_layer)
    else:
        stored = tokens * size * shape.layers * per_layer
    logits = micro * min(answer_tokens, train.max_length) * shape.vocab * 4 * 3
    levers = []
    if model.quantization == "none":
        levers.append(f'{key}.quantization = "4bit"')
    if not train.gradient_checkpointing:
        levers.append("train.gradient_checkpointing = true")
    if micro > 1:
        levers.append(
            f"train.grad_accum_steps = {train.grad_accum_steps * 2} (or a smaller train.batch_size)"
        )
    return ModelMemory(
        role, device, weights, shape.adapter_params * ADAPTER_BYTES, stored + logits, tuple(levers)
    )


def device_capacity(device: str) -> int | None:
    """Memory a device offers, in bytes: a GPU's total, MPS's recommended limit, the host's RAM."""
    kind = torch.device(device)
    if kind.type == "cuda":
        return int(torch.cuda.get_device_properties(kind.index or 0).total_memory)
    if kind.type == "mps":
        return int(torch.mps.recommended_max_memory())
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def placed_device(config: ExperimentConfig, model: ModelConfig, role: str, devices: Sequence[str]) -> str:
    """The device a model would load on, among `devices` (this machine's, or a list a test injects)."""
    if model.device_map is not None:
        return next((d for d in devices if d.startswith("cuda")), devices[0])
    setting, name = device_setting(config, model, role)
    return str(resolve_device(setting, name, list(devices)))


def plan_memory(
    config: ExperimentConfig,
    models: Mapping[str, tuple[ModelConfig, ModelShape, bool]],
    *,
    answer_tokens: int,
    devices: Sequence[str] | None = None,
    capacities: Mapping[str, int | None] | None = None,
) -> list[DeviceMemory]:
    """Each device's estimated peak for the models a run holds.

    `models`: role -> (its config section, its shape, whether it trains on that device together
    with the others — the server's joint distillation — rather than on its own). `devices` and
    `capacities` default to this machine's; tests inject others.
    """
    devices = list(devices or available_devices())
    memories = [
        model_memory(
            config, section, role, shape, placed_device(config, section, role, devices), answer_tokens
        )
        for role, (section, shape, _) in models.items()
    ]
    joint = {role for role, (_, _, together) in models.items() if together}
    out = []
    for device in dict.fromkeys(m.device for m in memories):
        here = [m for m in memories if m.device == device]
        together = sum(m.activations for m in here if m.role in joint)
        alone = max((m.activations for m in here if m.role not in joint), default=0)
        peak = sum(m.resident for m in here) + max(together, alone)
        capacity = capacities.get(device) if capacities is not None else device_capacity(device)
        out.append(DeviceMemory(device, peak, capacity, tuple(here)))
    return out


def refuse_what_does_not_fit(plan: Sequence[DeviceMemory]) -> None:
    """Raise `MemoryPlanError` for the first device whose estimated peak exceeds its memory."""
    for device in plan:
        if device.fits:
            continue
        largest = max(device.models, key=lambda m: m.resident + m.activations)
        levers = list(largest.levers)
        if largest.role == "llm" and largest.device.startswith("cuda"):
            levers.append('llm.device_map = "auto" (spread it over the GPUs, the rest on the CPU)')
        have = _gib(device.capacity or 0)
        raise MemoryPlanError(
            f"the run needs about {_gib(device.peak)} on {device.device}, which has {have}: "
            f"{device.text()}; pull a lever: {'; '.join(levers) or 'a device with more memory'}"
        )


def answer_tokens_bound(items: Sequence[TrainItem]) -> int:
    """An upper bound on the answer tokens of a sequence: the longest target's characters / 2,
    rounded up (BPE and SentencePiece tokens average well over two characters), plus the few a
    chat template adds after a response."""
    longest = max((len(target_text(item)) for item in items), default=1)
    return -(-longest // 2) + 4


def memory_plan(
    config: ExperimentConfig,
    algorithm: type[Algorithm],
    data: ExperimentData,
    *,
    devices: Sequence[str] | None = None,
    capacities: Mapping[str, int | None] | None = None,
) -> tuple[list[DeviceMemory], list[str]]:
    """The run's per-device memory plan, and the models it could not size (no config offline).

    Held: the SLM (one copy shared by the in-process clients and the server, as the embedded
    engine holds it; a Flower client holds only that), each other client model, and the LLM where
    the algorithm uses one.
    """
    joint = algorithm.trains_llm_and_slm_together
    sections: dict[str, tuple[ModelConfig, bool]] = {"slm": (config.slm, joint)}
    fed = config.federation
    for name in dict.fromkeys(fed.client_model(k, config.slm.name) for k in range(fed.num_clients)):
        if name != config.slm.name:
            sections[f"slm {name}"] = (config.slm.model_copy(update={"name": name}), False)
    if algorithm.uses_llm and config.llm is not None:
        sections["llm"] = (config.llm, joint)
    shaped: dict[str, tuple[ModelConfig, ModelShape, bool]] = {}
    unknown = []
    for role, (section, together) in sections.items():
        model_config = local_model_config(section.name)
        if model_config is None:
            unknown.append(section.name)
            continue
        adapter = adapter_size(model_config, section.lora).adapter_params
        shaped[role] = (section, model_shape(model_config, adapter), together)
    answers = answer_tokens_bound(data.requests(config))
    plan = plan_memory(config, shaped, answer_tokens=answers, devices=devices, capacities=capacities)
    return plan, unknown
