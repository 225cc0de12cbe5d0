"""Atlas's source filter on a training step's shape: ``python bench/source_filter.py [--repeats N]``.

`models.atlas.source_filter.holds_window_text` runs on every training step with ``exclude_source`` set, for B
windows against the C = K x rerank x overfetch candidates the index returned. It prints the median and minimum
time of the first, set-based form (Python n-gram tuple sets per window and candidate, kept as the test's reference)
and of the vectorised one (hashed spans, one batched sorted lookup), called in turn so load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hybrid_pretrain.models.atlas.source_filter import (
    SOURCE_NGRAM,
    holds_window_text,
    holds_window_text_reference,
)


def inputs(B: int, C: int, L: int, P: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Windows (B, L) and right-padded candidates (B, C, P), every fourth one holding a span of its window."""
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(vocab, (B, L), generator=g)
    passages = torch.randint(vocab, (B, C, P), generator=g)
    passages[:, ::4, : L // 2] = windows[:, None, L // 2 :]
    mask = torch.arange(P) < torch.randint(P // 2, P + 1, (B, C, 1), generator=g)  # (B, C, P)
    return windows, passages, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 32, 96, 96], metavar=("B", "C", "L", "P"),
                        help="windows, candidates per window, window and passage tokens (default: a PG-19 step)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    B, C, L, P = args.shape
    windows, passages, mask = inputs(B, C, L, P, vocab=4096)
    assert holds_window_text(windows, passages, mask).equal(
        holds_window_text_reference(windows, passages, mask, SOURCE_NGRAM))
    times: dict[str, list[float]] = {"set-based": [], "vectorised": []}
    for _ in range(args.repeats):
        for name, fn in (("set-based", lambda: holds_window_text_reference(windows, passages, mask, SOURCE_NGRAM)),
                         ("vectorised", lambda: holds_window_text(windows, passages, mask))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for stat, fn in (("median", statistics.median), ("min", min)):  # min: the least disturbed call on a shared core
        t = {name: fn(ts) for name, ts in times.items()}
        print(f"B={B} C={C} L={L} P={P}, {stat} of {args.repeats}: set-based {t['set-based'] * 1e3:.2f} ms, "
              f"vectorised {t['vectorised'] * 1e3:.2f} ms, speed-up {t['set-based'] / t['vectorised']:.1f}x")


if __name__ == "__main__":
    main()
