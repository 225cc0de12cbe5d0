"""Training data from shards: blend weights, splits, per-rank sampling, exact resume, corrupt shards."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from hybrid_pretrain.data_pipeline.config import DataConfig
from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.indexed import IndexedData, resolve_blend, verify_shards
from hybrid_pretrain.data_pipeline.preprocess import PreprocessSettings, preprocess
from hybrid_pretrain.data_pipeline.sampler import RankBatches
from hybrid_pretrain.tests.data_pipeline.corpora import small_tokenizer

SEQ = 32


def _texts(word: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"{word}{rng.randint(0, 9)}" for _ in range(300)) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Input "a" (alpha words, small) and "b" (omega words, 4x larger), with hash-held-out validation."""
    tok = small_tokenizer(tmp_path_factory)
    src = tmp_path_factory.mktemp("src")
    for name, word, n in (("a", "alpha", 10), ("b", "omega", 40)):
        (src / name).mkdir()
        for i, text in enumerate(_texts(word, n, len(name))):
            (src / name / f"{i:03d}.txt").write_text(text)
    out = tmp_path_factory.mktemp("shards")
    preprocess({"a": str(src / "a/*.txt"), "b": str(src / "b/*.txt")}, out, tok,
               PreprocessSettings(val_fraction=0.2, shard_bytes=8000), log=lambda m: None)
    return out


def _open(root: Path, blend: list[str] = (), **kw) -> IndexedData:
    return IndexedData.open(root, SEQ, seed=7, blend=list(blend), cache_dir=root.parent / f"cache{root.name}",
                            log=lambda m: None, **kw)


def _is_alpha(data: IndexedData, sample: torch.Tensor) -> bool:
    text = data.tokenizer.decode(sample.tolist())
    assert ("alpha" in text) != ("omega" in text)  # a sample never mixes sets
    return "alpha" in text


def test_weighted_blend_upsamples_the_small_set(shards: Path) -> None:
    data = _open(shards, ["0.7 a", "0.3 b"], train_samples=400)
    assert 400 <= len(data.train) <= 400 + len(data.blend["train"][0])  # megatron rounds up per shard
    share = sum(_is_alpha(data, data.train[i]) for i in range(len(data.train))) / len(data.train)
    assert abs(share - 0.7) < 0.02  # although "a" holds a fifth of the tokens
    by_tokens = _open(shards)  # no blend: every input in proportion to its tokens
    share = sum(_is_alpha(by_tokens, by_tokens.train[i]) for i in range(len(by_tokens.train))) / len(by_tokens.train)
    assert 0.1 < share < 0.3
    assert data.describe() == "a/a 0.70, b/b 0.30"


def test_samples_are_packed_documents_with_eos(shards: Path) -> None:
    data = _open(shards, ["1 b"])
    eos = data.tokenizer.eos_id
    samples = [data.train[i] for i in range(len(data.train))]
    assert all(s.shape == (SEQ + 1,) and s.dtype == torch.int64 for s in samples)
    assert sum(int((s == eos).sum()) for s in samples) > 0  # document boundaries are inside samples
    assert len(data.val) > 0 and all(not _is_alpha(data, data.val[i]) for i in range(len(data.val)))


def test_rank_batches_are_disjoint_reshuffled_per_epoch_and_resume_exactly(shards: Path) -> None:
    data = _open(shards, ["0.5 a", "0.5 b"], train_samples=48)
    ranks = [RankBatches(data.train, 4, r, 2, seed=3) for r in range(2)]
    steps = ranks[0].steps_per_epoch
    assert steps == len(data.train) // 8 >= 6
    epoch0 = [[next(r) for _ in range(steps)] for r in ranks]
    seen = [tuple(s.tolist()) for rank in epoch0 for b in rank for s in b]
    assert len(set(seen)) == len(seen)  # no sample twice across ranks within an epoch
    assert list(ranks[0].permutation(0).copy()) != list(ranks[0].permutation(1))  # reshuffled every epoch

    straight = RankBatches(data.train, 4, 1, 2, seed=3)
    reference = [next(straight) for _ in range(15)]
    first = RankBatches(data.train, 4, 1, 2, seed=3)
    for _ in range(8):
        next(first)
    state = first.state_dict()
    reopened = _open(shards, ["0.5 a", "0.5 b"], train_samples=48)  # a new process: indices come from the cache
    resumed = RankBatches(reopened.train, 4, 1, 2, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed), ref) for ref in reference[8:])


def test_blend_errors_name_the_entry_and_the_choices(shards: Path) -> None:
    _, found = verify_shards(shards)
    with pytest.raises(DataError, match=r"'0.5 a/Github' matches no training shard; available: a/a, b/b"):
        resolve_blend(["0.5 a/Github", "0.5 b"], found)
    with pytest.raises(DataError, match="must look like 'WEIGHT INPUT"):
        resolve_blend(["pile 0.5"], found)
    with pytest.raises(DataError, match="data.blend is set but data.indexed is empty"):
        DataConfig(blend=["1 a"]).validate()
    with pytest.raises(DataError, match="data.indexed .* and data.path .* are both set"):
        DataConfig(indexed="x", path="y").validate()


@pytest.mark.parametrize("damage", ["truncated_bin", "garbage_idx", "stray_bin", "no_manifests"])
def test_corrupt_shards_are_named_before_training(shards: Path, tmp_path: Path, damage: str) -> None:
    root = tmp_path / "copy"
    shutil.copytree(shards, root, ignore=shutil.ignore_patterns("cache*"))
    victim = sorted(root.glob("b/train/b/*.bin"))[0]
    if damage == "truncated_bin":
        victim.write_bytes(victim.read_bytes()[:-6])
        match = f"shard '{victim}' is .* bytes but its manifest says"
    elif damage == "garbage_idx":
        idx = victim.with_suffix(".idx")
        idx.write_bytes(b"\0" * idx.stat().st_size)
        match = f"shard '{victim.with_suffix('')}.idx' is not a valid IndexedDataset index"
    elif damage == "stray_bin":
        shutil.copy(victim, victim.with_name("s9-00000.bin"))
        match = "s9-00000.bin' has no manifest"
    else:
        shutil.rmtree(root / "a/manifests")
        shutil.rmtree(root / "b/manifests")
        match = "holds no shard manifests"
    with pytest.raises(DataError, match=match):
        _open(root)
