"""The package graph runs one way: base -> kernels -> models -> parallel -> training -> launcher (run by `make lint`).

data_pipeline and retrieval are libraries below training and launcher; function-level imports are kept
for optional dependencies only, each saying why in a comment.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hybrid_pretrain.tests.package_graph import LAYERS, back_edges, imports_of, levels
from hybrid_pretrain.tests.procs import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_no_import_goes_up_the_graph() -> None:
    assert back_edges(REPO) == []


def test_a_deliberate_back_edge_is_caught(tmp_path: Path) -> None:
    """A copy of the library with one model importing the launcher fails the check, naming file and line."""
    for folder in levels():
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    lm = tmp_path / "models" / "lm.py"
    lm.write_text(lm.read_text() + "\n\ndef _leak():\n    from hybrid_pretrain.launcher.pretrain import main\n"
                  "    return main\n")
    sideways = tmp_path / "data_pipeline" / "config.py"
    sideways.write_text(sideways.read_text() + "\nfrom hybrid_pretrain.models.config import ModelConfig  # noqa\n")
    found = sorted(back_edges(tmp_path))
    assert len(found) == 2, found
    assert found[0].startswith("data_pipeline/config.py:") and "a folder on its own level" in found[0]
    assert found[1].startswith("models/lm.py:") and "launcher.pretrain (a higher layer)" in found[1]


def test_every_library_folder_has_a_layer() -> None:
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {p.split(".")[1] for p in packages if "." in p}
    assert folders == set(levels()), LAYERS


def test_function_level_imports_are_optional_dependencies_only() -> None:
    """No import of our own hides inside a function (a cycle dodge); a third-party one says why it is deferred."""
    own = [f"{e.source.relative_to(REPO)}:{e.line} {e.module}" for e in imports_of(REPO) if e.in_function and e.target]
    assert own == []
    unexplained = [f"{e.source.relative_to(REPO)}:{e.line} {e.module}" for e in imports_of(REPO)
                   if e.in_function and not e.target and "optional" not in e.comment]
    assert unexplained == []
