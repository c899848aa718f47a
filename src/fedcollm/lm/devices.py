"""Where a model computes: what a config's `device` means on this machine, and the crossings.

A config names a device as "auto", "cpu", "cuda", "cuda:N" or "mps" (`fedcollm.config`
validates the spelling); `resolve_device` turns it into a `torch.device` that exists here, or
refuses with the devices this machine does have. Every tensor a model computes with lives on
that model's device (`model_device`); the only crossings to the host are the wire
(`to_numpy`: adapters, knowledge sets, scores) and the host-side records.
"""

from __future__ import annotations

import numpy as np
import torch

from fedcollm.errors import FedcollmError


class DeviceError(FedcollmError, ValueError):
    """A device a config or node names that this machine does not have."""


def available_devices() -> list[str]:
    """The devices this machine offers, in the order `auto` prefers them (CPU last)."""
    names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        names.append("mps")
    return [*names, "cpu"]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(setting: str, field: str = "device", available: list[str] | None = None) -> torch.device:
    """The device a setting names: "auto" picks CUDA (device 0), then MPS, then the CPU.

    A CUDA index past this machine's devices, or CUDA/MPS where there is none, is refused with
    `field` (the config key or node-config entry that named it) and what this machine has.
    `available` stands for this machine's devices (`available_devices()`, in its order) where a
    plan is made for another machine.
    """
    have = available_devices() if available is None else available
    if setting == "auto":
        return torch.device(have[0])
    device = torch.device(setting)
    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        if f"cuda:{index}" not in have:
            raise DeviceError(
                f"{field} = {setting!r}: this machine has no CUDA device {index} "
                f'(devices here: {", ".join(have)}); use "auto" or one of those'
            )
        return torch.device("cuda", index)
    if device.type == "mps" and "mps" not in have:
        raise DeviceError(
            f"{field} = {setting!r}: MPS is not available here (devices here: {', '.join(have)})"
        )
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model takes its inputs on: that of its input embeddings.

    A model spread over several devices (`device_map`) runs each block where it sits and moves
    activations between them itself; its token ids go where its embedding table is.
    """
    embeddings = getattr(model, "get_input_embeddings", None)
    if embeddings is not None and embeddings() is not None:
        return embeddings().weight.device
    return next(model.parameters()).device


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values on the host, detached: the one way fedcollm leaves a device for numpy."""
    return tensor.detach().cpu().numpy()


def from_numpy(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device` (sharing the array's memory when that is the CPU)."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)
