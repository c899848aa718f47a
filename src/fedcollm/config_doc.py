"""The configuration reference (docs/configuration.md), generated from the config models.

Regenerate with `python -m fedcollm.config_doc > docs/configuration.md`; a test keeps the file
equal to what this prints, so the documented keys and defaults cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from fedcollm.config import ExperimentConfig

HEADER = """# Configuration reference

An experiment is one TOML file; every key below is optional except the model names, and
`fedcollm run CONFIG --set key=value` overrides any of them. The run folder's `config.toml` is
the resolved configuration with every default spelled out. Unknown keys are refused with the
closest valid name suggested.

The FedCoLLM paper gives no lambda, temperature or learning rates; the defaults follow the
reference implementation (FATE-LLM: lambda = 1, temperature = 1, one epoch everywhere) and
LoRA r = 8, alpha = 16, dropout 0.05 on the attention query and value projections.
"""


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "section"
    return f"`{value!r}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is None:
            rows.append(f"| `{prefix}{name}` | {_default(field)} | {field.description or ''} |")
        elif name == "lora":
            rows += _rows(sub, f"{prefix}{name}.")
    return rows


def reference_markdown() -> str:
    """The whole reference page."""
    parts = [HEADER, "## Top level", "", "| key | default | meaning |", "|---|---|---|"]
    parts += _rows(ExperimentConfig, "")
    for name, field in ExperimentConfig.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is None:
            continue
        parts += ["", f"## `[{name}]`", ""]
        if sub.__doc__:
            parts += [" ".join(sub.__doc__.split()), ""]
        parts += ["| key | default | meaning |", "|---|---|---|", *_rows(sub, f"{name}.")]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
