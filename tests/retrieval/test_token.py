"""The service token comes from a file or the environment and is never written to disk (issue 19 item 2)."""

from __future__ import annotations

import pytest

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.retrieval.auth import TOKEN_ENV, read_token
from hybrid_pretrain.retrieval.errors import AccessTokenError
from hybrid_pretrain.retrieval.service import main as service_main
from hybrid_pretrain.tests.fake_runs import fake_zero0_run
from hybrid_pretrain.training.config import load_config, save_resolved
from hybrid_pretrain.training.weights import load_run, save_consolidated

SECRET = "tok-9f8e7d6c5b4a"


def test_token_from_file_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    assert read_token(None) == SECRET
    (tmp_path / "token").write_text(f"  {SECRET}-file\n")
    assert read_token(tmp_path / "token") == f"{SECRET}-file"  # the file wins over the environment
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AccessTokenError, match="empty"):
        read_token(tmp_path / "empty")
    with pytest.raises(AccessTokenError, match="nowhere"):
        read_token(tmp_path / "nowhere")
    assert service_main(["--index-dir", str(tmp_path), "--token-file", str(tmp_path / "empty")]) == 2


def test_token_never_lands_in_config_yaml_or_converted_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    (tmp_path / "token").write_text(SECRET)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"retrieval.token_file={tmp_path / 'token'}",
                             "retrieval.service=http://127.0.0.1:1"])
    save_resolved(cfg, tmp_path / "run")
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "token_file" in text and SECRET not in text
    fake_zero0_run(tmp_path / "run2", "HA")
    save_consolidated(load_run(tmp_path / "run2"), tmp_path / "ckpt")
    assert not any(SECRET in p.read_text(errors="replace") for p in (tmp_path / "ckpt").iterdir() if p.is_file())


def test_a_token_in_a_config_is_refused_and_an_old_empty_one_dropped(tmp_path):
    with pytest.raises(ConfigError, match="token_file"):
        load_config(None, [f"retrieval.token={SECRET}"])
    old = tmp_path / "config.yaml"  # what every run directory written before this change holds
    old.write_text("retrieval:\n  token: ''\n  index_kind: flat\n")
    assert load_config(str(old)).retrieval.index_kind == "flat"
