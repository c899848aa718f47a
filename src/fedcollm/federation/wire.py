"""The precision adapter arrays travel in between server and clients.

LoRA adapters are trained and aggregated in float32, but nothing forces them to travel in it:
sent as float16 or bfloat16 they take half the bytes, and the rounding (relative error at most
2**-11 for float16, 2**-8 for bfloat16) is far below the noise of one local epoch of SGD.
`federation.transport_dtype` selects it; the algorithms' default message hooks apply it on both
ways (`Algorithm.configure_fit` encodes the download, `train_client_adapter` decodes it and
encodes the upload, `Algorithm.screen_fit` decodes uploads before screening and aggregation), so
every engine moves — and the communication ledger counts — the narrow arrays, and the server
only ever aggregates float32 values.

numpy has no bfloat16, so a bfloat16 array travels as the `uint16` bit pattern of its bfloat16
values (the upper half of the float32 word, rounded to nearest even by torch's conversion);
`decode` reads it back exactly. Flower's records and SecAgg+ never see that view (clients that
hold an adapter for SecAgg+ hold it decoded).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

from fedcollm.errors import FedcollmError
from fedcollm.lm.devices import from_numpy, to_numpy

TransportDtype = Literal["float32", "float16", "bfloat16"]


class TransportDtypeError(FedcollmError, ValueError):
    """Arrays that cannot travel in the chosen `federation.transport_dtype`."""


FLOAT16_MAX = float(np.finfo(np.float16).max)
"""Largest finite float16 (65504); adapters beyond it cannot travel as float16."""

ROUNDTRIP_RELATIVE_ERROR: dict[str, float] = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
"""Bound on |decode(encode(x)) - x| / |x| for x in the normal range of the transport dtype."""


HOST = torch.device("cpu")
"""Where wire arrays are converted: they travel from and to the host."""


def encode_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even), returned as its uint16 bit pattern."""
    tensor = from_numpy(np.asarray(values, dtype=np.float32), HOST)
    return to_numpy(tensor.to(torch.bfloat16).view(torch.int16)).view(np.uint16).copy()


def decode_bfloat16(bits: np.ndarray) -> np.ndarray:
    """The uint16 bit pattern of bfloat16 values -> float32 (exact)."""
    if bits.dtype != np.uint16:
        raise TransportDtypeError(f"bfloat16 arrays travel as uint16 bit patterns, got {bits.dtype}")
    tensor = from_numpy(np.ascontiguousarray(bits).view(np.int16), HOST)
    return to_numpy(tensor.view(torch.bfloat16).to(torch.float32))


def encode(arrays: Mapping[str, np.ndarray], dtype: TransportDtype) -> dict[str, np.ndarray]:
    """Float arrays as they travel in `dtype` (same names and order; float32 passes through).

    Raises ValueError when a value does not fit float16's range (use bfloat16 then).
    """
    if dtype == "float32":
        return dict(arrays)
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating):
            out[name] = value
        elif dtype == "float16":
            finite = value[np.isfinite(value)]
            if finite.size and float(np.max(np.abs(finite))) > FLOAT16_MAX:
                raise TransportDtypeError(
                    f"{name}: values up to {float(np.max(np.abs(finite))):.3g} exceed float16's range "
                    f"({FLOAT16_MAX:g}); use federation.transport_dtype = 'bfloat16' or 'float32'"
                )
            out[name] = value.astype(np.float16)
        elif dtype == "bfloat16":
            out[name] = encode_bfloat16(value)
        else:
            raise TransportDtypeError(f"unknown transport dtype {dtype!r}")
    return out


def decode(arrays: Mapping[str, np.ndarray], dtype: TransportDtype) -> dict[str, np.ndarray]:
    """Arrays received in `dtype` back as float32 (arrays already float32 pass through)."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if value.dtype == np.float16:
            out[name] = value.astype(np.float32)
        elif dtype == "bfloat16" and value.dtype == np.uint16:
            out[name] = decode_bfloat16(value)
        else:
            out[name] = value
    return out
