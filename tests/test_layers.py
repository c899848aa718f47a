"""The package's layers: every import, deferred ones included, points down a layer or stays in its own.

docs/architecture.md draws the layers; `LAYERS` here is the same picture, checked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedcollm"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("fedcollm.errors", "fedcollm.protocol", "fedcollm.config", "fedcollm.config_doc"),
    ("fedcollm.data", "fedcollm.align"),
    ("fedcollm.lm",),
    ("fedcollm.training", "fedcollm.evaluation", "fedcollm.federation"),
    ("fedcollm.parties",),
    ("fedcollm.algorithms",),
    ("fedcollm.experiment",),
    ("fedcollm.engines",),
    ("fedcollm.cli", "fedcollm.__main__"),
)
"""Bottom to top: a module may import from its own layer and the layers before it."""


def module_name(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imported_modules(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, module) of every import of a fedcollm module in `path`, wherever it stands.

    `from fedcollm.x import y` counts as an import of `fedcollm.x.y` where that is a module,
    else of `fedcollm.x`; relative imports are resolved against the file's package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in modules else base))
    return [(line, name) for line, name in found if name == "fedcollm" or name.startswith("fedcollm.")]


def layer_of(module: str) -> int:
    """The layer of a module (the package root, which imports nothing, sits at the bottom)."""
    if module == "fedcollm":
        return 0
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md")


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks (imports there never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def test_every_module_belongs_to_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_import_points_up_a_layer() -> None:
    upward = [
        f"{path.relative_to(SRC.parent)}:{line}: {module} (layer {layer_of(module)}) imports "
        f"{target} (layer {layer_of(target)})"
        for module, path in MODULES.items()
        for line, target in imported_modules(path)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_layer_check_sees_imports_deferred_into_functions(tmp_path: Path) -> None:
    root = tmp_path / "fedcollm"
    (root / "data").mkdir(parents=True)
    (root / "engines").mkdir()
    (root / "engines" / "local.py").write_text("")
    probe = root / "data" / "probe.py"
    probe.write_text("def later():\n    from ..engines import local\n    return local\n")
    found = imported_modules(probe, root)
    assert found == [(2, "fedcollm.engines.local")]
    assert layer_of(module_name(probe, root)) < layer_of(found[0][1])  # upward: the test would fail


def _import_graph() -> dict[str, set[str]]:
    """module -> the fedcollm modules it imports when it runs (TYPE_CHECKING blocks left out)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        graph[module] = {target for line, target in imported_modules(path) if line not in skip} - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_modules_import_each_other_at_run_time() -> None:
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "module", ["fedcollm.protocol", "fedcollm.config", "fedcollm.engines.flower.client_app", "fedcollm.cli"]
)
def test_messages_and_the_flower_client_app_import_without_the_model_stack(module: str) -> None:
    """A ClientReply, a config or a SecAgg+ key-exchange stage must not pull in torch or transformers."""
    code = (
        f"import sys, {module}; heavy = sorted({{'torch', 'transformers', 'peft'}} & set(sys.modules)); "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"importing {module} imported {result.stdout.strip()}"
