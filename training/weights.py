"""Read a finished training run back as a plain model: config, consolidated fp32 weights, tokenizer.

A run directory from launcher/pretrain.py holds ``config.yaml`` (the resolved config),
``checkpoints/<tag>/`` (DeepSpeed shards, sha256 manifest) and ``data/tokenizer.model``. DeepSpeed's
own ``zero_to_fp32`` consolidates ZeRO-1/2/3 shards on the CPU (the fp32 master weights, exact even
for bf16 training); a ZeRO-0 checkpoint already holds the whole module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer
from hybrid_pretrain.models.architectures import build_arch
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.precision import HALF, cast_model, cast_state_dict, fp32_parameter_names
from hybrid_pretrain.parallel.pipeline import lm_name
from hybrid_pretrain.training.checkpoint import (
    LAYOUT,
    MANIFEST,
    CheckpointError,
    choose_tag,
    complete_tags,
    is_tag,
    latest_tag,
    verify,
)
from hybrid_pretrain.training.config import RunConfig, load_config, save_resolved
from hybrid_pretrain.training.expert_checkpoint import is_moe_checkpoint, moe_model_parallel_state_dict, moe_state_dict
from hybrid_pretrain.training.nvme_checkpoint import is_nvme_checkpoint, nvme_state_dict
from hybrid_pretrain.training.safe_load import load_pt, restricted_unpickling
from hybrid_pretrain.training.shards import join_tensor_ranks

# The token embedding, whose rows give the vocabulary size, of architectures that keep it elsewhere.
EMBEDDING_KEYS = {"atlas": "reader.embedding.weight"}
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-0/1/2; a pre-manifest run is accepted only with it


@dataclass
class RunWeights:
    """What generation and evaluation need from a run."""

    config: RunConfig  # model.vocab_size resolved from the weights
    state_dict: dict[str, torch.Tensor]  # fp32, CPU
    tokenizer: Tokenizer | None  # None when the run dir has no data/tokenizer.model (e.g. a user tokenizer moved)
    tag: str


def consolidated_state_dict(ckpt_dir: Path, tag: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of checkpoint `tag` in `ckpt_dir`, on CPU, whatever the ZeRO stage and rank count.

    Files are unpickled weights-only (training.safe_load) unless `trust` (the user's --trust-checkpoint).
    """
    tag_dir = ckpt_dir / tag
    if (tag_dir / LAYOUT).is_file():
        if is_moe_checkpoint(tag_dir):  # EP x TP / EP x PP: DeepSpeed's expert files (training.expert_checkpoint)
            return moe_model_parallel_state_dict(tag_dir, trust)
        return _model_parallel_state_dict(tag_dir, trust)
    if is_moe_checkpoint(tag_dir):  # experts live in per-expert files, which zero_to_fp32 cannot read
        return moe_state_dict(tag_dir, trust)
    # ZeRO-0/1/2 write mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_*_model_states.pt per rank.
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    if not model_files:
        raise CheckpointError(f"{tag_dir} holds no *model_states.pt; expected a DeepSpeed checkpoint folder")
    states = load_pt(model_files[0], trust)
    stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 0:  # no optimizer partitions: the module is whole (cast, as bf16 runs keep no fp32 copy here)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    if is_nvme_checkpoint(tag_dir):  # the fp32 master weights are in DeepSpeed's swap files, not the .pt files
        optim_files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"), key=_zero_rank)
        flat_groups = [[g.detach().float() for g in load_pt(f, trust)["optimizer_state_dict"]["fp32_flat_groups"]]
                       for f in optim_files]
        return nvme_state_dict(tag_dir, [load_pt(f, trust) for f in sorted(model_files, key=_zero_rank)],
                               flat_groups, _parameter_order(ckpt_dir.parent))
    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed reports progress on stdout; keep it for results
    with contextlib.redirect_stdout(sys.stderr), restricted_unpickling(tag_dir, trust):
        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    if stage <= 2:  # frozen parameters (Atlas's query-side-only passage tower) have no optimizer partition, and
        # ZeRO-1 does not save them for zero_to_fp32; the module state holds them whole
        state.update({k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()
                      if k not in state})
    return state


def _zero_rank(path: Path) -> int:
    """The data-parallel rank in a ``zero_pp_rank_R_...`` file name."""
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


def _parameter_order(run_dir: Path) -> list[str]:
    """The run's ``model.named_parameters()`` order (DeepSpeed's parameter ids), from its model built on meta."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{config} is missing; an NVMe-offloaded checkpoint needs its run's config.yaml to "
                              "name the swapped weights")
    model_cfg = load_config(str(config), [f"run_dir={run_dir}"]).model
    if not model_cfg.vocab_size:  # resolved from the tokenizer at run time; names do not depend on it
        model_cfg = dataclasses.replace(model_cfg, vocab_size=64)
    with torch.device("meta"):
        model = build_arch(model_cfg)
    return [name for name, _ in model.named_parameters()]


_PIPE_FILE = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
_TP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
# ZeRO-3 under tensor parallelism: each tensor rank's shard is partitioned over its data-parallel group, one model
# and one optimizer file per (dp rank, tensor rank); bf16 runs prefix the optimizer files with "bf16_".
_ZERO3_TP_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


def _zero3_tensor_shards(tag_dir: Path, trust: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """Tensor rank -> that rank's whole (un-partitioned) fp32 shard, from a ZeRO-3 checkpoint's partitions.

    DeepSpeed's zero_to_fp32 consolidates the data-parallel partitions of one model-parallel rank: it
    globs every ``*_model_states.pt`` / ``*_optim_states.pt`` in a folder. So each tensor rank gets a
    folder of symlinks to its own files only, and the public ``get_fp32_state_dict_from_zero_checkpoint``
    does the rest (the fp32 master weights, exact). Empty when `tag_dir` holds no such files.
    """

    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    files: dict[int, list[Path]] = {}
    for path in tag_dir.iterdir():
        m = _ZERO3_TP_FILE.match(path.name)
        if m:
            files.setdefault(int(m.group(2)), []).append(path)
    if not any(p.name.endswith("_model_states.pt") for paths in files.values() for p in paths):
        return {}  # ZeRO-1/2 name their optimizer partitions alike, but keep whole shards in mp_rank_XX_model_states.pt
    shards = {}
    for rank, paths in sorted(files.items()):
        with tempfile.TemporaryDirectory(prefix="zero3-tp-") as tmp:
            (Path(tmp) / tag_dir.name).mkdir()
            for path in paths:
                (Path(tmp) / tag_dir.name / path.name).symlink_to(path.resolve())
            # DeepSpeed reports progress on stdout
            with contextlib.redirect_stdout(sys.stderr), restricted_unpickling(tag_dir, trust):
                try:
                    shards[rank] = dict(get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag_dir.name))
                except (FileNotFoundError, ValueError) as e:  # a missing partition: DeepSpeed names the count
                    raise CheckpointError(f"{tag_dir}: tensor rank {rank}'s ZeRO-3 partitions do not consolidate: "
                                          f"{e}") from None
    return shards


def _model_parallel_state_dict(tag_dir: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Reassemble a tensor/pipeline-parallel checkpoint's module weights into the single-rank state dict.

    Reads the module states DeepSpeed writes per tensor rank (``mp_rank_XX_model_states.pt``) or per
    pipeline layer and tensor rank (``layer_NN-model_XX-model_states.pt``) and joins shards as the
    ``parallel_layout.json`` beside them says. Those are the weights the engine trains (exact for
    fp32 runs; a bf16 run's fp32 master copy stays in the optimizer files). Under ZeRO-3 no file holds
    a whole shard, so each tensor rank's fp32 master weights are first consolidated from its
    data-parallel partitions (``_zero3_tensor_shards``).
    """

    layout = json.loads((tag_dir / LAYOUT).read_text())
    tp, sharded = layout["tensor"], layout["sharded"]
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    zero3 = _zero3_tensor_shards(tag_dir, trust) if layout["pipeline"] == 1 else {}
    for rank, states in zero3.items():
        for key, value in states.items():
            pieces.setdefault(key, {})[rank] = value
    paths = [] if zero3 else sorted(tag_dir.iterdir())  # ZeRO-0/1/2: each tensor rank's module is whole
    # DeepSpeed's pipeline engine writes per-layer files; a ZeRO-2 pipeline (parallel.one_f_one_b) and TP runs
    # write one file per model-parallel rank, numbered stage x TP + tensor rank.
    per_layer = layout["pipeline"] > 1 and any(_PIPE_FILE.match(p.name) for p in paths)
    for path in paths:
        pipe, tensor = _PIPE_FILE.match(path.name), _TP_FILE.match(path.name)
        if per_layer and pipe:
            layer, rank = int(pipe.group(1)), int(pipe.group(2) or 0)
            states = load_pt(path, trust)
            names = {k: k if layer == 0 else lm_name(f"{layer}.{k}", layout["n_blocks"]) for k in states}
        elif not per_layer and tensor:
            rank = int(tensor.group(1)) % tp
            states = load_pt(path, trust)["module"]
            names = {k: lm_name(k, layout["n_blocks"]) if layout["pipeline"] > 1 else k for k in states}
        else:
            continue
        for key, value in states.items():
            if torch.is_tensor(value):
                pieces.setdefault(names[key], {})[rank] = value
    return join_tensor_ranks(pieces, sharded, tp, tag_dir)


def load_run(run_dir: str | Path, tag: str | None = None, trust: bool = False) -> RunWeights:
    """Config, weights and tokenizer of a run; `tag` None takes the newest intact checkpoint.

    Nothing but tensors and DeepSpeed's own types is unpickled unless `trust` (--trust-checkpoint).
    Raises CheckpointError (no checkpoint, failed checksum, refused pickle) or ConfigError (unreadable
    config) with a message naming the file.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing; expected a run directory written by launcher/pretrain.py")
    cfg = load_config(str(config_path), [f"run_dir={run_dir}"])  # the run may have moved since it was written
    ckpt_dir = run_dir / "checkpoints"
    if tag is None and not complete_tags(ckpt_dir) and (ckpt_dir / str(latest_tag(ckpt_dir)) / MODEL_STATES).is_file():
        tag = latest_tag(ckpt_dir)  # written before checkpoints carried manifests: nothing to verify against
        print(f"warning: {ckpt_dir / tag} has no {MANIFEST}; loading it unverified", file=sys.stderr)
    elif tag is None:
        tag = choose_tag(ckpt_dir)
    elif not is_tag(tag):
        raise CheckpointError(f"--tag '{tag}' is not a checkpoint tag; expected e.g. step00000150 (see {ckpt_dir})")
    else:
        problem = verify(ckpt_dir / tag)
        if problem is not None:
            raise CheckpointError(f"checkpoint '{tag}' in {ckpt_dir} is not usable: {problem}")
    state_dict = consolidated_state_dict(ckpt_dir, tag, trust)
    embedding = EMBEDDING_KEYS.get(cfg.model.arch, "embedding.weight")
    if embedding not in state_dict:
        raise CheckpointError(f"{ckpt_dir / tag} holds no '{embedding}'; expected a model.arch "
                              f"'{cfg.model.arch}' checkpoint")
    cfg.model = dataclasses.replace(cfg.model, vocab_size=state_dict[embedding].shape[0])
    tok_path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else run_dir / "data" / "tokenizer.model"
    tokenizer = Tokenizer(tok_path) if tok_path.is_file() else None
    return RunWeights(cfg, state_dict, tokenizer, tag)


def build_model(
    weights: RunWeights, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The run's model (model.arch) in eval mode holding the run's weights (strict: every key must match)."""
    with torch.device("meta"):
        model = build_arch(weights.config.model)
    keep_fp32 = fp32_parameter_names(model)  # read before assign=True replaces the parameters and their hints
    model.load_state_dict(weights.state_dict, strict=True, assign=True)  # built on meta: no throw-away init
    missing = [name for name, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise CheckpointError(f"checkpoint '{weights.tag}' leaves {missing[:3]} unset; expected every model tensor")
    return cast_model(model, dtype, device, keep_fp32).eval()  # bf16: the SSM dynamics stay fp32


def cast_weights(weights: RunWeights, dtype: torch.dtype) -> None:
    """Cast a run's consolidated weights to `dtype` in place; under bf16 the SSM dynamics stay fp32 (they set
    decay rates and frequencies: models/precision.py)."""
    with torch.device("meta"):
        keep = fp32_parameter_names(build_arch(weights.config.model)) if dtype in HALF else set()
    cast_state_dict(weights.state_dict, dtype, keep)


# A consolidated checkpoint: one folder a user can copy, evaluate or hand to Hugging Face transformers.
WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "config.json"  # the ModelConfig (plus Hugging Face's fields when exported for it)
RUN_CONFIG_FILE = "config.yaml"  # the run's resolved config, for provenance and evaluation defaults
TOKENIZER_FILE = "tokenizer.model"


def save_consolidated(weights: RunWeights, out_dir: str | Path, extra_config: dict | None = None) -> Path:
    """Write `weights` as model.safetensors + config.json + config.yaml + tokenizer.model in `out_dir`.

    Tied weights are stored once (the tied model has no lm_head tensor); `extra_config` adds keys to
    config.json (Hugging Face's model_type and auto_map).
    """


    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in weights.state_dict.items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "tag": weights.tag})
    model_cfg = {**dataclasses.asdict(weights.config.model), **(extra_config or {})}
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_cfg, indent=2, sort_keys=True) + "\n")
    save_resolved(weights.config, out_dir)
    if weights.tokenizer is not None:
        shutil.copyfile(weights.tokenizer.path, out_dir / TOKENIZER_FILE)
    return out_dir


def model_config_from_dict(values: dict) -> ModelConfig:
    """The ModelConfig fields of a config.json (other keys, e.g. Hugging Face's, are ignored); validated."""

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in values.items() if k in fields})
    cfg.validate()
    if cfg.vocab_size <= 0:
        raise ConfigError(f"vocab_size in {MODEL_CONFIG_FILE} must be a positive integer, got {cfg.vocab_size}")
    return cfg


def load_consolidated(ckpt_dir: str | Path) -> RunWeights:
    """Read a folder written by `save_consolidated`; safetensors only, so loading never unpickles anything."""

    ckpt_dir = Path(ckpt_dir)
    for name in (WEIGHTS_FILE, MODEL_CONFIG_FILE):
        if not (ckpt_dir / name).is_file():
            raise CheckpointError(f"{ckpt_dir / name} is missing; expected a folder written by convert_checkpoint.py")
    try:
        values = json.loads((ckpt_dir / MODEL_CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt_dir / MODEL_CONFIG_FILE} is not valid JSON: {e}") from None
    run_yaml = ckpt_dir / RUN_CONFIG_FILE
    cfg = load_config(str(run_yaml) if run_yaml.is_file() else None, [f"run_dir={ckpt_dir}"])
    cfg.model = model_config_from_dict(values)
    try:
        state_dict = load_file(str(ckpt_dir / WEIGHTS_FILE), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError on a truncated or foreign file
        raise CheckpointError(f"{ckpt_dir / WEIGHTS_FILE} is not a readable safetensors file: {e}") from None
    tok_path = ckpt_dir / TOKENIZER_FILE

    with safe_open(str(ckpt_dir / WEIGHTS_FILE), framework="pt") as f:
        tag = (f.metadata() or {}).get("tag", ckpt_dir.name)
    return RunWeights(cfg, state_dict, Tokenizer(tok_path) if tok_path.is_file() else None, tag)


def load_weights(path: str | Path, tag: str | None = None, trust: bool = False) -> RunWeights:
    """A run directory (DeepSpeed checkpoints) or a consolidated folder, whichever `path` is."""
    if (Path(path) / WEIGHTS_FILE).is_file():
        return load_consolidated(path)
    return load_run(path, tag, trust)
