"""Benchmark the APEX head: plain module vs fused inference (batch 1, 64, 4096), and one training epoch.

Run: ``.venv/bin/python -m bench.apex_head [--epoch-rows 211000] [--repeats 20]``.
Prints medians and the fused/plain speed-up measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from apex_rank.model import ApexHead, FusedApexHead
from apex_rank.threads import configure_threads
from apex_rank.training import ApexTrainer, TrainConfig
from bench.common import median, print_header, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--epoch-rows", type=int, default=211_000, help="rows of the one-epoch training timing")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    configure_threads(args.threads)
    print_header("APEX head: plain vs fused inference, one training epoch")

    torch.manual_seed(0)
    head = ApexHead(768).eval()
    fused = FusedApexHead.from_head(head)
    # The batch (4096) plus the small batches an online service scores per request.
    for batch in sorted({1, 64, args.batch}):
        x = torch.randn(batch, 768)
        with torch.inference_mode():
            diff = float((fused(x) - head(x)).abs().max())

        def plain_run(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                head(x)

        def fused_run(x: torch.Tensor = x) -> None:
            fused(x)

        # Interleave the two so drift in machine load hits both alike.
        repeats = args.repeats if batch >= 1024 else 20 * args.repeats
        plain_t, fused_t = [], []
        for _ in range(repeats):
            plain_t += timed(plain_run, repeats=1, warmup=0 if plain_t else 2)
            fused_t += timed(fused_run, repeats=1, warmup=0 if fused_t else 2)
        mp, mf = median(plain_t), median(fused_t)
        print(f"inference batch {batch}: plain {batch / mp:,.0f} songs/s (median {mp * 1e3:.3f} ms), "
              f"fused {batch / mf:,.0f} songs/s (median {mf * 1e3:.3f} ms), speed-up x{mp / mf:.2f}, "
              f"max |diff| {diff:.2e}")

    rng = np.random.default_rng(0)
    n = args.epoch_rows
    X = rng.normal(size=(n, 768)).astype(np.float32)
    Y = np.concatenate([rng.uniform(0, 100, (n, 2)), rng.uniform(1, 5, (n, 5))], axis=1).astype(np.float32)
    Xv, Yv = X[:2048], Y[:2048]
    cfg = TrainConfig(epochs=1, device="cpu", progress=False)
    t0 = time.perf_counter()
    ApexTrainer(cfg).fit(X, Y, Xv, Yv)
    el = time.perf_counter() - t0
    print(f"training: one epoch over {n:,} x 768 random embeddings, batch 512, uncertainty loss: {el:.1f} s "
          f"({n / el:,.0f} rows/s)")


if __name__ == "__main__":
    main()
