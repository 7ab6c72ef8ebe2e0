"""Event-recording benchmark against the local Redis: ``python -m bench.events [--quick]``.

Events/s of ONE worker (one thread, one connection pool) for batches of ``--batch`` (500)
events, on SYNTHETIC data: ``--songs`` songs with ``--dim``-d embeddings published under a
private namespace, events from ``--users`` users drawn uniformly. Each timed call records one
fresh batch:

- **record_many**: the path ``POST /events`` takes (every event checked, the pointer and the
  batch's songs read, then one optimistic transaction: WATCH, one read of the pointer and the
  users, the profile updates in Python, MULTI/EXEC of the user writes and the XADDs);
- **record_many, in-process store**: the same checks and updates without Redis (the Python
  share of the cost);
- **bare pipeline** and **bare MULTI/EXEC**: redis-py writing the same commands (DEL, HSET,
  EXPIRE per user with payloads of the stored size, XADD per event) with nothing read or
  computed, without and with a transaction: the floor for these writes;
- **one record() per event**: the loop ``POST /events`` ran before issue 14, through today's
  one-event path (five round trips per event; the old path took six).

Round trips per batch are counted on the connection (``send_packed_command`` calls), not
inferred from times. Medians over interleaved repeats (every method once per round, order
rotated); the ratio is against the bare pipeline measured in the same run. The namespace is
deleted afterwards. About a minute with the defaults, ~20 s with ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import interleaved, median, percentile, print_header


def _counting() -> tuple[list[int], Callable[[], None]]:
    """Count ``send_packed_command`` calls (one per round trip) of every redis-py connection;
    returns the counter and a function that removes the hook."""
    import redis.connection

    real = redis.connection.AbstractConnection.send_packed_command
    n = [0]

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        n[0] += 1
        return real(self, *args, **kwargs)

    redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]

    def undo() -> None:
        redis.connection.AbstractConnection.send_packed_command = real  # type: ignore[method-assign]

    return n, undo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default=os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--batch", type=int, default=500, help="events per request")
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--songs", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=64, help="embedding width")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 25, quick 8)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    import redis

    from apex_rank.ranking.online import (
        InProcessStore,
        Interaction,
        OnlineConfig,
        RedisStore,
        record,
        record_many,
    )
    from apex_rank.ranking.online.keys import encode_song_record

    repeats = args.repeats or (8 if args.quick else 25)
    print_header("bench.events: batched event recording vs a bare Redis pipeline (SYNTHETIC data)")
    ns = f"bench-events-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(args.redis)
    info = client.info("server")
    print(f"redis {info['redis_version']} at {args.redis.rpartition('@')[2]}; namespace {ns}; "
          f"batch {args.batch}, {args.users} users, {args.songs} songs, d = {args.dim}; "
          f"{repeats} interleaved repeats; load average at start {os.getloadavg()[0]:.2f}")

    rng = np.random.default_rng(0)
    songs = [f"s{i:06d}" for i in range(args.songs)]
    emb = rng.normal(size=(args.songs, args.dim)).astype(np.float32)
    recs = [encode_song_record(np.zeros(7), 0, 0, True)] * args.songs
    cfg = OnlineConfig(namespace=ns)
    store = RedisStore(args.redis, ns, timeout_s=30.0)
    mem = InProcessStore(ns)
    kinds = ["play", "play", "play", "like", "skip"]
    now = time.time()

    def batch() -> list[Interaction]:
        u = rng.integers(args.users, size=args.batch)
        s = rng.integers(args.songs, size=args.batch)
        k = rng.integers(len(kinds), size=args.batch)
        return [Interaction(f"u{a:06d}", songs[b], kinds[c], now - 60.0)
                for a, b, c in zip(u.tolist(), s.tolist(), k.tolist(), strict=True)]

    try:
        for st in (store, mem):
            v = st.next_version()
            for i in range(0, args.songs, 2000):
                st.write_songs(v, songs[i : i + 2000], recs[i : i + 2000], emb[i : i + 2000], 3600)
            st.write_meta(v, {"version": v}, 3600)
            st.commit(v, st.current_version())
            record_many(st, batch(), config=cfg)  # every user of the timed batches exists (mostly)
            for _ in range(max(1, args.users // args.batch)):
                record_many(st, batch(), config=cfg)

        # payloads of the stored size for the bare writes: real user hashes and stream fields
        sample = batch()
        users = list(dict.fromkeys(e.user_id for e in sample))
        pipe = client.pipeline(transaction=False)
        for u in users:
            pipe.hgetall(store.keys.user(v, u))
        payload = [h or {b"n": b"1.0"} for h in pipe.execute()]
        fields: list[dict[Any, Any]] = [
            {"u": e.user_id, "s": e.song_id, "k": e.kind, "t": repr(e.ts), "w": "1.0"} for e in sample]
        bare_events = f"{store.keys.root}:bare:events"

        def bare(transaction: bool) -> Callable[[], None]:
            def run() -> None:
                p = client.pipeline(transaction=transaction)
                for u, h in zip(users, payload, strict=True):
                    key = f"{store.keys.root}:bare:u:{u}"
                    p.delete(key)
                    p.hset(key, mapping=h)
                    p.expire(key, 3600)
                for f in fields:
                    p.xadd(bare_events, f, maxlen=cfg.events_maxlen, approximate=True)
                p.execute()
            return run

        def one_by_one() -> None:
            for e in batch():
                record(store, *e, config=cfg)

        methods: dict[str, Callable[[], None]] = {
            "record_many (redis)": lambda: record_many(store, batch(), config=cfg),
            "record_many (in-process store)": lambda: record_many(mem, batch(), config=cfg),
            "bare pipeline": bare(False),
            "bare MULTI/EXEC": bare(True),
            "one record() per event": one_by_one,
        }
        trips: dict[str, int] = {}
        count, undo = _counting()
        try:
            for name, fn in methods.items():
                fn()  # connections open
                count[0] = 0
                fn()
                trips[name] = count[0]
        finally:
            undo()
        times = interleaved(methods, repeats)
        base = median(times["bare pipeline"])
        for name, xs in times.items():
            med = median(xs)
            print(json.dumps({
                "method": name, "events_per_s": round(args.batch / med),
                "batch_ms_p50": round(1000 * med, 2), "batch_ms_p90": round(1000 * percentile(xs, 90), 2),
                "round_trips_per_batch": trips[name] if "in-process" not in name else 0,
                "time_vs_bare_pipeline": round(med / base, 2)}))
    finally:
        keys = list(client.scan_iter(match=f"apexrank:{ns}:*", count=2000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
        store.close()
    print(f"load average at end: {os.getloadavg()[0]:.2f} (2-core machine shared with other work: "
          "compare ratios within this run, not absolute numbers across runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
