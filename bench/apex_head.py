"""Benchmark the APEX head: plain module vs fused inference next to the matmul-only floor, and
one training epoch.

Run: ``.venv/bin/python -m bench.apex_head [--batch 4096] [--repeats 20] [--profile]``.

At each batch size (1, 64 and ``--batch``) the plain module, the fused head and the floor run
interleaved (every method once per round, order rotated, so a load change hits all alike):

- **floor**: the fused head's matrix products alone at the same shapes (trunk 768→512→256,
  first branch layer 256→T·128, then T·(128→64) and T·(64→1)), without bias, GELU or sigmoid,
  two ways: torch's ``mm``/``bmm`` (MKL) into preallocated outputs, and the oneDNN products the
  fused head uses. The faster of the two is the floor.
- **fused / floor** is the issue-15 figure (goal ≤ 1.2 at batch 4096); the largest absolute
  difference between fused and plain outputs is printed (goal ≤ 1e-4).

``--profile`` adds a torch.profiler table (self CPU time per op) of the plain and fused heads.
"""

from __future__ import annotations

from apex_rank.threads import prefer_passive_openmp

prefer_passive_openmp()  # before torch loads its thread pools (see apex_rank.threads)

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from apex_rank.model import ApexHead, FusedApexHead, has_fused_linear  # noqa: E402
from apex_rank.threads import configure_threads  # noqa: E402
from bench.common import interleaved, median, print_header  # noqa: E402


def _floors(fused: FusedApexHead, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The fused head's matrix products alone, at its shapes, one callable per library: MKL
    ``mm`` for the trunk and the wide first branch layer and ``bmm`` over the tasks for the
    other two, into preallocated outputs; and the oneDNN products the fused head calls."""
    n, t, h1 = x.shape[0], len(fused.tasks), fused.h1
    trunk = [w.t() for w in fused.trunk_w]  # (in, out) views: mm reads them transposed, no copy
    outs = [torch.empty(n, w.shape[1]) for w in trunk]
    b1 = torch.empty(n, fused.w1.shape[0])
    w2, w3 = fused.w2.transpose(1, 2), fused.w3.transpose(1, 2)  # (T, 128, 64), (T, 64, 1)
    b2 = torch.empty(t, n, w2.shape[2])
    b3 = torch.empty(t, n, 1)

    def mkl() -> None:
        h = x
        for w, o in zip(trunk, outs, strict=True):
            h = torch.mm(h, w, out=o)
        h = torch.mm(h, fused.w1.t(), out=b1)
        torch.bmm(torch.bmm(h.view(n, t, h1).transpose(0, 1), w2, out=b2), w3, out=b3)

    floors = {"floor: mm/bmm (MKL)": mkl}
    if has_fused_linear():
        linear = torch.ops.mkldnn._linear_pointwise

        def onednn() -> None:
            h = x
            for w in fused.trunk_w:
                h = linear(h, w, None, "none", [None], "none")
            h = linear(h, fused.w1, None, "none", [None], "none")
            for i in range(t):
                h2 = linear(h[:, i * h1 : (i + 1) * h1], fused.w2[i], None, "none", [None], "none")
                linear(h2, fused.w3[i], None, "none", [None], "none")

        floors["floor: oneDNN products"] = onednn
    return floors


def measure_head(batch: int, repeats: int, *, input_dim: int = 768, seed: int = 0) -> dict[str, Any]:
    """Medians (s) of the plain head, the fused head and each floor at ``batch`` rows, over
    ``repeats`` interleaved rounds, with the floor (the fastest product-only variant), the
    ratios and the largest |fused - plain|. The head is seeded and untrained (timing does not
    depend on its weights)."""
    torch.manual_seed(seed)
    head = ApexHead(input_dim).eval()
    fused = FusedApexHead.from_head(head)
    x = torch.randn(batch, input_dim)
    with torch.inference_mode():
        diff = float((fused(x) - head(x)).abs().max())

        def plain() -> None:
            head(x)

        def run_fused() -> None:
            fused(x)

        times = interleaved({"plain": plain, "fused": run_fused, **_floors(fused, x)}, repeats)
    med = {name: median(ts) for name, ts in times.items()}
    floor_name = min((n for n in med if n.startswith("floor")), key=med.__getitem__)
    return {
        "batch": batch, "repeats": repeats, "median_s": med, "floor": floor_name, "floor_s": med[floor_name],
        "fused_over_floor": med["fused"] / med[floor_name], "plain_over_fused": med["plain"] / med["fused"],
        "max_abs_diff": diff, "onednn": fused.onednn,
    }


def profile_head(batch: int, rounds: int = 10) -> str:
    """torch.profiler tables (self CPU time per op) of ``rounds`` calls of the plain and the
    fused head at ``batch`` rows."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    head = ApexHead(768).eval()
    fused = FusedApexHead.from_head(head)
    x = torch.randn(batch, 768)
    tables = []
    with torch.inference_mode():
        for name, fn in (("plain", head), ("fused", fused)):
            fn(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(rounds):
                    fn(x)
            tables.append(f"{name} head, {rounds} calls at batch {batch}:\n"
                          + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return "\n".join(tables)


def print_result(r: dict[str, Any]) -> None:
    """Print one :func:`measure_head` result (two lines)."""
    b = r["batch"]
    print(f"batch {b}: " + ", ".join(f"{n} {s * 1e3:.3f} ms" for n, s in r["median_s"].items()))
    print(f"  fused {b / r['median_s']['fused']:,.0f} songs/s; fused/floor x{r['fused_over_floor']:.2f} "
          f"(floor: {r['floor']}); plain/fused x{r['plain_over_fused']:.2f}; max |fused - plain| "
          f"{r['max_abs_diff']:.2e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.apex_head", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--epoch-rows", type=int, default=211_000, help="rows of the one-epoch training timing (0: skip)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables at --batch")
    args = ap.parse_args(argv)
    configure_threads(args.threads)
    print_header("APEX head: plain vs fused inference vs the matmul-only floor, one training epoch")
    print(f"load average at start: {os.getloadavg()[0]:.2f}; oneDNN fused linear: {has_fused_linear()}; "
          f"{args.repeats} interleaved rounds at batch >= 1024, 20x that below")
    # The batch (4096) plus the small batches an online service scores per request.
    for batch in sorted({1, 64, args.batch}):
        print_result(measure_head(batch, args.repeats if batch >= 1024 else 20 * args.repeats))
    if args.profile:
        print(profile_head(args.batch))

    if args.epoch_rows:
        from apex_rank.training import ApexTrainer, TrainConfig

        rng = np.random.default_rng(0)
        n = args.epoch_rows
        X = rng.normal(size=(n, 768)).astype(np.float32)
        Y = np.concatenate([rng.uniform(0, 100, (n, 2)), rng.uniform(1, 5, (n, 5))], axis=1).astype(np.float32)
        cfg = TrainConfig(epochs=1, device="cpu", progress=False)
        t0 = time.perf_counter()
        ApexTrainer(cfg).fit(X, Y, X[:2048], Y[:2048])
        el = time.perf_counter() - t0
        print(f"training: one epoch over {n:,} x 768 random embeddings, batch 512, uncertainty loss: {el:.1f} s "
              f"({n / el:,.0f} rows/s)")
    print(f"load average at end: {os.getloadavg()[0]:.2f} (compare ratios within this run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
