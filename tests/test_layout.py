"""The package's layout is its architecture: each layer imports only the layers below it
(no import cycles, lazy imports inside functions included), and the flat module names of
earlier versions still import, as the same module objects."""

import ast
import importlib
from pathlib import Path

import segexec_jax
from segexec_jax import _moved

PKG = Path(segexec_jax.__file__).parent
# bottom to top; the top-level modules other than config and cli (the public API and the
# command lines) may import anything
LAYERS = ["config", "model", "segment", "data", "interop", "training", "inference", "evaluation"]
BASE = {"config", "cli"}


def layer(module: str) -> int:
    head = module.split(".")[0]
    if head in BASE:
        return 0
    return LAYERS.index(head) if head in LAYERS else len(LAYERS)


def imports(path: Path, module: str) -> set[str]:
    """The package modules `module` imports anywhere in its file (relative imports)."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                out.add(sub if (PKG / (sub.replace(".", "/") + ".py")).exists() else target)
    return {m for m in out if m}


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG).with_suffix("").parts): p for p in PKG.rglob("*.py")}


def test_every_import_points_down():
    upward = []
    for module, path in modules().items():
        if path.name == "__init__.py" and module != "__init__":  # a subpackage's own docstring/re-export
            continue
        for target in imports(path, module):
            same_package = target.split(".")[0] == module.split(".")[0]
            if layer(target) > layer(module) or (layer(target) == layer(module) and not same_package
                                                 and layer(module) < len(LAYERS) and layer(module) > 0):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_cycles():
    graph = {m: {t for t in imports(p, m) if t in modules()} - {m} for m, p in modules().items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            visit(t)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, cycles


def test_the_flat_names_of_earlier_versions_still_import():
    for old, new in _moved.MOVED.items():
        assert importlib.import_module(f"segexec_jax.{old}") is importlib.import_module(f"segexec_jax.{new}"), old
    assert importlib.import_module("segexec_jax.retrieval").__spec__.name == "segexec_jax.segment.retrieval"
    from segexec_jax.data import dataset  # the old data module's names, through the package
    from segexec_jax.model import init_params
    from segexec_jax.segment import scan_segments

    assert dataset.__module__ == "segexec_jax.data.pipeline" and init_params is segexec_jax.init_params
    assert scan_segments.__module__ == "segexec_jax.segment.operator"
    assert callable(segexec_jax.forward) and callable(segexec_jax.generate)  # still the functions
