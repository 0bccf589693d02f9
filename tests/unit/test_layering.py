"""Imports only go downward: pipeline (framework) ← stages ← training ← ensemble.

Read from the source (every import, also those inside functions), so a new upward import fails
here rather than in a newcomer's head. The CLI's dispatch (pipeline/cli.py) is the one framework
module allowed to reach up, and only from inside functions (lazily). No module imports another
module's private (``_name``) objects.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("pipeline", "stages", "training", "ensemble")
LAZY_DISPATCH = {"pipeline/cli.py"}


def _modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str, list[str], bool]]:
    """(line, module, imported names, at module level) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [a.name for a in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, [], id(node) in top) for a in node.names)
    return found


def _layer(module: str) -> int | None:
    head = module.split(".")[0]
    return LAYERS.index(head) if head in LAYERS else None


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_imports(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    own = LAYERS.index(rel.split("/")[0])
    bad = []
    for line, module, _, top_level in _imports(path):
        layer = _layer(module)
        if layer is None or layer <= own:
            continue
        if rel in LAZY_DISPATCH and not top_level:
            continue
        bad.append(f"{rel}:{line} imports {module} ({LAYERS[layer]} is above {LAYERS[own]})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_cross_module_imports(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    bad = [
        f"{rel}:{line} imports {name} from {module}"
        for line, module, names, _ in _imports(path)
        if _layer(module) is not None
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not bad, "\n".join(bad)
