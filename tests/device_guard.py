"""A guard that makes a forgotten `device=` fail on a CPU-only machine.

On a CPU a tensor created without a device lands where the models are, so the bug shows only on a
GPU. `HostTensorGuard` is a torch function mode that notes every tensor fedcollm's own code
constructs without naming a device (`torch.zeros(...)` rather than `torch.zeros(..., device=d)`),
every `torch.from_numpy` and every `Tensor.numpy()` outside `fedcollm.lm.devices` (whose
`from_numpy(array, device)` and `to_numpy(tensor)` are the only crossings between host and
device). Library code (torch, transformers, peft) is not watched: only calls made directly by a
file of `src/fedcollm`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import fedcollm

SOURCE = Path(fedcollm.__file__).resolve().parent
CROSSINGS = SOURCE / "lm" / "devices.py"
HERE = Path(__file__).resolve()
DISPATCH = Path(torch.__file__).resolve().parent / "overrides.py"

FACTORIES = frozenset(
    {
        torch.tensor,
        torch.as_tensor,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.empty,
        torch.arange,
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.eye,
        torch.linspace,
    }
)
CROSSING_CALLS = frozenset({torch.Tensor.numpy})
"""Crossings torch dispatches through function modes; `torch.from_numpy` (no tensor argument)
is not one, so the guard wraps it while active."""


def _caller() -> tuple[Path, int] | None:
    """The code that made the call the guard sees (the first frame above the guard and torch's
    dispatch), if it is fedcollm's own. A call torch makes inside one of its own functions is
    torch's: `clip_grad_norm_` building its norm is not fedcollm forgetting a device."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path != HERE and path != DISPATCH:
            return (path, frame.f_lineno) if SOURCE in path.parents else None
        frame = frame.f_back
    return None


class HostTensorGuard(TorchFunctionMode):
    """Collects, in `problems`, fedcollm's tensor constructions that name no device."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._from_numpy = torch.from_numpy

    def __enter__(self) -> HostTensorGuard:
        original = self._from_numpy

        def from_numpy(array: Any) -> torch.Tensor:
            self._note("torch.from_numpy (use fedcollm.lm.devices)")
            return original(array)

        torch.from_numpy = from_numpy  # type: ignore[assignment]
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        torch.from_numpy = self._from_numpy  # type: ignore[assignment]
        super().__exit__(*exc)

    def _note(self, what: str) -> None:
        site = _caller()
        if site is not None and site[0] != CROSSINGS:
            self.problems.append(f"{site[0].relative_to(SOURCE.parent)}:{site[1]}: {what}")

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            self._note(f"torch.{func.__name__} without device=")
        elif func in CROSSING_CALLS:
            self._note(f"torch.{func.__name__} (use fedcollm.lm.devices)")
        return func(*args, **kwargs)
