"""Single-user latency of ``Recommender.recommend``: ``python -m bench.latency [--small] [--profile]``.

Builds the ``bench.ranking`` synthetic world once (cached as a bundle under ``--bundle``, reused
by later runs so before/after numbers rank with the same model), then times ``recommend(k)``
for ``--latency-users`` users and optionally prints a cProfile of those calls. Synthetic-data
timing only.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.latency")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="10k songs x 5k users x 200k interactions")
    ap.add_argument("--songs", type=int, default=None)
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--interactions", type=int, default=None)
    ap.add_argument("--bundle", default=None, help="bundle folder (built and saved when missing)")
    ap.add_argument("--latency-users", type=int, default=300)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print the top cProfile entries")
    ap.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    S, U, N = (10_000, 5_000, 200_000) if args.small else (100_000, 50_000, 2_000_000)
    S, U, N = args.songs or S, args.users or U, args.interactions or N
    bundle = Path(args.bundle or f"/tmp/apexrank-bench-latency-{S}-{U}-{N}")

    from apex_rank.threads import configure_threads

    configure_threads(args.threads)
    from apex_rank.ranking.recommender import IndexConfig, Recommender, RecommenderConfig, load_recommender
    from bench.ranking import ivf_factory, machine, make_bench_world

    log.info("machine : %s", machine())
    if not (bundle / "manifest.json").exists():
        from apex_rank.features.apex_tables import build_apex_dataset, train_apex
        from apex_rank.training import TrainConfig

        songs, emb, inter = make_bench_world(S, U, N)
        import polars as pl

        sample = songs.sample(min(5000, S), seed=0)
        data = build_apex_dataset(sample, emb.filter(pl.col("song_id").is_in(sample["song_id"].implode())), seed=0)
        apex, _, _ = train_apex(
            data, TrainConfig(epochs=5, lr=2e-3, batch_size=512, patience=3, device="cpu", progress=False)
        )
        factory = ivf_factory(S)
        cfg = replace(RecommenderConfig(), index=IndexConfig(content_factory=factory, nprobe=32))
        t0 = time.perf_counter()
        Recommender.build(songs, emb, inter, cfg, apex=apex).save(bundle)
        log.info("built and saved %s in %.1f s", bundle, time.perf_counter() - t0)
    rec = load_recommender(bundle, device="cpu")
    users = rec.user_ids
    rng = np.random.default_rng(1)
    pick = [users[i] for i in rng.choice(len(users), size=min(args.latency_users, len(users)), replace=False)]
    for u in pick[:10]:  # warm-up
        rec.recommend(u, k=args.k)
    prof = cProfile.Profile() if args.profile else None
    lat = []
    for u in pick:
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        rec.recommend(u, k=args.k)
        if prof is not None:
            prof.disable()
        lat.append((time.perf_counter() - t0) * 1e3)
    log.info(
        "single  : recommend(k=%d) over %d users (%d songs): p50 %.2f ms, p99 %.2f ms, mean %.2f ms",
        args.k,
        len(lat),
        len(rec.songs),
        np.percentile(lat, 50),
        np.percentile(lat, 99),
        np.mean(lat),
    )
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(args.sort).print_stats(30)
        log.info("%s", s.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
