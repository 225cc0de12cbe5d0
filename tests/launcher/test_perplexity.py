"""launcher/perplexity.py: perplexity and bits per byte on generated text, checked against an independent sum."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer, train_tokenizer
from hybrid_pretrain.launcher import perplexity
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.tests.procs import REPO
from hybrid_pretrain.training.config import load_config
from hybrid_pretrain.training.weights import RunWeights, save_consolidated

WORDS = "the of and to in a is that for it as was with be by on not he this are or his café über".split()


def _evaluate_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launcher" / "perplexity.py"), *args, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _evaluate(capsys, args: list[str]) -> tuple[int, str, str]:
    """main() in process (the CLI's own code path, without a fresh interpreter per call)."""
    code = perplexity.main([*args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Generated .txt documents and a consolidated checkpoint of a random tiny model with a real tokenizer."""
    root = tmp_path_factory.mktemp("eval")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "\n" for _ in range(5)]
    for i, doc in enumerate(docs):
        (root / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    tok = Tokenizer(train_tokenizer(docs * 20, root / "tok", vocab_size=300, sample_bytes=100_000, log=lambda s: None))
    cfg = load_config(None, [f"run_dir={root}", "model.layers=HA", "model.d_model=32", "model.n_heads=2",
                             "model.h3_d_state=8", "data.vocab_size=300", "data.seq_len=16"])
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = LanguageModel(cfg.model).eval()
    save_consolidated(RunWeights(cfg, model.state_dict(), tok, "random"), root / "ckpt")
    return root, docs, tok, model


def _independent_nll(model, ids: list[int], seq_len: int) -> list[float]:
    """-log p of every token after the first, window by window, one position at a time."""
    out = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start: start + seq_len + 1]
            logp = F.log_softmax(model(torch.tensor([window[:-1]]))[0].double(), dim=-1)
            out += [-logp[t, window[t + 1]].item() for t in range(len(window) - 1)]
    return out


@pytest.mark.parametrize("seq_len", [7, 4096])
def test_perplexity_and_bits_per_byte_match_an_independent_sum(setup, capsys, seq_len: int) -> None:
    root, docs, tok, model = setup
    code, out, err = _evaluate(capsys, [str(root / "ckpt"), "--data", str(root / "doc*.txt"), "--seq-len",
                                        str(seq_len), "--batch-size", "3"])
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    ids = [tok.eos_id]
    for doc in docs:
        ids += tok.encode(doc) + [tok.eos_id]
    nll = _independent_nll(model, ids, seq_len)
    assert result["tokens"] == len(nll) == len(ids) - 1 and result["documents"] == len(docs)
    assert result["bytes"] == sum(len(d.encode("utf-8")) for d in docs) > sum(len(d) for d in docs)
    assert result["split"] == "train"  # .txt files only have a train split
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(sum(nll) / math.log(2) / result["bytes"], rel=1e-5)


def test_max_tokens_cuts_the_stream_and_counts_only_covered_bytes(setup, capsys) -> None:
    root, docs, tok, _ = setup
    code, out, err = _evaluate(capsys, [str(root / "ckpt"), "--data", str(root / "doc*.txt"), "--max-tokens", "30"])
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    first = tok.encode(docs[0])
    assert len(first) + 1 > 30  # the cut lands inside the first document
    assert result["tokens"] == 30 and result["documents"] == 1
    assert result["bytes"] == len(tok.decode(first[:30]).encode("utf-8"))


def test_help_and_one_line_errors(setup, tmp_path, capsys) -> None:
    root, *_ = setup
    proc = _evaluate_cli(["--help"])
    assert proc.returncode == 0 and "--max-tokens" in proc.stdout and "--seq-len" in proc.stdout
    code, _, err = _evaluate(capsys, [str(root / "ckpt"), "--data", str(tmp_path / "missing*.txt")])
    assert code == 2 and err.strip().startswith("error:") and "missing" in err
    code, _, err = _evaluate(capsys, [str(tmp_path), "--data", str(root / "doc*.txt")])
    assert code == 2 and "config.yaml" in err and len(err.strip().splitlines()) == 1
    code, _, err = _evaluate(capsys, [str(root / "ckpt"), "--data", str(root / "doc*.txt"), "--batch-size", "0"])
    assert code == 2 and "--batch-size" in err
    code, _, err = _evaluate(capsys, [str(root / "ckpt"), "--data", str(root / "doc*.txt"), "--passages", "empty"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--passages needs an Atlas checkpoint" in err and "model.arch 'lm'" in err
