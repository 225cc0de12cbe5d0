"""Config merging: defaults <- YAML <- CLI, typed, unknown keys named, DeepSpeed JSON derived."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.base.typed_config import parse_override
from hybrid_pretrain.parallel.engine import deepspeed_config
from hybrid_pretrain.training.config import ParallelConfig, load_config, save_resolved

REPO = Path(__file__).resolve().parents[2]
DEBUG = str(REPO / "configs" / "debug_hybrid.yaml")


def test_yaml_then_overrides_merge_in_order():
    cfg = load_config(DEBUG, ["train.steps=7", "model.layers=HAHH", "train.lr=1e-3", "data.path=a.jsonl.zst"])
    assert cfg.name == "debug_hybrid"
    assert cfg.model.d_model == 256  # from YAML
    assert cfg.train.steps == 7 and cfg.model.layers == "HAHH"  # from the CLI
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(0.1)  # dataclass default


def test_override_values_are_typed():
    assert parse_override("train.betas=[0.9, 0.99]") == {"train": {"betas": [0.9, 0.99]}}
    assert parse_override("model.tie_embeddings=false") == {"model": {"tie_embeddings": False}}
    assert parse_override("train.warmup_steps=10") == {"train": {"warmup_steps": 10}}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.stpes=3", "unknown config key 'train.stpes'.*did you mean 'train.steps'"),
        ("modle.d_model=3", "unknown config key 'modle'"),
        ("train.steps=abc", "train.steps must be int, got str"),
        ("train.steps=true", "train.steps must be int, got bool"),
        ("model.layers=HHXA", "unknown symbol 'X' at position 2"),
        ("model.layers=HH||A", "'\\|' at position 2"),
        ("model.ffn=DD", "model.ffn 'DD' has 2 symbols but model.layers has 4 layers"),
        ("model.n_heads=3", "divisible by model.n_heads"),
        ("train.zero_stage=4", "train.zero_stage must be 0, 1, 2 or 3"),
        ("train.overfit_batches=-1", "train.overfit_batches must be >= 0"),
        ("steps=3", "unknown config key 'steps'"),
        ("nokeyvalue", "must look like key=value"),
    ],
)
def test_bad_config_names_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(DEBUG, [override])


def test_yaml_typo_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.micro_batch' in .*bad.yaml"):
        load_config(str(bad))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_parallel_sizes_must_divide_world():
    with pytest.raises(ConfigError, match="does not divide the world size 2"):
        ParallelConfig(tensor=3).check_world(2)
    assert ParallelConfig().check_world(4) == 4


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEBUG, ["train.steps=11"])
    path = save_resolved(cfg, tmp_path)
    again = load_config(str(path))
    assert again == cfg
    assert yaml.safe_load(path.read_text())["train"]["steps"] == 11


def test_deepspeed_json_is_derived():
    cfg = load_config(DEBUG, ["train.grad_accum=3", "train.zero_stage=2"])
    ds = deepspeed_config(cfg.train, dp_size=2)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 3 * 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr
    assert ds["gradient_clipping"] == cfg.train.grad_clip
    assert ds["bf16"]["enabled"] is False  # CPU: fp32


@pytest.mark.parametrize(
    "name", ["debug_hybrid", "h3_hybrid_125m", "h3_hybrid_355m", "h3_hybrid_1.3b", "h3_hybrid_2.7b"]
)
def test_shipped_configs_validate(name):
    load_config(str(REPO / "configs" / f"{name}.yaml"))
