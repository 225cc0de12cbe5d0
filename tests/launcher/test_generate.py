"""launcher/generate.py and training/weights.py on real checkpoints: ZeRO-0/2/3, one and two ranks."""

from __future__ import annotations

import subprocess

import pytest
import torch

from hybrid_pretrain.models.generation import GREEDY, generate
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.tests.fake_runs import fake_zero0_run
from hybrid_pretrain.tests.procs import REPO, TINY_RUN, launch, run_python, run_script
from hybrid_pretrain.training.checkpoint import CheckpointError
from hybrid_pretrain.training.weights import build_model, load_run

DEBUG = str(REPO / "configs" / "debug_hybrid.yaml")


def test_load_run_restores_the_model_exactly(tmp_path) -> None:
    model = fake_zero0_run(tmp_path, "HSA")
    weights = load_run(tmp_path)
    assert weights.tag == "step00000001" and weights.tokenizer is None and weights.config.model.vocab_size == 64
    loaded = build_model(weights)
    assert not loaded.training
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)
    assert torch.equal(generate(loaded, ids, 5), generate(model, ids, 5))


def test_corrupt_checkpoint_is_refused_naming_the_file(tmp_path) -> None:
    fake_zero0_run(tmp_path)
    shard = tmp_path / "checkpoints" / "step00000001" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
        load_run(tmp_path)


def test_cli_help_and_one_line_errors(tmp_path) -> None:
    proc = run_script("generate", ["--help"])
    assert proc.returncode == 0 and "--top-p" in proc.stdout and "--prompt" in proc.stdout
    proc = run_script("generate", [str(tmp_path / "nowhere"), "--prompt", "x"])
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "config.yaml" in proc.stderr
    fake_zero0_run(tmp_path)
    proc = run_script("generate", [str(tmp_path)])
    assert proc.returncode == 2 and "no prompt given" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_script("generate", [str(tmp_path), "--prompt", "x", "--top-p", "0"])
    assert proc.returncode == 2 and "top_p" in proc.stderr


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_zero0_and_zero3_checkpoints_consolidate_to_the_same_weights_and_generate(tmp_path) -> None:
    weights = {}
    for stage in (0, 3):
        run_dir = tmp_path / f"z{stage}"
        _ok(run_python(["--config", DEBUG, f"run_dir={run_dir}", *TINY_RUN, f"train.zero_stage={stage}"]))
        weights[stage] = load_run(run_dir)
    assert weights[0].state_dict.keys() == weights[3].state_dict.keys()
    for name, tensor in weights[0].state_dict.items():
        # Summation order differs between stages; Adam moves each weight by ~lr = 3e-3 per step.
        torch.testing.assert_close(weights[3].state_dict[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    torch.manual_seed(weights[0].config.seed)  # the weights pretrain started from
    initial = LanguageModel(weights[0].config.model).state_dict()
    name = "blocks.0.mixer.q_proj.weight"
    assert not torch.allclose(initial[name], weights[0].state_dict[name], atol=1e-4)  # it did train

    prompts = ["def main(", "import os\nimport"]
    proc = run_script("generate", [str(tmp_path / "z3"), *sum((["--prompt", p] for p in prompts), []), "--greedy",
                          "--max-new-tokens", "8"])
    _ok(proc)
    tok, model = weights[3].tokenizer, build_model(weights[3])
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)])
        expected = tok.decode(generate(model, ids, 8, GREEDY)[0].tolist())
        assert expected in proc.stdout, (expected, proc.stdout)
    assert "16 new tokens" in proc.stderr


@pytest.mark.slow
def test_two_rank_zero2_shards_consolidate_to_the_module_weights(tmp_path) -> None:
    run_dir = tmp_path / "z2"
    _ok(launch(["--config", DEBUG, f"run_dir={run_dir}", *TINY_RUN, "train.zero_stage=2"]))
    shards = sorted((run_dir / "checkpoints" / "step00000002").glob("*optim_states.pt"))
    assert len(shards) == 2  # the fp32 weights live split over two ranks' optimizer partitions
    weights = load_run(run_dir)
    module = torch.load(run_dir / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    assert weights.state_dict.keys() == module.keys()
    for name, tensor in module.items():
        assert torch.equal(weights.state_dict[name], tensor), name
    assert build_model(weights).cfg.vocab_size == weights.tokenizer.vocab_size
