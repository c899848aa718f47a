"""The compute dtype of the frozen base models: what `dtype = "auto"` means on this machine.

Adapters, their optimiser state and every loss stay float32 whatever is chosen here; only the
frozen base weights and their matmuls change precision.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Compute dtypes a config may name (besides "auto")."""


def torch_dtype(name: str) -> torch.dtype:
    """The compute dtype a config's `dtype` names; "auto" is resolved for this machine."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16() else torch.float32
    return DTYPES[name]


def dtype_text(setting: str) -> str:
    """The compute dtype as run summaries state it, e.g. "bfloat16 (auto)"."""
    if setting != "auto":
        return setting
    return f"{str(torch_dtype(setting)).removeprefix('torch.')} (auto)"


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16 or AMX).

    Only then is bfloat16 faster than float32 (x1.6 per training step, x2 per evaluation on the
    AVX-512 BF16 machine of bench/README.md); elsewhere torch emulates it, more slowly.
    """
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def dtype_warning(setting: str) -> str | None:
    """Why a `dtype` the config forces will run badly on this machine, or None.

    bfloat16 on a CPU without AVX-512 BF16 or AMX is emulated: a bf16 matrix product ran at
    0.7 GFLOP/s against 124 GFLOP/s in float32 on a 2-core AVX2 EPYC (issue "Any hardware"), so a
    run that takes minutes in float32 takes hours. "auto" never picks it there.
    """
    if setting == "bfloat16" and not native_bfloat16():
        return (
            'dtype = "bfloat16" on a CPU without native bfloat16 (no AVX-512 BF16 or AMX): torch '
            'emulates it, over 100x slower than float32 here; use dtype = "auto" or "float32"'
        )
    return None
