"""Warm-up benchmark against the local Redis: ``python -m bench.warmup [--small]``.

Delay: the service is ``apex-rank serve`` (2 workers, loopback; each follower wakes every
``follow_interval_s``, 0.5 s) and the consumer ``apex-rank warm-up`` (its own process). Per
repeat, a target user and the 20 users nearest to it in CF taste are picked, and a cold song
absent from the target's whole ranked list (``k = 500``: every candidate of every source); one
``POST /events`` records the 20 plays, then ``/recommend`` for the target is polled every
20 ms until the song is in that list through the ``als`` source. The delay is from just before
the POST to that answer; median and p99 over ``--repeats``. Without warm-up the song stays
out of the list until a retrain: its rank after is printed per repeat, and how many landed in
the top 20.

Load (``--load-seconds``, 60 by default): ``/recommend`` at a fixed ``--rate`` mixed with
``/events`` batches (``--event-batches`` per second of ``--batch-size`` events: plays of cold
songs by bundle users and of bundle songs by new users) while the consumer runs; reports
errors (non-200 answers and exceptions), warmed songs and users, and the resident memory of the
service (workers included) and of the consumer at start and end.

Every loop is bounded, all traffic goes to 127.0.0.1, and the namespace is deleted afterwards.
Numbers on shared cores are noisy: read medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from apex_rank.ranking.online.keys import Keys
from bench.common import median, percentile, print_header
from bench.online import _free_port, _rss_kb, build_bundle


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "apex_rank.cli.main", *cmd], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _taste_cluster(U: np.ndarray, anchor: int, n: int) -> list[int]:
    N = U / np.maximum(np.linalg.norm(U, axis=1, keepdims=True), 1e-12)
    return np.argsort(-(N @ N[anchor]), kind="stable")[:n].tolist()


def measure_delay(http: Any, users: list[str], U: np.ndarray, cold: list[str], repeats: int,
                  timeout_s: float = 30.0, k: int = 500) -> dict[str, Any]:
    """The delay per repeat (see the module doc); rows with the rank before and after."""
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    for r in range(repeats):
        anchor = (r * 37) % len(users)
        cluster = [users[i] for i in _taste_cluster(U, anchor, 21)]
        target, listeners = cluster[0], cluster[1:]
        top = [i["song_id"] for i in http.get("/recommend", params={"user_id": target, "k": k}).json()["items"]]
        song = next(s for s in cold if s not in used and s not in top)
        used.add(song)
        t0 = time.perf_counter()
        res = http.post("/events", json={"events": [{"user_id": u, "song_id": song} for u in listeners]})
        if res.status_code != 200:
            raise RuntimeError(f"POST /events answered {res.status_code}: {res.text[:200]}")
        delay, rank = None, None
        while time.perf_counter() - t0 < timeout_s:
            items = http.get("/recommend", params={"user_id": target, "k": k}).json()["items"]
            hit = [(j + 1, i["source"]) for j, i in enumerate(items) if i["song_id"] == song]
            if hit and hit[0][1] == "als":
                delay, rank = time.perf_counter() - t0, hit[0][0]
                break
            time.sleep(0.02)
        rows.append({"target": target, "song": song, "rank_before": f"not among {len(top)} ranked", "rank_after": rank,
                     "delay_s": None if delay is None else round(delay, 3)})
        print(json.dumps(rows[-1]), flush=True)
    d = [x["delay_s"] for x in rows if x["delay_s"] is not None]
    return {"repeats": repeats, "arrived": len(d), "timeouts": repeats - len(d),
            "in_top_20_after": sum(x["rank_after"] is not None and x["rank_after"] <= 20 for x in rows),
            "rank_after_median": median([x["rank_after"] for x in rows if x["rank_after"] is not None]) if d else None,
            "delay_median_s": round(median(d), 3) if d else None,
            "delay_p99_s": round(percentile(d, 99), 3) if d else None,
            "delay_max_s": round(max(d), 3) if d else None, "rows": rows}


def load_phase(base: str, users: list[str], songs: list[str], cold: list[str], pids: dict[str, int],
               *, seconds: float, rate: float, event_batches: float, batch_size: int) -> dict[str, Any]:
    """Fixed-rate /recommend plus batched /events for ``seconds`` (see the module doc)."""
    import httpx

    local = threading.local()
    lock = threading.Lock()
    counts = {"recommend_ok": 0, "events_ok": 0, "errors": 0, "events_sent": 0}
    first_errors: list[str] = []
    rng = np.random.default_rng(0)

    def client() -> httpx.Client:
        if getattr(local, "c", None) is None:
            local.c = httpx.Client(base_url=base, timeout=10)
        return local.c  # type: ignore[no-any-return]

    def call(kind: str, payload: Any) -> None:
        try:
            if kind == "recommend":
                r = client().get("/recommend", params={"user_id": payload, "k": 20})
            else:
                r = client().post("/events", json={"events": payload})
            ok = r.status_code == 200
            why = f"{kind} HTTP {r.status_code}: {r.text[:120]}"
        except Exception as err:  # noqa: BLE001 - counted
            ok, why = False, f"{kind} {type(err).__name__}: {err}"
        with lock:
            if ok:
                counts[f"{kind}_ok"] += 1
            else:
                counts["errors"] += 1
                if len(first_errors) < 5:
                    first_errors.append(why)

    def events(i: int) -> list[dict[str, str]]:
        out = []
        for j in range(batch_size):
            if j % 2:  # a bundle user plays a cold song: warms that song
                out.append({"user_id": users[int(rng.integers(len(users)))],
                            "song_id": cold[int(rng.integers(len(cold)))]})
            else:  # a new user plays a bundle song: gets a factor
                out.append({"user_id": f"load-user-{i % 200}-{j % 10}",
                            "song_id": songs[int(rng.integers(len(songs)))]})
        return out

    mem: dict[str, list[int]] = {name: [_rss_kb(pid)] for name, pid in pids.items()}
    start = time.monotonic()
    next_sample = start + 5
    n_rec = int(rate * seconds)
    every = max(1, int(round(rate / event_batches)))
    with ThreadPoolExecutor(max_workers=16) as pool:
        for i in range(n_rec):
            target = start + i / rate
            now = time.monotonic()
            if target > now:
                time.sleep(target - now)
            if now - start > seconds + 5:
                break
            pool.submit(call, "recommend", users[(i * 7919) % len(users)])
            if i % every == 0:
                payload = events(i // every)
                counts["events_sent"] += len(payload)
                pool.submit(call, "events", payload)
            if now >= next_sample:
                for name, pid in pids.items():
                    mem[name].append(_rss_kb(pid))
                next_sample += 5
    for name, pid in pids.items():
        mem[name].append(_rss_kb(pid))
    out: dict[str, Any] = {"seconds": round(time.monotonic() - start, 1), "rate_per_s": rate,
                           "event_batches_per_s": event_batches, "batch_size": batch_size,
                           **counts, "first_errors": first_errors}
    for name, xs in mem.items():
        out[f"{name}_rss_mb_start"] = round(xs[0] / 1024, 1)
        out[f"{name}_rss_mb_end"] = round(xs[-1] / 1024, 1)
        out[f"{name}_rss_mb_max"] = round(max(xs) / 1024, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--small", action="store_true", help="2k songs / 1k users, 5 repeats, 20 s load")
    p.add_argument("--songs", type=int, default=None)
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--redis", default=os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--load-seconds", type=float, default=None)
    p.add_argument("--rate", type=float, default=20.0, help="/recommend requests per second")
    p.add_argument("--event-batches", type=float, default=2.0, help="/events requests per second")
    p.add_argument("--batch-size", type=int, default=50, help="events per /events request")
    p.add_argument("--bundle", default=None, help="bundle folder to reuse (built there when missing)")
    p.add_argument("--out", default="bench/results/warmup.json")
    args = p.parse_args(argv)
    n_songs = args.songs or (2000 if args.small else 5000)
    n_users = args.users or (1000 if args.small else 2000)
    repeats = args.repeats or (5 if args.small else 20)
    load_s = args.load_seconds or (20.0 if args.small else 60.0)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from apex_rank.threads import configure_threads

    configure_threads()
    head = print_header(f"warm-up: {n_songs} songs, {n_users} users, {repeats} repeats, {load_s:.0f} s load")
    import httpx
    import redis

    from apex_rank.ranking.cf import CFModel
    from apex_rank.ranking.online import OnlineConfig, RedisStore, publish
    from apex_rank.ranking.online.engine import RankingEngine

    result: dict[str, Any] = {"header": head, "n_songs": n_songs, "n_users": n_users}
    ns = f"benchwarm{os.getpid()}"
    bundle = Path(args.bundle) if args.bundle else Path(tempfile.mkdtemp(prefix="apexrank-bench-warm-")) / "b"
    client = redis.Redis.from_url(args.redis)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if (bundle / "manifest.json").exists():
            result["build"] = {"reused": str(bundle)}
        else:
            result["build"] = build_bundle(n_songs, n_users, bundle)
        print("build:", result["build"], flush=True)
        engine = RankingEngine.load(bundle)
        res = publish(engine, RedisStore(args.redis, ns, timeout_s=30), config=OnlineConfig(namespace=ns))
        print(f"publish: version {res.version} in {res.seconds:.1f} s", flush=True)
        t = engine.recommender.songs
        cold = [s for i, s in enumerate(t.song_ids) if not t.warm[i]]
        cf: CFModel = engine.recommender.cf
        users, songs, U = list(cf.user_ids), list(cf.song_ids), cf.user_factors
        del engine
        env = dict(os.environ, APEX_RANK_THREADS="1")
        port = _free_port()
        server = _start(["serve", "--bundle", str(bundle), "--redis", args.redis, "--namespace", ns,
                         "--port", str(port), "--workers", "2", "--budget-ms", "200"], env)
        consumer = _start(["warm-up", "--bundle", str(bundle), "--redis", args.redis, "--namespace", ns], env)
        procs += [server, consumer]
        base = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=base, timeout=10)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the service did not start within 300 s")
        for u in users[:20]:
            http.get("/recommend", params={"user_id": u, "k": 500})
        result["delay"] = measure_delay(http, users, U, cold, repeats)
        summary = {k: v for k, v in result["delay"].items() if k != "rows"}
        print("delay:", json.dumps(summary), flush=True)
        result["load"] = load_phase(base, users, songs, cold, {"service": server.pid, "consumer": consumer.pid},
                                    seconds=load_s, rate=args.rate, event_batches=args.event_batches,
                                    batch_size=args.batch_size)
        result["load"]["warmed_songs"] = int(client.hlen(Keys(ns).warm(res.version)))
        print("load:", json.dumps(result["load"]), flush=True)
    finally:
        for proc in procs:
            _stop(proc)
        batch = list(client.scan_iter(match=f"apexrank:{ns}:*", count=5000))
        for i in range(0, len(batch), 5000):
            client.delete(*batch[i : i + 5000])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
