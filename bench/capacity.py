"""Capacity-model inputs at two sizes: ``python -m bench.capacity [--sizes 5000:2000,20000:8000]``.

For each size (songs:users) it builds a ``bench.online`` bundle (300 candidates per request;
the reranker trained on every user's candidates, so its training time grows with the data),
publishes it to Redis under a private namespace and measures:

- **reranker training**: the build's ``rerank_frame`` and ``reranker_fit`` seconds and the
  training rows, so seconds per million rows;
- **Redis memory**: ``MEMORY USAGE`` of every key of the published version, split into the
  song keys (``songs``, ``emb`` hashes) and the user hashes: bytes per song and per user;
- **ranker throughput**: ``OnlineRanker.rank`` (k = 20) one request at a time with one thread
  (a serving process per core), rankings/s over ``--requests`` users after a warm-up;

then the **MERT-95M-shaped encoder** on the CPU (a random HuBERT with MERT's shape through the
real encoder path, as ``bench.embed --mert-shaped``): seconds per 30-s segment for 1 and 2
segments. No GPU on this machine: the GPU figure in ``docs/scale.md`` is an assumption, stated
there, not a measurement.

Each figure of the first size predicts the second under the model's assumption (linear in songs,
users, rows; throughput independent of catalogue size), printed as predicted vs measured.
SYNTHETIC data; the machine is shared with other sessions, so times are noisy.
"""

from __future__ import annotations

from apex_rank.threads import prefer_passive_openmp

prefer_passive_openmp()

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import median, print_header  # noqa: E402


def redis_bytes(client: Any, prefix: str) -> dict[str, int]:
    """``MEMORY USAGE`` summed per key class under ``prefix`` (one published version)."""
    out = {"songs": 0, "users": 0, "other": 0, "n_users": 0}
    for key in client.scan_iter(match=f"{prefix}*", count=5000):
        name = key.decode()[len(prefix):]
        size = int(client.memory_usage(key, samples=0) or 0)
        if name.startswith("u:"):
            out["users"] += size
            out["n_users"] += 1
        elif name in ("songs", "emb"):
            out["songs"] += size
        else:
            out["other"] += size
    return out


def measure(n_songs: int, n_users: int, redis_url: str, requests: int, tmp: Path) -> dict[str, Any]:
    import redis

    from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, publish
    from apex_rank.ranking.online.engine import RankingEngine
    from apex_rank.threads import configure_threads
    from bench.online import build_bundle

    configure_threads()
    bundle = tmp / f"b{n_songs}"
    build = build_bundle(n_songs, n_users, bundle, max_train_users=n_users)
    configure_threads(1)
    engine = RankingEngine.load(bundle)
    ns = f"cap{os.getpid()}x{n_songs}"
    cfg = OnlineConfig(namespace=ns, budget_ms=500.0)
    client = redis.Redis.from_url(redis_url)
    try:
        res = publish(engine, RedisStore(redis_url, ns, timeout_s=30), config=cfg)
        mem = redis_bytes(client, f"apexrank:{ns}:v{res.version}:")
        ranker = OnlineRanker.connect(redis_url, namespace=ns, config=cfg, engine=engine)
        users = engine.recommender.user_ids
        for u in users[:20]:
            ranker.rank(u, 20)
        lat = []
        for i in range(requests):
            t0 = time.perf_counter()
            ranker.rank(users[(i * 7919) % len(users)], 20)
            lat.append(time.perf_counter() - t0)
        ranker.close()
    finally:
        keys = list(client.scan_iter(match=f"apexrank:{ns}:*", count=5000))
        for i in range(0, len(keys), 5000):
            client.delete(*keys[i:i + 5000])
    t = build["timings"]
    return {"songs": n_songs, "users": mem["n_users"], "rows": build["n_rerank_rows"],
            "train_s": t.get("rerank_frame", 0.0) + t.get("reranker_fit", 0.0), "fit_s": t.get("reranker_fit", 0.0),
            "song_bytes": mem["songs"], "user_bytes": mem["users"], "other_bytes": mem["other"],
            "rank_ms": median(lat) * 1e3, "rank_per_s": len(lat) / sum(lat)}


def mert_cpu(segments: list[int]) -> dict[int, float]:
    """Seconds per 30-s segment of the MERT-95M-shaped encoder on the CPU, batch 1."""
    import torch
    from transformers import HubertConfig, HubertModel

    from apex_rank.features.encoders import MertConfig, MertEncoder

    cfg = HubertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    torch.manual_seed(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        HubertModel(cfg).save_pretrained(tmp)
        enc = MertEncoder(MertConfig(model=tmp, device="cpu", batch_size=1))
        x = torch.randn(1, 30 * 24_000) * 0.1
        enc.embed(x)  # warm-up
        for n in segments:
            t0 = time.perf_counter()
            for _ in range(n):
                enc.embed(x)
            out[n] = (time.perf_counter() - t0) / n
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000:2000,20000:8000", help="songs:users pairs, comma separated")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--redis", default=os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--skip-mert", action="store_true")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    print_header("bench.capacity: capacity-model inputs at two sizes (SYNTHETIC data)")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="apexrank-capacity-"))
    rows = []
    for pair in args.sizes.split(","):
        s, u = (int(x) for x in pair.split(":"))
        r = measure(s, u, args.redis, args.requests, tmp)
        rows.append(r)
        print(f"{r['songs']:,} songs, {r['users']:,} users: reranker {r['rows']:,} rows, "
              f"frame + fit {r['train_s']:.1f} s "
              f"(fit {r['fit_s']:.1f} s) = {r['train_s'] / r['rows'] * 1e6:.0f} s per million rows | Redis: songs "
              f"{r['song_bytes'] / r['songs']:.0f} B/song, users {r['user_bytes'] / r['users']:.0f} B/user, other "
              f"{r['other_bytes']} B | rank p50 {r['rank_ms']:.2f} ms, {r['rank_per_s']:.0f}/s per process "
              "(1 thread, one request at a time)", flush=True)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        checks = [
            ("reranker frame + fit s (linear in rows)", a["train_s"] / a["rows"] * b["rows"], b["train_s"]),
            ("Redis song bytes (linear in songs)", a["song_bytes"] / a["songs"] * b["songs"], b["song_bytes"]),
            ("Redis user bytes (linear in users)", a["user_bytes"] / a["users"] * b["users"], b["user_bytes"]),
            ("rankings/s per process (size-independent)", a["rank_per_s"], b["rank_per_s"]),
        ]
        print(f"\nmodel from {a['songs']:,} songs predicts {b['songs']:,} songs:")
        for name, pred, got in checks:
            print(f"  {name:44s} predicted {pred:14,.1f}  measured {got:14,.1f}  measured/predicted {got / pred:.2f}")
    if not args.skip_mert:
        m = mert_cpu([1, 3])
        print(f"\nMERT-95M-shaped encoder, CPU, batch 1: {m[1]:.2f} s per 30-s segment (1 segment), "
              f"{m[3]:.2f} s (3 segments): measured/predicted {m[3] / m[1]:.2f}")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (2-core machine shared with other sessions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
