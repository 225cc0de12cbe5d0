"""One import namespace: nothing of ours is importable under a generic name, and nothing of ours shadows a package.

The repository root is the package ``hybrid_pretrain`` (pyproject's ``package-dir``); its folders carry no
``__init__.py``. These tests run the checks where they matter: in fresh interpreters started at the
repository root (so the root is on sys.path, as in ``python -c`` or a shell there), next to transformers,
sentence-transformers and lm-eval, which once broke on our ``kernels`` folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from hybrid_pretrain.tests.procs import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# Every top-level folder of the repository that holds Python files: each is a generic name.
ROOT_FOLDERS = sorted(p.name for p in REPO.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and any(p.rglob("*.py"))
                      and p.name not in {"build", "runs"} and not p.name.endswith(".egg-info"))
NOT_SHIPPED = {"tests", "bench"}  # reachable as hybrid_pretrain.tests / .bench from a checkout only
SCRIPT_FOLDERS = [REPO / "launcher", REPO / "bench", REPO / "tests" / "parallel"]  # run as `python folder/x.py`


def _run_at_root(code: str, env_path: str | None = None) -> dict:
    env = None
    if env_path is not None:
        import os

        env = {**os.environ, "PYTHONPATH": env_path}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _project_modules() -> list[str]:
    """Dotted names of every library module of the package (the folders pyproject ships)."""
    names = []
    for package in _shipped_packages():
        folder = REPO.joinpath(*package.split(".")[1:])
        for path in sorted(folder.glob("*.py")):
            if path.stem not in {"__init__", "__main__"}:
                names.append(f"{package}.{path.stem}")
    return names


def _shipped_packages() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_root_folders_have_no_init_file() -> None:
    """An ``__init__.py`` in a root folder would make it a regular package that shadows any installed namesake."""
    assert "launcher" in ROOT_FOLDERS and "kernels" in ROOT_FOLDERS
    assert [f for f in ROOT_FOLDERS if (REPO / f / "__init__.py").exists()] == []
    assert not (REPO / "__init__.py").exists()


def test_pyproject_ships_every_library_folder() -> None:
    """The wheel's package list is exactly the folders that hold library code (a new folder must be listed)."""
    expected = {"hybrid_pretrain"}
    for folder in ROOT_FOLDERS:
        if folder in NOT_SHIPPED:
            continue
        for path in [REPO / folder, *(p for p in (REPO / folder).rglob("*") if p.is_dir())]:
            if any(path.glob("*.py")) and "__pycache__" not in path.parts:
                expected.add("hybrid_pretrain." + ".".join(path.relative_to(REPO).parts))
    assert set(_shipped_packages()) == expected


def test_ecosystem_imports_next_to_every_project_module_from_the_root() -> None:
    """transformers, sentence-transformers and lm-eval import beside all of ours; generic names stay theirs."""
    modules = _project_modules()
    result = _run_at_root(f"""
        import importlib, importlib.util, json, sys
        from pathlib import Path
        import transformers.modeling_utils, sentence_transformers, lm_eval, lm_eval.api.model
        for name in {modules!r}:
            importlib.import_module(name)
        import kernels
        repo, venv = Path.cwd().resolve(), Path(sys.prefix).resolve()

        def ours(path):  # in the checkout, not in the venv that may live inside it
            path = path and Path(path).resolve()
            return bool(path) and path.is_relative_to(repo) and not path.is_relative_to(venv)

        def kind(name):
            spec = importlib.util.find_spec(name)
            if spec is None:
                return "absent"
            locations = list(spec.submodule_search_locations or [])
            if spec.loader is None or spec.origin in (None, "namespace"):  # a namespace package: folders only
                return "empty namespace portion" if all(ours(loc) for loc in locations) else "installed"
            return "ours" if ours(spec.origin) else "installed"

        generic = {ROOT_FOLDERS!r}
        loaded = {{n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.split(".")[0] in generic}}
        print(json.dumps({{"root_on_path": sys.path[0] in ("", str(repo)), "kernels_ours": ours(kernels.__file__),
                          "has_cuda_properties": hasattr(kernels, "CUDAProperties"),
                          "ours_loaded": sorted(n for n, f in loaded.items() if ours(f)),
                          "kinds": {{n: kind(n) for n in generic}}}}))
    """)
    assert result["root_on_path"]
    assert not result["kernels_ours"] and result["has_cuda_properties"]
    # No module of ours was imported under a generic top-level name, by us or by the libraries.
    assert result["ours_loaded"] == []
    # With the root on sys.path a root folder is at most an empty namespace portion (no code runs, no
    # module binds), which Python uses only when no installed package of that name exists anywhere.
    assert result["kinds"]["kernels"] == "installed"
    allowed = ("absent", "installed", "empty namespace portion")
    assert {n: k for n, k in result["kinds"].items() if k not in allowed} == {}


def test_root_folders_never_shadow_installed_packages(tmp_path: Path) -> None:
    """A stand-in package named like each root folder, later on sys.path than the root, still wins."""
    for name in ROOT_FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("STAND_IN = True\n")
    result = _run_at_root(f"""
        import importlib, json, sys
        won = {{n: getattr(importlib.import_module(n), "STAND_IN", False) for n in {ROOT_FOLDERS!r}}}
        print(json.dumps({{"order": sys.path.index({str(tmp_path)!r}) > 0, "won": won}}))
    """, env_path=str(tmp_path))
    assert result["order"]
    assert result["won"] == {name: True for name in ROOT_FOLDERS}


def test_script_files_do_not_shadow_installed_modules() -> None:
    """`python launcher/x.py` puts launcher/ first on sys.path: no script may share a name with a module we install.

    (launcher/evaluate.py did: lm-eval's tasks `import evaluate`, Hugging Face's package of that name.)
    """
    installed = set(metadata.packages_distributions()) | set(sys.stdlib_module_names)
    clashes = [str(p.relative_to(REPO)) for folder in SCRIPT_FOLDERS for p in folder.glob("*.py")
               if p.stem in installed]
    assert clashes == []


def test_launcher_script_runs_from_anywhere(tmp_path: Path) -> None:
    """A launcher file runs as a script from outside the checkout with no sys.path help (the namespace is installed)."""
    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "pretrain.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config" in proc.stdout


def test_pytest_leaves_the_root_and_test_folders_off_sys_path() -> None:
    """Tests import the installed namespace only (`python -m pytest` itself puts the cwd first: that entry aside)."""
    entries = sys.path[1:] if "-m" in sys.orig_argv[:3] else sys.path
    resolved = {Path(p or ".").resolve() for p in entries}
    assert REPO not in resolved
    assert not any(p.is_relative_to(REPO / "tests") for p in resolved)
