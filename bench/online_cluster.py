"""One Redis server against a Redis Cluster, same bundle, same calls:
``python -m bench.online_cluster --cluster redis+cluster://127.0.0.1:7300 [--quick]``.

Measures, on SYNTHETIC data (``bench.online.build_bundle``), for the store at ``--redis`` and
the cluster at ``--cluster``: publish seconds; ``record_many`` of one batch of ``--batch``
events from users drawn uniformly (median, p95 and round trips per batch, counted on the
connections); ``OnlineRanker.rank`` latency (median, p95). Calls alternate between the two
stores (``bench.common.interleaved``). The namespaces are deleted afterwards.

A local cluster for it (3 masters, 3 replicas; what ``tests/integration/test_online_cluster.py``
starts)::

    for p in 7300 7301 7302 7303 7304 7305; do mkdir -p /tmp/c/$p; redis-server --port $p \\
      --cluster-enabled yes --cluster-config-file nodes-$p.conf --dir /tmp/c/$p --save "" \\
      --appendonly no --daemonize yes --logfile /tmp/c/$p/log; done
    redis-cli --cluster create 127.0.0.1:730{0,1,2,3,4,5} --cluster-replicas 1 --cluster-yes

On one machine the cluster's six servers share its cores: this measures the cost of the
cluster path (more round trips, per-slot scripts), not the throughput of a real cluster.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np

from bench.common import interleaved, median, percentile, print_header
from bench.events import _counting


def main(argv: list[str] | None = None) -> int:
    from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, publish
    from apex_rank.ranking.online.engine import RankingEngine
    from apex_rank.ranking.online.events import Interaction, record_many
    from bench.online import build_bundle

    ap = argparse.ArgumentParser(prog="python -m bench.online_cluster", description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default=os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--cluster", required=True, help="redis+cluster://host:port of a running cluster")
    ap.add_argument("--songs", type=int, default=5000)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="2,000 songs, 500 users, 7 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.songs, args.users, args.repeats = 2000, 500, 7
    print_header("bench.online_cluster: one Redis server vs a Redis Cluster (SYNTHETIC data)")
    out = Path(tempfile.mkdtemp(prefix="apexrank-bench-cluster-"))
    build_bundle(args.songs, args.users, out)
    engine = RankingEngine.load(str(out))
    ns = f"benchcl{uuid.uuid4().hex[:8]}"
    stores = {"one server": RedisStore(args.redis, ns, timeout_s=30),
              "cluster": RedisStore(args.cluster, ns, timeout_s=30)}
    cfg = OnlineConfig(namespace=ns, budget_ms=2000.0)
    users = engine.recommender.user_ids
    songs = engine.recommender.songs.song_ids
    rng = np.random.default_rng(0)
    try:
        for name, store in stores.items():
            res = publish(engine, store, config=cfg)
            print(f"publish {name}: {res.n_songs} songs, {res.n_users} users in {res.seconds:.2f} s")

        def batch() -> list[Interaction]:
            return [Interaction(users[int(rng.integers(len(users)))], songs[int(rng.integers(len(songs)))])
                    for _ in range(args.batch)]

        counter, undo = _counting()
        trips: dict[str, list[int]] = {n: [] for n in stores}

        def recorder(name: str):  # noqa: ANN202
            def run() -> None:
                before = counter[0]
                record_many(stores[name], batch(), config=cfg, engine=engine)
                trips[name].append(counter[0] - before)
            return run

        times = interleaved({n: recorder(n) for n in stores}, args.repeats)
        undo()
        for n, xs in times.items():
            print(f"record_many {args.batch} events, {n}: median {1000 * median(xs):.1f} ms, "
                  f"p95 {1000 * percentile(xs, 95):.1f} ms, {args.batch / median(xs):.0f} events/s, "
                  f"round trips per batch {median([float(t) for t in trips[n]]):.0f}")
        rankers = {n: OnlineRanker.connect(args.redis if n == "one server" else args.cluster,
                                           namespace=ns, config=cfg, engine=engine, follow=False)
                   for n in stores}
        picks = iter(rng.integers(len(users), size=10 ** 6))
        lat = interleaved({n: (lambda r=r: r.rank(users[int(next(picks))], k=20)) for n, r in rankers.items()},
                          20 * args.repeats)
        for n, xs in lat.items():
            print(f"rank k=20, {n}: median {1000 * median(xs):.2f} ms, p95 {1000 * percentile(xs, 95):.2f} ms")
        for r in rankers.values():
            r.close()
    finally:
        for store in stores.values():
            keys = list(store.client.scan_iter(match=f"apexrank:{ns}:*", count=2000))
            for k in keys:  # one by one: on a cluster a DEL of several keys must stay in one slot
                store.client.delete(k)
            store.close()
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
