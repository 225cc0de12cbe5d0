"""The package graph's contract: which folder may import which, checked from the source (no imports run).

Why not import-linter: its graph builder (grimp) names namespace packages by their path relative to
sys.path, and our root folders are namespace portions mapped by setuptools' editable finder, so it
reports ``hybrid_pretrain.launcher`` as missing. This reads every ``import`` statement with ``ast``
instead: module-level and function-level alike, so an import tucked inside a function to dodge a
cycle is still an edge.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

NAMESPACE = "hybrid_pretrain"
# Top to bottom; a folder may import folders on lower levels only, and folders on one level (split by
# "|") never import each other. Tests and benchmarks sit above everything and are not checked.
LAYERS = [
    "launcher",
    "synthetic | classify | evaluation",
    "training",
    "parallel | retrieval",
    "models | data_pipeline",
    "kernels",
    "base",
]


def levels() -> dict[str, int]:
    """folder -> level (0 is the top)."""
    return {name.strip(): i for i, row in enumerate(LAYERS) for name in row.split("|")}


@dataclass(frozen=True)
class Edge:
    source: Path  # the importing file
    line: int
    folder: str  # the importing file's top-level folder
    target: str  # the imported folder
    module: str  # the imported module, dotted
    in_function: bool
    comment: str  # the line's trailing comment, or the comment line above the statement


def imports_of(root: Path) -> list[Edge]:
    """Every import of a ``hybrid_pretrain.<folder>`` module in the library folders under ``root``."""
    edges = []
    for folder in levels():
        for path in sorted((root / folder).rglob("*.py")):
            edges.extend(_edges(path, folder))
    return edges


def _edges(path: Path, folder: str) -> list[Edge]:
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines), filename=str(path))
    inside = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(fn) if n is not fn}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        text = lines[node.lineno - 1]
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        trailing = text.split("#", 1)[1].strip() if "#" in text else ""
        comment = " ".join(c for c in (above[1:].strip() if above.startswith("#") else "", trailing) if c)
        for module in modules:
            parts = module.split(".")
            target = parts[1] if parts[0] == NAMESPACE and len(parts) > 1 else ""
            out.append(Edge(path, node.lineno, folder, target, module, id(node) in inside, comment))
    return out


def back_edges(root: Path) -> list[str]:
    """One line per import that goes up the graph or sideways between folders of one level."""
    level = levels()
    bad = []
    for e in imports_of(root):
        if not e.target or e.target == e.folder:
            continue
        where = f"{e.source.relative_to(root)}:{e.line}"
        if e.target not in level:
            bad.append(f"{where}: {e.folder} imports {e.module}, which has no place in the layers")
        elif level[e.target] <= level[e.folder]:
            kind = "a folder on its own level" if level[e.target] == level[e.folder] else "a higher layer"
            bad.append(f"{where}: {e.folder} imports {e.module} ({kind}); allowed: {_below(e.folder)}")
    return bad


def _below(folder: str) -> str:
    level = levels()
    lower = [f for f, i in level.items() if i > level[folder]]
    return ", ".join(lower) or "nothing"
