"""The data CLIs: tokenizer training, preprocessing (process pool and mpirun), and training on the shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer
from hybrid_pretrain.launcher import preprocess_data, train_tokenizer
from hybrid_pretrain.tests.data_pipeline.corpora import make_pg19, prose, write_jsonl_zst
from hybrid_pretrain.tests.procs import REPO, launch

SETS = ("Github", "PythonDocs", "DM Mathematics")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    for shard in range(2):
        write_jsonl_zst(root / "pile/train" / f"{shard:02d}.jsonl.zst",
                        [{"text": prose(40 * shard + i, 400), "meta": {"pile_set_name": SETS[i % 3]}}
                         for i in range(40)])
    write_jsonl_zst(root / "pile/val.jsonl.zst", [{"text": prose(900 + i, 400), "meta": {"pile_set_name": "Github"}}
                                                   for i in range(8)])
    make_pg19(root / "pg19", {"train": [prose(500 + i, 6000) for i in range(3)], "validation": [prose(600, 3000)]})
    return {"pile": root / "pile", "pg19": root / "pg19"}


@pytest.fixture(scope="module")
def tokenizer(corpora: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok"
    code = train_tokenizer.main(["--input", str(corpora["pile"]), "--input", str(corpora["pg19"]), "--out", str(out),
                                 "--vocab-size", "400", "--sample-bytes", "400000"])
    assert code == 0
    return Path(f"{out}.model")


def test_train_tokenizer_cli_writes_model_and_hash(tokenizer: Path) -> None:
    info = json.loads(tokenizer.with_suffix(".json").read_text())
    tok = Tokenizer(tokenizer)
    assert info["sha256"] == tok.sha256 and info["vocab_size"] == 400 == tok.vocab_size
    assert info["special_ids"]["eos"] == tok.eos_id == 3 and info["special_ids"]["<retrieved>"] > 3
    assert tok.decode(tok.encode("naïve café ✓")) == "naïve café ✓"  # byte fallback: no <unk>


def test_train_tokenizer_cli_is_deterministic_and_supports_unigram(corpora: dict[str, Path], tmp_path: Path,
                                                                   tokenizer: Path) -> None:
    args = ["--input", str(corpora["pile"]), "--input", str(corpora["pg19"]), "--vocab-size", "400",
            "--sample-bytes", "400000"]
    assert train_tokenizer.main([*args, "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again.model").read_bytes() == tokenizer.read_bytes()
    assert train_tokenizer.main([*args, "--out", str(tmp_path / "uni"), "--model-type", "unigram"]) == 0
    uni = Tokenizer(tmp_path / "uni.model")  # unigram clamps to what this tiny word list supports
    assert uni.sp.encode("the whale sea", out_type=str) and 300 < uni.vocab_size <= 400
    assert json.loads((tmp_path / "uni.json").read_text())["model_type"] == "unigram"


def test_cli_errors_are_one_line(tmp_path: Path, tokenizer: Path, capsys: pytest.CaptureFixture) -> None:
    assert train_tokenizer.main(["--input", str(tmp_path / "none/*.txt"), "--out", str(tmp_path / "t")]) == 2
    assert preprocess_data.main(["--input", "bad", "--tokenizer", str(tokenizer), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "matched no files" in err[0] and "must look like NAME=SPEC" in err[1]


@pytest.mark.slow
def test_mpirun_preprocess_then_two_rank_training_on_the_blend(corpora: dict[str, Path], tokenizer: Path,
                                                               tmp_path: Path) -> None:
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists() and not shutil.which("mpirun"):
        pytest.skip("no mpirun (install the dev extra: mpich)")
    out = tmp_path / "shards"
    cmd = [str(mpirun if mpirun.exists() else "mpirun"), "-np", "2", sys.executable,
           str(REPO / "launcher/preprocess_data.py"), "--input", f"pile={corpora['pile']}",
           "--input", f"pg19={corpora['pg19']}", "--tokenizer", str(tokenizer), "--out", str(out),
           "--max-doc-chars", "20000"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "MPI ranks: 2" in proc.stdout and "reconciled" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["units_built"] == 4 and report["reconciled"] and report["documents_written"] == 80 + 8 + 4

    run_dir = tmp_path / "run"
    common = ["--config", str(REPO / "configs/debug_pile_pg19.yaml"), f"run_dir={run_dir}", f"data.indexed={out}",
              "train.steps=4", "train.eval_every=2", "train.eval_batches=2", "train.warmup_steps=1",
              "train.save_every=2", "data.blend=['0.7 pile/Github+PythonDocs', '0.3 pg19']"]
    first = launch(common)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "blend pg19/pg19 0.30, pile/Github 0." in first.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "val_loss" in records[1]

    victim = sorted(out.glob("pile/train/Github/*.bin"))[0]
    victim.write_bytes(victim.read_bytes()[:-2])
    broken = launch([*common, "--overwrite"])
    assert broken.returncode == 2
    assert f"shard '{victim}' is" in broken.stderr and "metrics" not in broken.stdout
