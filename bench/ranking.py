"""Benchmark of the recommender: ``python -m bench.ranking [--small]``.

A vectorised synthetic world (default 100k songs x 50k users x 2M interactions; ``--small``:
10k x 5k x 200k) with planted taste clusters, quality and a cold share of never-played songs.
Measures: ``Recommender.build`` time split by stage, ``recommend_batch`` throughput next to bare
implicit ``recommend`` on the same users and the same ALS factors (interleaved rounds, medians
and their ratio), single ``recommend`` latency p50/p99, and our ALS fit (polars -> CSR ->
implicit) next to a bare implicit fit on the same CSR in the same run (medians over
``--repeats``). Prints the machine, thread settings and library versions. Everything printed is
synthetic-data timing.

``--bundle DIR`` saves the built recommender there and loads it on later runs (world
generation, the ALS-fit comparison and the build are skipped), so before/after runs rank with
the same model and a 100k-song run does not rebuild for each measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import replace
from datetime import datetime

import numpy as np
import polars as pl


def make_bench_world(
    n_songs: int,
    n_users: int,
    n_interactions: int,
    *,
    dim: int = 64,
    n_clusters: int = 256,
    cold_share: float = 0.1,
    seed: int = 0,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Songs, embeddings and interactions tables, generated without per-row Python loops.

    Users pick a taste cluster by softmax(u . c / tau), then a song inside it with probability
    proportional to exp(quality); a ``cold_share`` of songs is never played (cold).
    """
    from apex_rank.schemas import embeddings_frame

    rng = np.random.default_rng(seed)
    F = 16
    centers = rng.normal(size=(n_clusters, F)).astype(np.float32)
    cluster = rng.integers(0, n_clusters, size=n_songs)
    z = centers[cluster] + 0.3 * rng.normal(size=(n_songs, F)).astype(np.float32)
    q = rng.normal(size=n_songs).astype(np.float32)
    W1 = rng.normal(size=(F + 1, 2 * dim)).astype(np.float32) / np.sqrt(F + 1)
    W2 = rng.normal(size=(2 * dim, dim)).astype(np.float32) / np.sqrt(2 * dim)
    emb = np.tanh(np.concatenate([z, q[:, None]], axis=1) @ W1) @ W2 + 0.1 * rng.normal(size=(n_songs, dim)).astype(
        np.float32
    )
    cold = rng.random(n_songs) < cold_share
    # per-cluster sampling tables over warm songs, weight exp(q)
    order = np.lexsort((np.arange(n_songs), cluster))
    order = order[~cold[order]]
    cl_sorted = cluster[order]
    w = np.exp(q[order]).astype(np.float64)
    starts = np.searchsorted(cl_sorted, np.arange(n_clusters))
    ends = np.searchsorted(cl_sorted, np.arange(n_clusters), side="right")
    csum = np.cumsum(w)
    base = np.concatenate([[0.0], csum])
    # users: taste over clusters, Zipf-like activity
    u = rng.normal(size=(n_users, F)).astype(np.float32)
    activity = rng.pareto(1.5, size=n_users) + 1.0
    users = rng.choice(n_users, size=n_interactions, p=activity / activity.sum())
    logits = (u @ centers.T) / np.sqrt(F) * 2.0
    logits -= logits.max(axis=1, keepdims=True)
    P = np.exp(logits)
    P /= P.sum(axis=1, keepdims=True)
    Pc = np.cumsum(P, axis=1)
    r = rng.random(n_interactions)
    cl = np.minimum((Pc[users] < r[:, None]).sum(axis=1), n_clusters - 1) if n_interactions <= 50_000 else None
    if cl is None:  # chunked to bound memory
        cl = np.empty(n_interactions, dtype=np.int64)
        for s in range(0, n_interactions, 200_000):
            e = s + 200_000
            cl[s:e] = np.minimum((Pc[users[s:e]] < r[s:e, None]).sum(axis=1), n_clusters - 1)
    empty = ends[cl] == starts[cl]
    cl[empty] = cl[~empty][0] if (~empty).any() else 0
    lo, hi = base[starts[cl]], base[ends[cl]]
    target = lo + rng.random(n_interactions) * (hi - lo)
    pos = np.clip(np.searchsorted(csum, target, side="right"), starts[cl], ends[cl] - 1)
    song = order[pos]
    days = 100.0
    ts = rng.uniform(0, days, size=n_interactions)
    epoch = datetime(2026, 1, 1)
    song_ids = [f"s{i:07d}" for i in range(n_songs)]
    release = np.where(cold, rng.uniform(days, days + 10, n_songs), rng.uniform(0, days * 0.8, n_songs))
    streams = rng.poisson(np.exp(1.2 * q) * 50).astype(np.int64)
    songs = pl.DataFrame(
        {
            "song_id": song_ids,
            "created_at": pl.Series(release * 86400.0 * 1e6, dtype=pl.Float64)
            .cast(pl.Int64)
            .cast(pl.Datetime("us"))
            .dt.offset_by(f"{int(epoch.timestamp())}s"),
            "streams": streams,
            "likes": rng.binomial(streams, 0.1).astype(np.int64),
        }
    )
    embeddings = embeddings_frame(song_ids, emb.astype(np.float32), encoder="bench-synthetic")
    sid = pl.Series(song_ids, dtype=pl.String)
    inter = pl.DataFrame(
        {
            "user_id": pl.Series([f"u{i:06d}" for i in range(n_users)], dtype=pl.String).gather(users),
            "song_id": sid.gather(song),
            "ts": pl.Series((ts * 86400.0 * 1e6).astype(np.int64), dtype=pl.Int64)
            .cast(pl.Datetime("us"))
            .dt.offset_by(f"{int(epoch.timestamp())}s"),
            "weight": np.ones(n_interactions, dtype=np.float64),
        }
    )
    return songs, embeddings, inter


def ivf_factory(n_songs: int) -> str:
    """FAISS factory of an IVF content index sized for ``n_songs`` (about 4·√n lists)."""
    return f"IVF{max(16, int(4 * np.sqrt(n_songs)) // 16 * 16)},Flat"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.node()} | {cpu} | {n} usable cores | load avg {load:.1f} | {platform.platform()}"


def batch_vs_bare(rec, users: list[str], repeats: int, k: int = 20) -> dict[str, float]:
    """``recommend_batch`` users/s next to bare implicit ``recommend`` (same users with a CF
    factor, the Recommender's own ALS factors and history, k, history filtered) in interleaved
    rounds; prints and returns the medians and their ratio, and the CPU time per user of each
    (process time of all threads: on a machine shared with other work it moves far less than
    wall time, so its ratio is the steadier comparison)."""
    from apex_rank.ranking.cf import make_implicit_model
    from bench.common import interleaved

    cf = rec.cf
    rows = np.asarray([cf._upos[u] for u in users if cf.has_user(u)], dtype=np.int64)
    bare = make_implicit_model(cf.config)
    bare.user_factors, bare.item_factors = cf.user_factors, cf.item_factors
    liked = cf.user_items[rows]
    cpu: dict[str, list[float]] = {"hybrid": [], "bare": []}

    def on_cpu(name: str, fn):
        def run() -> None:
            c0 = time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
        return run

    times = interleaved(
        {
            "hybrid": on_cpu("hybrid", lambda: rec.recommend_batch(users, k)),
            "bare": on_cpu("bare", lambda: bare.recommend(rows, liked, N=k, filter_already_liked_items=True)),
        },
        repeats,
    )
    ours = len(users) / statistics.median(times["hybrid"])
    base = len(rows) / statistics.median(times["bare"])
    cpu_ours = statistics.median(cpu["hybrid"][1:]) / len(users) * 1e3  # [0]: the warm-up call
    cpu_base = statistics.median(cpu["bare"][1:]) / max(len(rows), 1) * 1e3
    print(
        f"batch   : recommend_batch {len(users)} users, k={k}: {ours:.0f} users/s | bare implicit recommend "
        f"({len(rows)} users, same factors): {base:.0f} users/s | bare/hybrid {base / ours:.2f}x "
        f"[median of {repeats} interleaved rounds; chunks of {rec.config.batch_users} users; "
        f"hybrid rounds {', '.join(f'{t:.2f}' for t in times['hybrid'])} s]"
    )
    print(f"cpu     : hybrid {cpu_ours:.3f} ms per user, bare implicit {cpu_base:.3f} ms per user, "
          f"hybrid/bare {cpu_ours / cpu_base:.2f}x (process time, all threads)")
    return {"hybrid_users_s": ours, "bare_users_s": base, "ratio": base / ours,
            "hybrid_cpu_ms_per_user": cpu_ours, "bare_cpu_ms_per_user": cpu_base}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ranking", description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="10k songs x 5k users x 200k interactions")
    ap.add_argument("--songs", type=int, default=None)
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--interactions", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="repeats of the ALS comparison (median)")
    ap.add_argument("--latency-users", type=int, default=200, help="users timed with single recommend")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--content-factory", default=None, help="FAISS factory of the content index (default IVF)")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--bundle", default=None, help="save the build here, or load it when it exists")
    ap.add_argument("--batch-users", type=int, default=None,
                    help="users ranked per batch round (default: all; the same users for bare implicit)")
    ap.add_argument("--batch-repeats", type=int, default=3, help="interleaved rounds of the batch comparison")
    args = ap.parse_args(argv)
    S, U, N = (10_000, 5_000, 200_000) if args.small else (100_000, 50_000, 2_000_000)
    S, U, N = args.songs or S, args.users or U, args.interactions or N
    repeats = args.repeats or (3 if args.small else 1)
    if args.content_factory is None:
        args.content_factory = ivf_factory(S)

    from apex_rank.config import to_dict
    from apex_rank.manifest import library_versions
    from apex_rank.ranking.cf import CFModel, interactions_to_csr, make_implicit_model
    from apex_rank.ranking.recommender import IndexConfig, Recommender, RecommenderConfig
    from apex_rank.threads import blas_single_threaded, configure_threads, thread_report

    configure_threads(args.threads)
    print(f"# bench.ranking — SYNTHETIC data: {S} songs x {U} users x {N} interactions")
    print(f"machine : {machine()}")
    print(f"threads : {thread_report()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"versions: {library_versions()}")

    from pathlib import Path

    from apex_rank.ranking.recommender import load_recommender

    if args.bundle and (Path(args.bundle) / "manifest.json").is_file():
        t0 = time.perf_counter()
        rec = load_recommender(args.bundle, device="cpu")
        print(f"bundle  : loaded {args.bundle} in {time.perf_counter() - t0:.1f} s (world generation and build "
              "skipped)")
    else:
        t0 = time.perf_counter()
        songs, emb, inter = make_bench_world(S, U, N)
        print(
            f"generate: {time.perf_counter() - t0:.1f} s ({inter['user_id'].n_unique()} active users, "
            f"{inter['song_id'].n_unique()} played songs)"
        )
        # APEX: a small head trained on a 5k-song sample outside the timed build (build then predicts all songs)
        from apex_rank.features.apex_tables import build_apex_dataset, train_apex
        from apex_rank.training import TrainConfig

        t0 = time.perf_counter()
        sample = songs.sample(min(5000, S), seed=0)
        data = build_apex_dataset(sample, emb.filter(pl.col("song_id").is_in(sample["song_id"].implode())), seed=0)
        apex, _, _ = train_apex(
            data, TrainConfig(epochs=5, lr=2e-3, batch_size=512, patience=3, device="cpu", progress=False)
        )
        print(f"apex    : head trained on {sample.height} songs in {time.perf_counter() - t0:.1f} s "
              "(not part of build)")

        # IVF for the 100k-song content index (an exact Flat scan per query costs ~n*d flops on 1-2 cores)
        cfg = replace(RecommenderConfig(), index=IndexConfig(content_factory=args.content_factory, nprobe=args.nprobe))
        print(f"config  : {to_dict(cfg)}")
        # ALS: ours (polars -> CSR -> implicit) vs bare implicit on the same CSR
        ours, ours_fit, bare = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m = CFModel(cfg.cf).fit(inter)
            ours.append(time.perf_counter() - t0)
            ours_fit.append(m.fit_seconds)
            M, _, _ = interactions_to_csr(inter)
            import implicit.cpu.als  # noqa: F401

            with blas_single_threaded():
                model = make_implicit_model(cfg.cf)
                t0 = time.perf_counter()
                model.fit(M, show_progress=False)
                bare.append(time.perf_counter() - t0)
        med = statistics.median
        print(
            f"ALS fit : ours {med(ours):.2f} s (of which implicit fit {med(ours_fit):.2f} s) | bare implicit "
            f"{med(bare):.2f} s | ratio ours/bare {med(ours) / med(bare):.2f} "
            f"(fit-only {med(ours_fit) / med(bare):.2f}) "
            f"[median of {repeats}; factors={cfg.cf.factors}, iterations={cfg.cf.iterations}]"
        )

        t0 = time.perf_counter()
        rec = Recommender.build(songs, emb, inter, cfg, apex=apex)
        total = time.perf_counter() - t0
        tm = rec.report["timings"]
        print(f"build   : {total:.1f} s total; " + ", ".join(f"{k} {v:.1f}s" for k, v in tm.items()))
        print(
            f"          reranker: {rec.report['n_rerank_rows']} rows, "
            f"best iteration {rec.report['reranker_best_iteration']}, "
            f"val NDCG@10 {rec.report['reranker_val_ndcg']:.3f}; {rec.report['n_warm_songs']} warm / "
            f"{rec.report['n_cold_songs']} cold songs"
        )
        if args.bundle:
            rec.save(args.bundle)
            print(f"bundle  : saved to {args.bundle}")

    users = rec.user_ids
    batch_vs_bare(rec, users if args.batch_users is None else users[: args.batch_users], args.batch_repeats)

    rng = np.random.default_rng(1)
    pick = rng.choice(len(users), size=min(args.latency_users, len(users)), replace=False)
    lat = []
    for i in pick:
        t0 = time.perf_counter()
        rec.recommend(users[i], k=20)
        lat.append((time.perf_counter() - t0) * 1e3)
    print(
        f"single  : recommend(k=20) over {len(lat)} users: p50 {np.percentile(lat, 50):.1f} ms, "
        f"p99 {np.percentile(lat, 99):.1f} ms, mean {np.mean(lat):.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
