"""--dry-run --device-profile: the step-time and memory-fit lines, their arithmetic, and bad names refused."""

from __future__ import annotations

import pytest

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.launcher import pretrain
from hybrid_pretrain.tests.procs import DEBUG_CONFIG, REPO
from hybrid_pretrain.training.device_profiles import DeviceProfile, device_profile, step_seconds

H3_1_3B = str(REPO / "configs" / "h3_hybrid_1.3b.yaml")


def test_dry_run_prints_step_time_and_memory_fit(capsys: pytest.CaptureFixture) -> None:
    assert pretrain.main(["--config", H3_1_3B, "--dry-run", "--world-size", "8", "--device-profile", "h100"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-1, bf16" in out  # train.precision=auto means bf16 on an H100, whatever this machine is
    for line in ("weights", "master_weights", "gradients", "optimizer_states", "activations", "total"):
        assert f"  {line} " in out
    assert "device profile h100: NVIDIA H100 SXM 80 GB; peak 989.4 TFLOP/s bf16, assumed utilisation 40%" in out
    assert "estimated step time" in out and "tokens/s over 8 replicas" in out
    assert "per rank fits in 74.5 GiB" in out


def test_cpu_profile_is_this_machine_in_fp32(capsys: pytest.CaptureFixture) -> None:
    assert pretrain.main(["--config", DEBUG_CONFIG, "--dry-run", "--device-profile", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "device profile cpu: this machine's CPU" in out and "FLOP/s fp32" in out and "fits in" in out


def test_a_plan_that_does_not_fit_says_so(capsys: pytest.CaptureFixture) -> None:
    argv = ["--config", H3_1_3B, "--dry-run", "--world-size", "1", "--device-profile", "a100", "train.zero_stage=0",
            "train.micro_batch_size=32"]
    assert pretrain.main(argv) == 0
    assert "does NOT fit in 74.5 GiB" in capsys.readouterr().out


def test_step_time_arithmetic() -> None:
    device = DeviceProfile("test", "a test device", bf16_flops=1e15, fp32_flops=1e14, memory_bytes=1e9,
                           utilisation=0.5, default_precision="bf16")
    # 6 GFLOP per token x 8 x 2048 tokens at 1e15 x 50% FLOP/s
    assert step_seconds(6e9, 8 * 2048, device, "bf16") == pytest.approx(6e9 * 16384 / 5e14)
    assert step_seconds(6e9, 8 * 2048, device, "fp32") == pytest.approx(6e9 * 16384 / 5e13)
    # TP 2 x PP 2 share the replica's work; 1F1B with 4 micro-batches idles (PP - 1) / 4 of it
    assert step_seconds(6e9, 8 * 2048, device, "bf16", model_parallel=4, pipeline=2, micro_batches=4) == \
        pytest.approx(6e9 * 16384 / 5e14 / 4 * 1.25)


def test_bad_profile_name_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--config", DEBUG_CONFIG, "--dry-run", "--device-profile", "tpu"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tpu' (choose from 'a100', 'cpu', 'h100')" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--device-profile must be one of h100, a100, cpu, got 'tpu'"):
        device_profile("tpu")


@pytest.mark.parametrize("world_size", [64, 512])
def test_glam_plans_fit_h100_with_expert_parallelism(world_size: int, capsys: pytest.CaptureFixture) -> None:
    """The recorded plans (bench/RESULTS.md): GLaM 1.7B/64E at EP 16 on 64 and 512 H100s."""
    argv = ["--config", str(REPO / "configs" / "glam_1.7b_64e.yaml"), "--dry-run", "--world-size", str(world_size),
            "--device-profile", "h100"]
    assert pretrain.main(argv) == 0
    out = capsys.readouterr().out
    assert f"DP={world_size}, TP=1, PP=1, EP=16, ZeRO-1, bf16" in out and "per rank fits in 74.5 GiB" in out
    assert f"tokens/s over {world_size} replicas" in out
