"""ALS top-k benchmark: ``python -m bench.als_topk [--quick] [--sizes 10000,100000]``.

The ``als`` candidate source three ways, on SYNTHETIC factor-like data (64 factors; songs in
topic clusters with log-normal norms, users mixing two topics), at each catalogue size:

- **batch** (users/s, batches of ``--batch`` users, k = 100 after a 50-song history): the
  exact path before issue 15 (``faiss.knn`` with faiss's default BLAS threshold, history
  filter, float64 rescoring: the baseline), its bare ``faiss.knn`` call alone with the default
  threshold and with the threshold at 20 (set and restored around the call here only; for
  reference), and ``top_k_by_factors`` (the exact path now: BLAS matrix products per block of
  users and items, history filter and rescoring included);
- **single query** (ms p50/p99): the previous and the current exact path for one user, and
  the IVF source (``FactorIndexSource``, what the online engine uses from 50k warm songs);
- **ANN recall@100** of the IVF source against the exact top-100.

Then, on the ``bench.ranking`` world (clustered plays, ALS fitted on the first 80 % of the days),
the **candidate recall** of the ``als`` source: the share of later plays (history excluded)
in the exact top-100 and in the IVF top-100, and their ratio.

Medians over interleaved repeats (each repeat runs every method once, in rotating order), so
a load change hits all methods alike; ratios are against the baseline measured in the same run.
Prints the machine, its load average, thread settings and library versions.
"""

from __future__ import annotations

from apex_rank.threads import prefer_passive_openmp

prefer_passive_openmp()  # before numpy, faiss and torch load their thread pools (see apex_rank.threads)

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import interleaved, median, percentile, print_header  # noqa: E402

K = 100
HISTORY = 50


def factor_like(n_items: int, n_users: int, f: int = 64, *, topics: int = 128,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Item factors (n_items, f) and user factors (n_users, f), float32: items near one of
    ``topics`` centres with log-normal norms (popular songs have long vectors), users a mix of
    two topics. IVF recall on these is within 0.01 of recall on ALS factors fitted to the
    ``bench.ranking`` world; on isotropic Gaussian factors (no structure) it is far lower."""
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(topics, f)) / np.sqrt(f)
    V = (C[rng.integers(0, topics, n_items)] + 0.7 * rng.normal(size=(n_items, f)) / np.sqrt(f)) \
        * rng.lognormal(0.0, 0.6, (n_items, 1))
    t = rng.integers(0, topics, (n_users, 2))
    U = C[t[:, 0]] + 0.5 * C[t[:, 1]] + 0.5 * rng.normal(size=(n_users, f)) / np.sqrt(f)
    return V.astype(np.float32), U.astype(np.float32)


def faiss_knn(U: np.ndarray, V: np.ndarray, k: int, threshold: int | None = None) -> None:
    """``faiss.knn`` inner product; with ``threshold``, faiss's BLAS threshold is set for the
    call and restored after it (process-global: fine in this single-threaded benchmark)."""
    import faiss

    before = faiss.cvar.distance_compute_blas_threshold
    if threshold is not None:
        faiss.cvar.distance_compute_blas_threshold = threshold
    try:
        faiss.knn(U, V, k, metric=faiss.METRIC_INNER_PRODUCT)
    finally:
        faiss.cvar.distance_compute_blas_threshold = before


def previous_top_k(U: np.ndarray, V: np.ndarray, k: int, exclude: Any) -> tuple[np.ndarray, np.ndarray]:
    """The exact path before issue 15: the benchmark's baseline and the test oracle
    (``tests/unit/test_cf_topk.py`` checks that ``top_k_by_factors`` returns exactly this).
    ``faiss.knn`` (default threshold) fetches k + the longest history + 32 per row, more when
    the k-th best's error bound reaches past them; excluded items are dropped, the rest within
    the bound rescored in float64, ties by item index. Returns item indices (-1 padding) and
    float32 scores (-inf padding)."""
    import faiss

    n, n_items = U.shape[0], V.shape[0]
    kk = min(k, n_items)
    top_i = np.full((n, k), -1, np.int64)
    top_s = np.full((n, k), -np.inf, np.float32)
    err = 4.0 * V.shape[1] * 2.0**-24 * float(np.linalg.norm(V, axis=1).max()) * 1.001
    tol = err * np.linalg.norm(U.astype(np.float64), axis=1)
    counts = np.diff(exclude.indptr)
    excluded = np.repeat(np.arange(n, dtype=np.int64), counts) * n_items + exclude.indices
    todo = np.arange(n)
    fetch = min(n_items, kk + int(counts.max(initial=0)) + 32)
    while len(todo):
        D, hit = faiss.knn(U[todo], V, fetch, metric=faiss.METRIC_INNER_PRODUCT)
        hit = hit.astype(np.int64)
        kept = ~np.isin(todo[:, None] * n_items + hit, excluded)
        kth = -np.partition(-np.where(kept, D, -np.inf), kk - 1, axis=1)[:, kk - 1]
        floor = kth - tol[todo]
        done = np.full(len(todo), fetch >= n_items) | (D[:, -1] < floor)
        sel = kept & (D >= floor[:, None])
        for j in np.flatnonzero(done):
            r = todo[j]
            cand = hit[j][sel[j]]
            exact = (U[r].astype(np.float64)[None, :] * V[cand].astype(np.float64)).sum(axis=1)
            order = np.lexsort((cand, -exact))[:kk]
            top_i[r, : len(order)] = cand[order]
            top_s[r, : len(order)] = exact[order].astype(np.float32)
        todo = todo[~done]
        fetch = min(n_items, 2 * fetch)
    return top_i, top_s

def _histories(n_users: int, n_items: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n_items, HISTORY, replace=False)) for _ in range(n_users)]


def _mask(hist: list[np.ndarray], n_items: int) -> Any:
    import scipy.sparse as sp

    cols = np.concatenate(hist) if hist else np.zeros(0, np.int64)
    indptr = np.concatenate([[0], np.cumsum([len(h) for h in hist])])
    return sp.csr_matrix((np.ones(len(cols), np.float32), cols, indptr), shape=(len(hist), n_items))


def _states(U: np.ndarray, hist: list[np.ndarray], names: list[str]) -> tuple[list[Any], list[set[str]]]:
    from apex_rank.ranking.state import UserState

    states = [UserState(f"u{i}", U[i], None, tuple(names[j] for j in h), len(h)) for i, h in enumerate(hist)]
    return states, [set(s.history) for s in states]


def _report(title: str, times: dict[str, list[float]], base: str, per: Callable[[float], str]) -> None:
    b = median(times[base])
    print(title)
    for name, ts in times.items():
        m = median(ts)
        print(f"  {name:36s} median {m * 1e3:9.2f} ms  {per(m):>18s}  x{b / m:5.2f} vs baseline  "
              f"[{', '.join(f'{t * 1e3:.1f}' for t in ts)}]")


def bench_size(n: int, *, batch: int, repeats: int, singles: int) -> None:
    from apex_rank.ranking.candidates import FactorIndexConfig, FactorIndexSource
    from apex_rank.ranking.cf import top_k_by_factors

    V, U = factor_like(n, max(batch, singles, 500))
    names = [f"s{i:07d}" for i in range(n)]
    lookup = np.asarray(names + [""], dtype=object)
    max_norm = float(np.linalg.norm(V, axis=1).max())
    hist = _histories(len(U), n)
    fetch = K + HISTORY + 32  # what the previous path fetched in its first search
    print(f"\n## {n} songs x 64 factors (warm), k = {K} after a {HISTORY}-song history")

    Ub, mask = U[:batch], _mask(hist[:batch], n)
    times = interleaved({
        "previous path (faiss.knn, default)": lambda: previous_top_k(Ub, V, K, mask)[0],
        "  bare faiss.knn, threshold default": lambda: faiss_knn(Ub, V, fetch),
        "  bare faiss.knn, threshold 20": lambda: faiss_knn(Ub, V, fetch, threshold=20),
        "top_k_by_factors (BLAS GEMM)": lambda: top_k_by_factors(Ub, V, names, K, exclude=mask, lookup=lookup,
                                                                max_norm=max_norm),
    }, repeats)
    _report(f"batch of {batch} users (baseline: the previous path; 'bare' rows: its faiss.knn call alone)",
            times, "previous path (faiss.knn, default)", lambda m: f"{batch / m:8.0f} users/s")
    got, _ = top_k_by_factors(Ub, V, names, K, exclude=mask, lookup=lookup, max_norm=max_norm)
    print(f"  same top-{K} (ids and order) as the previous path: "
          f"{got.tolist() == lookup[previous_top_k(Ub, V, K, mask)[0]].tolist()}")

    t0 = time.perf_counter()
    ann = FactorIndexSource(names, V, FactorIndexConfig())
    build_s = time.perf_counter() - t0
    states, excl = _states(U, hist, names)
    single: dict[str, list[float]] = {"previous path (1 user)": [], "top_k_by_factors (1 user)": [],
                                      f"IVF source ({ann.index.factory}, nprobe 64)": []}
    calls: list[Callable[[int], Any]] = [
        lambda i: previous_top_k(U[i:i + 1], V, K, _mask([hist[i]], n))[0],
        lambda i: top_k_by_factors(U[i:i + 1], V, names, K, exclude=_mask([hist[i]], n), lookup=lookup,
                                   max_norm=max_norm),
        lambda i: ann.retrieve_batch([states[i]], K, [excl[i]]),
    ]
    for c in calls:
        c(0)
    for i in range(singles):
        for j in [(i + r) % 3 for r in range(3)]:
            t1 = time.perf_counter()
            calls[j](i)
            single[list(single)[j]].append(time.perf_counter() - t1)
    print(f"single query, {singles} users interleaved (IVF index built in {build_s:.1f} s)")
    b = median(single["previous path (1 user)"])
    for name, ts in single.items():
        print(f"  {name:36s} p50 {median(ts) * 1e3:7.3f} ms  p99 {percentile(ts, 99) * 1e3:7.3f} ms  "
              f"x{b / median(ts):6.2f} vs the previous path's p50")

    ids, _ = ann.retrieve_batch(states[:500], K, excl[:500])
    want, _ = top_k_by_factors(U[:500], V, names, K, exclude=_mask(hist[:500], n), lookup=lookup)
    rec = np.mean([len(set(a) & set(w)) / K for a, w in zip(ids.tolist(), want.tolist(), strict=True)])
    print(f"ANN recall@{K} against the exact top-{K} (500 users, history excluded): {rec:.4f}")


def candidate_recall(n_songs: int, n_users: int, n_interactions: int) -> None:
    """Share of later plays found by the exact and the IVF ``als`` source (see module doc)."""
    import polars as pl

    from apex_rank.ranking.candidates import FactorIndexConfig, FactorIndexSource
    from apex_rank.ranking.cf import CFConfig, CFModel, top_k_by_factors
    from bench.ranking import make_bench_world

    t0 = time.perf_counter()
    _, _, inter = make_bench_world(n_songs, n_users, n_interactions)
    cut = inter["ts"].quantile(0.8)
    early, late = inter.filter(pl.col("ts") < cut), inter.filter(pl.col("ts") >= cut)
    cf = CFModel(CFConfig(factors=64, regularization=20.0, alpha=2.0, iterations=8)).fit(early)
    users = sorted(set(late["user_id"].unique().to_list()) & set(cf.user_ids))
    users = [users[i] for i in np.random.default_rng(0).choice(len(users), min(2000, len(users)), replace=False)]
    later = late.filter(pl.col("user_id").is_in(pl.Series(users).implode())).group_by("user_id").agg("song_id")
    pos = {u: set(s) for u, s in later.iter_rows()}
    upos = {u: i for i, u in enumerate(cf.user_ids)}
    rows = [upos[u] for u in users]
    hist = cf.user_items[rows]
    names = cf.song_ids
    hsets = [{names[j] for j in hist.indices[hist.indptr[r]:hist.indptr[r + 1]]} for r in range(len(users))]
    prep = time.perf_counter() - t0
    exact, _ = top_k_by_factors(cf.user_factors[rows], cf.item_factors, names, K, exclude=hist)
    ann = FactorIndexSource(names, cf.item_factors, FactorIndexConfig())
    from apex_rank.ranking.state import UserState

    states = [UserState(u, cf.user_factors[r], None, tuple(h), len(h)) for u, r, h in zip(users, rows, hsets,
                                                                                           strict=True)]
    approx, _ = ann.retrieve_batch(states, K, hsets)
    n_pos = hit_e = hit_a = 0
    same = 0.0
    for i, u in enumerate(users):
        p = pos[u] - hsets[i]
        e, a = set(exact[i].tolist()) - {""}, set(approx[i].tolist()) - {""}
        n_pos += len(p)
        hit_e += len(p & e)
        hit_a += len(p & a)
        same += len(e & a) / max(1, len(e))
    re, ra = hit_e / max(1, n_pos), hit_a / max(1, n_pos)
    print(f"\n## candidate recall, bench.ranking world: {n_songs} songs x {n_users} users x {n_interactions} plays, "
          f"ALS (64 factors) on the first 80 % of days; {len(names)} warm songs, {len(users)} users, "
          f"{n_pos} later plays outside the history (setup {prep:.0f} s)")
    print(f"  exact top-{K}: {re:.4f} | IVF ({ann.index.factory}, nprobe 64) top-{K}: {ra:.4f} | "
          f"ratio {ra / max(re, 1e-12):.4f} (goal >= 0.98) | ANN recall@{K} vs exact {same / len(users):.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.als_topk", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and queries (about 1-2 minutes)")
    ap.add_argument("--sizes", default="10000,100000", help="catalogue sizes, comma separated")
    ap.add_argument("--batch", type=int, default=1000, help="users per batch call (recommend_batch chunks 1000)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-candidate-recall", action="store_true")
    args = ap.parse_args(argv)
    from apex_rank.threads import configure_threads

    configure_threads(args.threads)
    import faiss

    repeats = args.repeats or (3 if args.quick else 7)
    singles = 100 if args.quick else 400
    print_header("bench.als_topk: exact and approximate ALS top-k (SYNTHETIC data)")
    print(f"load average at start: {os.getloadavg()[0]:.2f}; faiss distance_compute_blas_threshold "
          f"{faiss.cvar.distance_compute_blas_threshold}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
          f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}; {repeats} interleaved repeats")
    for n in (int(x) for x in args.sizes.split(",")):
        bench_size(n, batch=args.batch, repeats=repeats, singles=singles)
    if not args.skip_candidate_recall:
        if args.quick:
            candidate_recall(100_000, 20_000, 1_000_000)
        else:
            candidate_recall(100_000, 50_000, 2_000_000)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (2-core machine shared with other work: "
          "compare ratios within this run, not absolute times across runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
