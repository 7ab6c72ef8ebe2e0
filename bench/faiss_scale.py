"""FAISS at catalogue scale: ``python -m bench.faiss_scale [--quick] [--songs 1000000] [--train-study]``.

The :class:`~apex_rank.ranking.index.CatalogueIndexConfig` index (PCA with random rotation to
256, IVF with about 4·√n lists, PQ64, 8-bit refinement) built by ``build_catalogue_index`` on
SYNTHETIC embedding-like vectors of width 768 (``embedding_like``: a 64-dimensional latent
taste in 1024 overlapping topic clusters, projected to 768 and L2-normalised, plus isotropic noise; on
isotropic Gaussian vectors, which have no neighbourhood structure, every ANN index does far
worse). Reports:

- **build**: training (sample size from ``train_size``) and adding, seconds;
- **memory**: the process's resident growth over the build, the index's own estimate
  (``memory_bytes``) and the config's model (``memory_bytes(n, d)``), MB and bytes per song;
- **recall@100** against exact inner-product search (``faiss.knn`` over every vector) on a
  query sample (``--queries``, drawn from the same distribution), per ``nprobe``;
- **latency**: one query at a time (median, p99 over ``--singles`` queries), per ``nprobe``,
  and batch throughput (queries/s over the whole query sample).

``--train-study`` first measures, on a 10^5-song sample of the same distribution, recall@100
against exact search for training samples of 10, 20, 40 and 80 vectors per IVF list and for
the index without refinement: the numbers behind ``train_per_list`` and ``refine``
(``docs/scale.md``).

Prints the machine, its load average, thread settings and library versions; the machine is
shared with other work, so compare ratios within a run, not times across runs.
"""

from __future__ import annotations

from apex_rank.threads import prefer_passive_openmp

prefer_passive_openmp()  # before numpy, faiss and torch load their thread pools (see apex_rank.threads)

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import median, percentile, print_header  # noqa: E402
from bench.memory import memory_kb  # noqa: E402

if TYPE_CHECKING:
    from apex_rank.ranking.index import CandidateIndex, CatalogueIndexConfig

K = 100


def embedding_like(n: int, d: int = 768, *, seed: int = 0, topics: int = 1024, latent: int = 64,
                   spread: float = 1.0, noise: float = 0.5) -> np.ndarray:
    """(n, d) float32 unit rows: a ``latent``-dimensional taste near one of ``topics`` centres
    (standard normal, ``spread`` around each: neighbouring topics overlap), projected to d by a
    fixed random matrix, plus ``noise`` per coordinate. With 256 topics at spread 0.8 and noise
    0.3 every index found 99.6 % of the exact top-100 at any setting, which measures nothing;
    these defaults make nprobe and refinement matter. The projection
    (seed 0) is the same for every ``seed``, so queries drawn with another seed live in the
    same space. Generated in blocks of 100k rows (no n x d float64 temporary)."""
    proj = np.random.default_rng(0)
    W = (proj.normal(size=(latent, d)) / np.sqrt(latent)).astype(np.float32)
    C = proj.normal(size=(topics, latent)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(n, s + 100_000) - s
        z = C[rng.integers(0, topics, m)] + spread * rng.standard_normal((m, latent), dtype=np.float32)
        x = z @ W + noise * rng.standard_normal((m, d), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_top(Q: np.ndarray, X: np.ndarray, k: int = K) -> np.ndarray:
    import faiss

    return faiss.knn(Q, X, k, metric=faiss.METRIC_INNER_PRODUCT)[1]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's exact top-k among the found labels."""
    k = truth.shape[1]
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)]))


def _build(ids: list[str], X: np.ndarray, cfg: CatalogueIndexConfig) -> tuple[CandidateIndex, dict[str, float]]:
    from apex_rank.ranking.index import build_catalogue_index

    times: dict[str, float] = {}
    index = build_catalogue_index(ids, X, cfg, timings=times, progress=False)
    return index, times


def train_study(n: int = 100_000, d: int = 768, queries: int = 500) -> None:
    from apex_rank.ranking.index import CatalogueIndexConfig

    X = embedding_like(n, d)
    Q = embedding_like(queries, d, seed=7)
    ids = [f"s{i}" for i in range(n)]
    truth = exact_top(Q, X)
    base = CatalogueIndexConfig()
    nlist = base.lists_for(n)
    print(f"\n## training sample study: {n:,} songs x {d}, {queries} queries, nlist {nlist}, "
          f"recall@{K} against exact search")
    rows = [(f"{tpl} per list", replace(base, train_per_list=tpl, min_train=0)) for tpl in (10, 20, 40, 80)]
    rows.append(("40 per list, no refinement", replace(base, train_per_list=40, min_train=0, refine=False)))
    for name, cfg in rows:
        index, t = _build(ids, X, cfg)
        rec = {}
        for nprobe in (16, 64):
            index.nprobe = nprobe
            index._apply_search_params()
            rec[nprobe] = recall_at(index.search_labels(Q, K)[1], truth)
        print(f"  {name:28s} train {cfg.train_size(n):>7,} vectors {t['train_s']:6.1f} s, add {t['add_s']:5.1f} s | "
              f"recall@{K} nprobe 16 {rec[16]:.3f}, nprobe 64 {rec[64]:.3f}", flush=True)


def scale_run(n: int, d: int, queries: int, singles: int, nprobes: list[int]) -> None:
    from apex_rank.ranking.index import CatalogueIndexConfig

    cfg = CatalogueIndexConfig()
    t0 = time.perf_counter()
    X = embedding_like(n, d)
    Q = embedding_like(queries, d, seed=7)
    ids = [f"s{i}" for i in range(n)]
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth = exact_top(Q, X)
    exact_s = time.perf_counter() - t0
    print(f"\n## {n:,} songs x {d} (generated in {gen_s:.0f} s; exact top-{K} of {queries} queries "
          f"in {exact_s:.1f} s = {exact_s / queries * 1e3:.1f} ms a query, batched)")
    before = memory_kb()
    index, t = _build(ids, X, cfg)
    after = memory_kb()
    grown = (after["anonymous"] - before["anonymous"]) * 1024
    est = index.memory_bytes()
    model = cfg.memory_bytes(n, d)
    print(f"index {index.factory}: train {cfg.train_size(n):,} vectors {t['train_s']:.1f} s, add {t['add_s']:.1f} s, "
          f"build {t['train_s'] + t['add_s']:.1f} s")
    print(f"memory: process grew {grown / 1e6:.0f} MB over the build (ids and the training sample's temporaries "
          f"included); index estimate {est / 1e6:.0f} MB ({est / n:.0f} B/song); config model "
          f"{model / 1e6:.0f} MB ({model / n:.0f} B/song; {cfg.memory_bytes(10**6, d) / 1e6:.0f} MB per million, "
          f"{cfg.memory_bytes(10**7, d) / 1e9:.2f} GB at 10^7)")
    for nprobe in nprobes:
        index.nprobe = nprobe
        index._apply_search_params()
        t0 = time.perf_counter()
        _, found = index.search_labels(Q, K)
        batch_s = time.perf_counter() - t0
        lat = []
        for i in range(singles):
            t1 = time.perf_counter()
            index.search_labels(Q[i % queries:i % queries + 1], K)
            lat.append(time.perf_counter() - t1)
        print(f"  nprobe {nprobe:4d}: recall@{K} {recall_at(found, truth):.3f} | one query p50 "
              f"{median(lat) * 1e3:.2f} ms p99 {percentile(lat, 99) * 1e3:.2f} ms | batch of {queries} "
              f"{queries / batch_s:,.0f} queries/s | exact / ANN per query x{exact_s / batch_s:.0f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faiss_scale", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200k songs, fewer queries (about 3-5 minutes)")
    ap.add_argument("--songs", type=int, default=None, help="catalogue size (default 1,000,000; --quick 200,000)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=None, help="query sample for recall and batch throughput")
    ap.add_argument("--singles", type=int, default=None, help="one-at-a-time queries per nprobe")
    ap.add_argument("--nprobe", default="16,32,64,128")
    ap.add_argument("--train-study", action="store_true", help="first the training-sample study at 10^5 songs")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    from apex_rank.threads import configure_threads

    configure_threads(args.threads)
    n = args.songs or (200_000 if args.quick else 1_000_000)
    queries = args.queries or (300 if args.quick else 1000)
    singles = args.singles or (200 if args.quick else 500)
    print_header("bench.faiss_scale: IVF-PQ at catalogue scale (SYNTHETIC embedding-like vectors)")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    if args.train_study:
        train_study(d=args.dim)
    scale_run(n, args.dim, queries, singles, [int(x) for x in args.nprobe.split(",")])
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}; {(time.perf_counter() - t0) / 60:.1f} min (2-core "
          "machine shared with other work: compare ratios within this run, not absolute times across runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
