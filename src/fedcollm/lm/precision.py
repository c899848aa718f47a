"""The compute dtype of the frozen base models: what `dtype = "auto"` means on a device.

Adapters, their optimiser state and every loss stay float32 whatever is chosen here; only the
frozen base weights and their matmuls change precision. float16, which only overflows where
bfloat16 would lose precision, needs its gradients scaled (`needs_loss_scaling`;
`fedcollm.training.optimise` does it).
"""

from __future__ import annotations

from typing import cast

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Compute dtypes a config may name (besides "auto")."""

_HOST = torch.device("cpu")


def torch_dtype(name: str, device: torch.device = _HOST) -> torch.dtype:
    """The compute dtype a config's `dtype` names; "auto" is resolved for `device`.

    auto: bfloat16 where the device computes it natively (a CUDA GPU with bf16, a CPU with
    AVX-512 BF16 or AMX), float16 on a CUDA GPU without bf16 (pre-Ampere), else float32.
    """
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_bfloat16() else torch.float16
    if device.type == "cpu" and native_bfloat16():
        return torch.bfloat16
    return torch.float32


def dtype_text(setting: str, device: torch.device = _HOST) -> str:
    """The compute dtype as run summaries state it, e.g. "bfloat16 (auto)"."""
    if setting != "auto":
        return setting
    return f"{str(torch_dtype(setting, device)).removeprefix('torch.')} (auto)"


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16 or AMX).

    Only then is bfloat16 faster than float32 (x1.6 per training step, x2 per evaluation on the
    AVX-512 BF16 machine of bench/README.md); elsewhere torch emulates it, more slowly. A CPU
    whose torch kernels are limited below AVX-512 (`ATEN_CPU_CAPABILITY=avx2`, how one runs as
    an AVX2-only machine would) counts as without: its bfloat16 element-wise kernels are emulated.
    """
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def _cuda_bfloat16() -> bool:
    """Whether the current CUDA GPU computes bfloat16 in hardware (Ampere and later)."""
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model's frozen matmuls compute in: bitsandbytes' compute dtype for a 4-bit
    base (float16 for LLM.int8, which casts its inputs to it), else its frozen weights' dtype."""
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and getattr(quantization, "load_in_4bit", False):
        return cast(torch.dtype, quantization.bnb_4bit_compute_dtype)
    if quantization is not None and getattr(quantization, "load_in_8bit", False):
        return torch.float16
    floating = [p.dtype for p in model.parameters() if not p.requires_grad and p.dtype.is_floating_point]
    return max(set(floating), key=floating.count) if floating else torch.float32


def needs_loss_scaling(dtype: torch.dtype) -> bool:
    """Whether gradients through base weights of `dtype` must be scaled to survive: float16's
    smallest normal number is 6e-5, and LoRA gradients of a small loss fall below it."""
    return dtype == torch.float16


def dtype_warning(setting: str, device: torch.device = _HOST) -> str | None:
    """Why a `dtype` the config forces will run badly on `device`, or None.

    bfloat16 on a CPU without AVX-512 BF16 or AMX is emulated: a bf16 matrix product ran at
    0.7 GFLOP/s against 124 GFLOP/s in float32 on a 2-core AVX2 EPYC (issue "Any hardware"), so a
    run that takes minutes in float32 takes hours. "auto" never picks it there. float16 on a CPU
    has no fast kernels either; on a GPU without bfloat16, bfloat16 is emulated.
    """
    if device.type == "cpu" and setting == "bfloat16" and not native_bfloat16():
        return (
            'dtype = "bfloat16" on a CPU without native bfloat16 (no AVX-512 BF16 or AMX): torch '
            'emulates it, over 100x slower than float32 here; use dtype = "auto" or "float32"'
        )
    if device.type == "cpu" and setting == "float16":
        return 'dtype = "float16" on a CPU: no fast float16 kernels there; use dtype = "auto" or "float32"'
    if device.type == "cuda" and setting == "bfloat16" and not _cuda_bfloat16():
        return (
            f'dtype = "bfloat16" on {torch.cuda.get_device_name(device)}, which has no bfloat16 '
            'arithmetic; use dtype = "auto" (float16 with loss scaling there)'
        )
    return None
