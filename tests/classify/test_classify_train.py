"""SequenceClassifier and the classification CLI: padding never leaks into a causal stack's prediction, configs
are checked with named errors, a small model learns digits, and the CLI prints its accuracy last."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.classify.config import load_config
from hybrid_pretrain.classify.train import train_classifier
from hybrid_pretrain.models.classifier import SequenceClassifier
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.tests.procs import REPO


@pytest.mark.parametrize("pooling", ["mean", "last"])
@torch.no_grad()
def test_right_padding_does_not_change_a_causal_stack(pooling: str) -> None:
    cfg = ModelConfig(vocab_size=16, d_model=32, n_heads=4, layers="S5A", h3_d_state=8)
    model = SequenceClassifier(cfg, num_classes=10, pooling=pooling).eval()
    ids = torch.randint(1, 16, (2, 9))
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = padded != 0
    torch.testing.assert_close(model(padded, mask), model(ids))
    assert model(ids, labels=torch.tensor([1, 2])).dim() == 0


@torch.no_grad()
def test_values_input_and_bidirectional_options() -> None:
    shape = dict(vocab_size=0, d_model=32, n_heads=4, layers="5M", h3_d_state=8)
    options = {"s5": {"bidirectional": True}, "mega": {"bidirectional": True, "chunk_size": 4}}
    bidirectional = SequenceClassifier(ModelConfig(**shape, options=options), num_classes=3).eval()
    causal = SequenceClassifier(ModelConfig(**shape), num_classes=3, pooling="last").eval()
    x = torch.rand(2, 12)
    changed = x.clone()
    changed[:, -1] += 1.0
    assert bidirectional(x).shape == (2, 3)
    # Only bidirectional layers carry the last value back to position 0.
    for model, sees_future in ((bidirectional, True), (causal, False)):
        first = [model.blocks[0](model.embedding(v[..., None]))[:, 0] for v in (x, changed)]
        assert ((first[1] - first[0]).abs().max() > 1e-5) == sees_future


def test_config_files_load_and_errors_name_the_field(tmp_path: Path) -> None:
    vit, lo = load_config(REPO / "configs" / "debug_vit.yaml"), load_config(REPO / "configs" / "debug_listops.yaml")
    assert vit.model == "vit" and lo.options == {"s5": {"bidirectional": True}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: digits\nepoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch' in .*bad.yaml; did you mean 'epochs'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="lr must be float, got str 'fast'"):
        load_config(None, lr="fast")
    assert load_config(None, task="digits", lr="1e-3").lr == 1e-3  # YAML 1.1 leaves 1e-3 a string; floats take it
    with pytest.raises(ConfigError, match="model 'vit' needs task 'digits'"):
        load_config(None, model="vit", task="listops", input="images")
    with pytest.raises(ConfigError, match="model.options.s5.bidirectionl"):
        load_config(None, layers="55", options={"s5": {"bidirectionl": True}})
    merged = load_config(REPO / "configs" / "debug_listops.yaml", options={"s5": {"blocks": 2}})
    assert merged.options == {"s5": {"bidirectional": True, "blocks": 2}}


def test_small_sequence_model_learns_digits() -> None:
    run = load_config(None, task="digits", input="tokens", layers="rr", d_model=32, epochs=3, lr=5e-3,
                      batch_size=32)
    _, acc, losses = train_classifier(run, progress=False, log=lambda _: None)
    assert losses[-1] < 0.8 * losses[0] and acc > 0.3, (acc, losses)  # chance is 0.1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launcher" / "classify.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # four interpreter start-ups
def test_cli_prints_final_accuracy_last_and_names_bad_flags(tmp_path: Path) -> None:
    proc = _cli("--task", "listops", "--layers", "r", "--width", "16", "--d-state", "4", "--train-size", "32",
                "--test-size", "16", "--max-len", "40", "--epochs", "1", "--threads", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("final test accuracy: ") and 0.0 <= float(last.split(": ")[1]) <= 1.0
    proc = _cli("--task", "digits", "--option", "s5.blocks")
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "NAME.KEY=VALUE" in proc.stderr
    proc = _cli("--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr
    assert _cli("--help").returncode == 0
