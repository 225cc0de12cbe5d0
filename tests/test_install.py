"""Locked installs: requirements.lock pins what `make` installs, inside pyproject's ranges; drift is tested on purpose.

`make setup` installs requirements.lock (exact versions), `make lock` re-resolves the newest versions
pyproject.toml allows and rewrites it, and `make test-latest` runs `test_newest_allowed_versions`, which
does that resolution in a scratch venv and runs the suite's fast tests there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from hybrid_pretrain.tests.procs import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
LOCK = REPO / "requirements.lock"


def read_lock(path: Path) -> dict[str, Version]:
    """name -> pinned version; every entry must be an exact `name==version` pin."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and not req.url, f"{path.name}:{number}: {line!r}"
        pins[canonicalize_name(req.name)] = Version(specs[0].version)
    return pins


def project_requirements() -> list[Requirement]:
    """pyproject's runtime dependencies and the `dev` extra (what `make setup` installs), for this interpreter."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = {**default_environment(), "extra": "dev"}
    reqs = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def check_lock_covers_project(path: Path) -> dict[str, Version]:
    pins = read_lock(path)
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in {path.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{path.name}: {name}=={pins[name]}, not {req}"
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    for req in map(Requirement, build):
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), f"build requirement {req}"
    assert {"pip", "setuptools", "torch"} <= set(pins)
    assert canonicalize_name("hybrid-pretrain") not in pins  # the project itself is installed editable
    return pins


def test_lock_pins_every_requirement_inside_pyproject_ranges() -> None:
    check_lock_covers_project(LOCK)


def test_installed_environment_is_the_lock() -> None:
    """What this test run imports is exactly what the lock says (CI installs from the lock, not from ranges)."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("runs in the venv `make setup` builds from the lock")
    mismatched = {}
    for name, version in read_lock(LOCK).items():
        installed = Version(metadata.version(name))
        if Version(installed.public) != version:
            mismatched[name] = (str(version), str(installed))
    assert mismatched == {}, "installed != requirements.lock; `make setup` reinstalls from the lock"


@pytest.mark.skipif(os.environ.get("HYBRID_PRETRAIN_TEST_LATEST") != "1",
                    reason="drift is checked on purpose only: `make test-latest`")
def test_newest_allowed_versions(tmp_path: Path) -> None:
    """`make lock` into a scratch venv (the newest versions pyproject allows), then the fast suite runs there."""
    venv, lock = tmp_path / "venv", tmp_path / "requirements.lock"
    subprocess.run(["make", "lock", f"LOCK_VENV={venv}", f"LOCK_OUT={lock}"], cwd=REPO, check=True, timeout=3600)
    newest = check_lock_covers_project(lock)
    current = read_lock(LOCK)
    drift = {n: (str(current.get(n)), str(v)) for n, v in newest.items() if current.get(n) != v}
    print(f"\nnewest allowed vs requirements.lock ({len(drift)} differ):")
    for name, (old, new) in sorted(drift.items()):
        print(f"  {name}: {old} -> {new}")
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-c", "import transformers.modeling_utils, sentence_transformers"], cwd=REPO,
                   check=True, timeout=600)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(venv / "torch_extensions")}
    env.pop("HYBRID_PRETRAIN_TEST_LATEST")
    proc = subprocess.run([str(venv / "bin" / "pytest"), "-q", "-p", "no:cacheprovider", "-m", "not slow",
                           "--ignore", "tests/test_install.py"], cwd=REPO, env=env, timeout=3600)
    assert proc.returncode == 0, "the fast suite fails with the newest allowed versions (output above)"
