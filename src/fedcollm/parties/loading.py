"""Every party's models, loaded from the experiment with the same seeds on every engine.

Each model goes to its device (`ModelConfig.device`, else the experiment's `device`, which a
SuperNode's node config may override) and computes in the dtype `dtype` means there.
"""

from __future__ import annotations

import logging

from fedcollm.config import ConfigError, ExperimentConfig, ModelConfig, device_setting
from fedcollm.lm.devices import resolve_device
from fedcollm.lm.models import LoadedModel, Placement, load_with_lora
from fedcollm.lm.precision import dtype_warning, torch_dtype
from fedcollm.protocol import Seed, derive_seed

log = logging.getLogger(__name__)


def placement(config: ExperimentConfig, model: ModelConfig, role: str) -> Placement:
    """Where and how a party's model is held: its device, compute dtype and quantisation.

    The device is the model's own `device`, else the experiment's; `role` ("slm" or "llm") names
    the config section in a refusal. A forced dtype the device computes badly is warned about.
    """
    device = resolve_device(*device_setting(config, model, role))
    warning = dtype_warning(config.dtype, device)
    if warning is not None:
        log.warning(warning)
    return Placement(
        device=device,
        dtype=torch_dtype(config.dtype, device),
        quantization=model.quantization,
        device_map=model.device_map,
    )


def load_client_models(config: ExperimentConfig, slm: LoadedModel) -> list[LoadedModel]:
    """Each client's SLM; clients naming the same model share one loaded copy (only adapters differ)."""
    loaded = {slm.name: slm}
    out = []
    for k in range(config.federation.num_clients):
        name = config.federation.client_model(k, config.slm.name)
        if name not in loaded:
            loaded[name] = load_client_model(config, name)
        out.append(loaded[name])
    return out


def load_client_model(config: ExperimentConfig, name: str) -> LoadedModel:
    """A client's SLM `name`, with the LoRA shape and initial seed every SLM of the run shares."""
    return load_with_lora(
        name,
        config.slm.lora,
        derive_seed(config.seed, Seed.SLM_INIT),
        placement(config, config.slm, "slm"),
        config.task.plain_template,
    )


def load_models(config: ExperimentConfig, with_llm: bool) -> tuple[LoadedModel, LoadedModel | None]:
    """Load the SLM (shared by all in-process clients) and, if needed, the server's LLM."""
    slm = load_client_model(config, config.slm.name)
    llm = None
    if with_llm:
        if config.llm is None:
            raise ConfigError(f"algorithm {config.algorithm!r} needs an [llm] section")
        llm = load_with_lora(
            config.llm.name,
            config.llm.lora,
            derive_seed(config.seed, Seed.LLM_INIT),
            placement(config, config.llm, "llm"),
            config.task.plain_template,
        )
    return slm, llm
