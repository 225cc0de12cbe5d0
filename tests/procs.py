"""Process helpers for end-to-end tests: the repo root, the development corpus, and rank launchers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hybrid_pretrain.base.net import free_port as _free_port  # the name tests import

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))
DEBUG_CONFIG = str(REPO / "configs" / "debug_hybrid.yaml")
# A smaller corpus and vocabulary than the quick start, so each end-to-end run costs seconds, not minutes.
SMALL_DATA = ["data.max_corpus_bytes=1500000", "data.vocab_size=1024", "data.tokenizer_sample_bytes=1500000"]
# A two-step run, enough to produce a real checkpoint.
TINY_RUN = [*SMALL_DATA, "train.steps=2", "train.eval_every=0", "train.warmup_steps=1"]


def launch(args: list[str], ranks: int = 2, timeout: int = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run launcher/pretrain.py under the DeepSpeed launcher with ``ranks`` CPU processes."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(_free_port()),
           str(REPO / "launcher" / "pretrain.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_python(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run launcher/pretrain.py as a single plain process (world size 1)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return subprocess.run([sys.executable, str(REPO / "launcher" / "pretrain.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)




def run_script(name: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``launcher/<name>.py`` as a plain process."""
    return subprocess.run([sys.executable, str(REPO / "launcher" / f"{name}.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
