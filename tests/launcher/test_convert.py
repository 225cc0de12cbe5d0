"""launcher/convert_checkpoint.py: run -> safetensors folder -> the project model and HF transformers, same logits."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import pickle
import subprocess

import pytest
import torch
from safetensors import safe_open

from hybrid_pretrain.tests.fake_runs import fake_zero0_run
from hybrid_pretrain.tests.procs import REPO, TINY_RUN, run_python, run_script
from hybrid_pretrain.training.checkpoint import CheckpointError
from hybrid_pretrain.training.weights import RunWeights, build_model, load_consolidated, load_run, save_consolidated

DEBUG = str(REPO / "configs" / "debug_hybrid.yaml")


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("tie", [True, False])
def test_consolidated_round_trip_is_exact_and_stores_tied_weights_once(tmp_path, tie: bool) -> None:
    model = fake_zero0_run(tmp_path / "run", "HSA", tie)
    save_consolidated(load_run(tmp_path / "run"), tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict()) and ("lm_head.weight" in keys) != tie
    loaded = build_model(load_consolidated(tmp_path / "ckpt"))
    assert loaded.cfg == model.cfg and loaded.embedding.weight.data_ptr() != 0
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_consolidated_loading_never_unpickles(tmp_path, monkeypatch) -> None:
    fake_zero0_run(tmp_path / "run", "HSA")
    save_consolidated(load_run(tmp_path / "run"), tmp_path / "ckpt")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling in the consolidated loading path")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert build_model(load_consolidated(tmp_path / "ckpt")).cfg.vocab_size == 64


def test_truncated_or_missing_files_are_named(tmp_path) -> None:
    fake_zero0_run(tmp_path / "run", "HSA")
    save_consolidated(load_run(tmp_path / "run"), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_consolidated(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_consolidated(tmp_path / "ckpt")


def test_cli_help_and_one_line_error(tmp_path) -> None:
    proc = run_script("convert_checkpoint", ["--help"])
    assert proc.returncode == 0 and "--format" in proc.stdout and "--out" in proc.stdout
    proc = run_script("convert_checkpoint", [str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "config.yaml" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_hf_export_of_an_untied_model_loads_in_transformers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = fake_zero0_run(tmp_path / "run", "HSA", tie=False)
    _ok(run_script("convert_checkpoint", [str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--format", "hf"]))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=0)


@pytest.mark.slow
def test_real_run_converts_to_the_same_logits_in_the_project_model_and_transformers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    run_dir, out = tmp_path / "run", tmp_path / "hf"
    _ok(run_python(["--config", DEBUG, f"run_dir={run_dir}", *TINY_RUN, "train.zero_stage=1"]))
    _ok(run_script("convert_checkpoint", [str(run_dir), "--out", str(out), "--format", "hf"]))
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "config.yaml", "tokenizer.model",
                                               "modeling_hybrid_lm.py", "configuration_hybrid_lm.py"}
    assert json.loads((out / "config.json").read_text())["layers"] == "HHAH"

    reference: RunWeights = load_run(run_dir)
    model = build_model(reference)
    converted = load_consolidated(out)
    assert converted.tokenizer.sha256 == reference.tokenizer.sha256 and converted.tag == reference.tag
    ids = torch.tensor([reference.tokenizer.encode("def main(argv):\n    return 0\n")] * 2)
    ids[1, 3:] = torch.randint(0, reference.config.model.vocab_size, (ids.shape[1] - 3,))
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(build_model(converted)(ids), expected, rtol=1e-6, atol=1e-6)
        hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
        assert not hf.training
        out_hf = hf(ids, labels=ids)
        torch.testing.assert_close(out_hf.logits, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out_hf.loss, model(ids[:, :-1], labels=ids[:, 1:]), rtol=1e-6, atol=1e-6)

    # transformers' greedy generate on left-padded prompts of different lengths == launcher/generate.py's text.
    prompts = ["def main(", "import os\nimport sys\nfrom"]
    proc = run_script("generate", [str(run_dir), *sum((["--prompt", p] for p in prompts), []), "--greedy",
                                   "--max-new-tokens", "8"])
    _ok(proc)
    tok = reference.tokenizer
    encoded = [tok.encode(p) for p in prompts]
    L = max(map(len, encoded))
    padded = torch.tensor([[tok.pad_id] * (L - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in encoded])
    new = hf.generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_id)[:, L:]
    for b, (prompt, e) in enumerate(zip(prompts, encoded)):
        assert f"=== [{b}] {prompt}\n{tok.decode(e + new[b].tolist())}\n" in proc.stdout, proc.stdout

    # The README's example runs as written (given the folder's path) and prints one continuation per prompt.
    card = (out / "README.md").read_text()
    example = card.split("```python\n")[1].split("```")[0].replace('"path/to/hf"', repr(str(out)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(example, {})
    assert len(ast.literal_eval(printed.getvalue())) == 2


def test_bf16_conversion_keeps_the_ssm_dynamics_fp32(tmp_path) -> None:
    """--dtype bf16 halves every weight but dt and A (models/precision.py), which round-trip exactly."""
    from hybrid_pretrain.launcher.convert_checkpoint import convert

    model = fake_zero0_run(tmp_path / "run", "HSA")
    convert(tmp_path / "run", tmp_path / "ckpt", dtype="bf16")
    loaded = load_consolidated(tmp_path / "ckpt").state_dict
    fp32 = {k for k, t in loaded.items() if t.dtype == torch.float32}
    assert {k.rsplit(".", 1)[1] for k in fp32} == {"log_dt", "log_A_real", "A_imag"}
    want = model.state_dict()
    assert all(torch.equal(loaded[k], want[k] if k in fp32 else want[k].bfloat16()) for k in loaded)
    half = build_model(load_consolidated(tmp_path / "ckpt"), dtype=torch.bfloat16)
    assert {n for n, p in half.named_parameters() if p.dtype == torch.float32} == fp32
