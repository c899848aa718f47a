"""State as arrays plus a JSON layout: what checkpoints store and Flower's node state keeps.

An algorithm's state between rounds is nested dicts and lists of arrays and scalars (see
`Algorithm.server_state` / `client_state`). `flatten_state` replaces every array by a reference
into a flat dict of arrays and leaves a JSON-able layout; `unflatten_state` is its inverse. No
pickle anywhere: a value of any other type is refused with where it sits, never dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcollm.errors import FedcollmError


class StateError(FedcollmError, ValueError):
    """A state value that cannot be stored (an object that is not an array, scalar, list or dict)."""


def flatten_state(value: Any, where: str = "state") -> tuple[Any, dict[str, np.ndarray]]:
    """(layout, arrays): `value` with each array replaced by a reference into `arrays`."""
    arrays: dict[str, np.ndarray] = {}
    return _flatten(value, where, arrays), arrays


def unflatten_state(layout: Any, arrays: Any) -> Any:
    """The value `flatten_state` took apart (`arrays`: any mapping of the stored arrays)."""
    if isinstance(layout, dict):
        if "__array__" in layout:
            return np.array(arrays[layout["__array__"]])
        if "__scalar__" in layout:
            return np.array(arrays[layout["__scalar__"]])[()]
        if "__dict__" in layout:
            return {k: unflatten_state(v, arrays) for k, v in layout["__dict__"]}
        if "__list__" in layout:
            return [unflatten_state(v, arrays) for v in layout["__list__"]]
    return layout


def _flatten(value: Any, where: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, np.generic):  # a NumPy scalar keeps its dtype as a 0-d array
        key = f"a{len(arrays)}"
        arrays[key] = np.asarray(value)
        return {"__scalar__": key}
    if isinstance(value, dict):
        return {"__dict__": [[_key(k, where), _flatten(v, f"{where}/{k}", arrays)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return {"__list__": [_flatten(v, f"{where}/{i}", arrays) for i, v in enumerate(value)]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise StateError(
        f"{where} holds a {type(value).__name__}, which cannot be stored (arrays, scalars, lists, dicts)"
    )


def _key(key: Any, where: str) -> Any:
    if isinstance(key, bool | int | str):
        return key
    raise StateError(f"{where}: key {key!r} is not an int or str")
