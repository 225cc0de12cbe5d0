"""train.offload: checked against the ZeRO stage and the pipeline, derived into DeepSpeed's JSON, planned per rank."""

from __future__ import annotations

import pytest

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.parallel.engine import deepspeed_config
from hybrid_pretrain.training.config import load_config
from hybrid_pretrain.training.flops import full_parameter_count
from hybrid_pretrain.training.memory import estimate_memory

DEBUG = "configs/debug_hybrid.yaml"
GB = 1e9


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.offload.optimizer=disk"], "train.offload.optimizer must be one of none, cpu, nvme, got 'disk'"),
    (["train.offload.params=nvme", "train.zero_stage=3"], "'nvme' needs train.offload.nvme_path"),
    (["train.offload.params=cpu", "train.zero_stage=2"], "train.offload.params=cpu needs train.zero_stage=3"),
    (["train.offload.optimizer=nvme", "train.offload.nvme_path=/tmp", "train.zero_stage=2"],
     "train.offload.optimizer=nvme needs train.zero_stage=3"),
    (["train.offload.optimizer=cpu", "train.zero_stage=1"],
     "train.offload.optimizer=cpu needs train.zero_stage 2 or 3"),
    (["train.offload.optimizer=cpu", "train.zero_stage=2", "parallel.pipeline=2"],
     "train.offload (optimizer=cpu, params=none) with parallel.pipeline=2"),
])
def test_bad_offload_is_one_line_naming_the_field(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config(DEBUG, overrides)
    assert "\n" not in str(e.value)


def test_offload_derives_deepspeeds_zero3_sections_and_cpu_adam() -> None:
    plain = deepspeed_config(load_config(DEBUG, ["train.zero_stage=3"]).train, 1)
    assert plain["optimizer"]["params"]["torch_adam"] is True
    assert plain["zero_optimization"] == {"stage": 3} and "aio" not in plain

    cpu = deepspeed_config(load_config(DEBUG, ["train.zero_stage=3", "train.offload.optimizer=cpu",
                                               "train.offload.params=cpu"]).train, 1)
    assert "torch_adam" not in cpu["optimizer"]["params"]  # DeepSpeed's CPU Adam steps the offloaded states
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert cpu["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}

    nvme = deepspeed_config(load_config(DEBUG, ["train.zero_stage=3", "train.offload.optimizer=nvme",
                                                "train.offload.nvme_path=/scratch/swap"]).train, 1)
    zero = nvme["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "nvme", "pin_memory": False, "nvme_path": "/scratch/swap"}
    assert "offload_param" not in zero and zero["sub_group_size"] == 100_000_000
    assert nvme["aio"]["block_size"] == 1_048_576


def _estimate(overrides: list[str]) -> dict[str, float]:
    cfg = load_config("configs/h3_hybrid_2.7b.yaml", ["train.precision=bf16", "train.zero_stage=3",
                                                      "train.micro_batch_size=1", "data.seq_len=128", *overrides])
    n = full_parameter_count(cfg.model)
    return estimate_memory(n, cfg.model, cfg.train, cfg.data.seq_len, cfg.model.vocab_size, 1, "bf16")


def test_offload_moves_bytes_from_device_to_host_and_nvme_and_keeps_the_sum() -> None:
    none = _estimate([])
    assert "offloaded_host" not in none
    n = full_parameter_count(load_config("configs/h3_hybrid_2.7b.yaml").model)
    assert none["master_weights"] + none["optimizer_states"] == pytest.approx(12 * n)

    cpu = _estimate(["train.offload.optimizer=cpu"])
    assert cpu["master_weights"] == cpu["optimizer_states"] == 0
    # fp32 master and Adam m, v (12 B), the bf16 gradient partition (2 B) and its fp32 copy CPU Adam reads (4 B).
    assert cpu["offloaded_host"] == pytest.approx(18 * n) and cpu["offloaded_nvme"] == 0
    assert cpu["total"] == pytest.approx(none["total"] - 12 * n - 2 * n + cpu["gradients"])
    assert cpu["gradients"] == pytest.approx((2 + 4) * 500e6)  # one reduction bucket, and its fp32 copy

    nvme = _estimate(["train.offload.optimizer=nvme", "train.offload.params=nvme", "train.offload.nvme_path=/x"])
    assert nvme["offloaded_nvme"] == pytest.approx(16 * n + 2 * n)  # optimizer states, fp32 gradients, bf16 weights
    assert nvme["weights"] < 2 * n / 4  # only the layers being computed stay on the device
    # Host RAM: the gradient partition, the optimizer's and the parameters' swap buffers; far below 12 B/param.
    # (DeepSpeed keeps up to 1e9 weight elements in host RAM: offload_param.max_in_cpu.) The optimizer's 4 buffers
    # hold the largest sub-group: the 50257 x 2560 embedding, a sub-group of its own as it exceeds 1e8 elements.
    assert nvme["offloaded_host"] == pytest.approx(2 * n + 4 * 50257 * 2560 * 4 + 5 * 100e6 * 2 + 1e9 * 2)
    # a full reduction bucket, its reduce-scatter output (bf16) and the fp32 gradients on their way to NVMe
    assert nvme["gradients"] == pytest.approx((2 + 2 + 4) * 500e6)


def test_the_offloaded_2_7b_plan_fits_24_gib_only_with_the_optimizer_on_nvme() -> None:
    cpu = _estimate(["train.offload.optimizer=cpu", "train.offload.params=cpu"])
    assert cpu["total"] + cpu["offloaded_host"] > 40 * GB  # fp32 master + Adam alone are 32 GB
    nvme = _estimate(["train.offload.optimizer=nvme", "train.offload.nvme_path=/x"])
    assert nvme["total"] + nvme["offloaded_host"] < 22 * 2**30
    n = full_parameter_count(load_config("configs/h3_hybrid_2.7b.yaml").model)
    assert nvme["offloaded_nvme"] == pytest.approx(16 * n)
