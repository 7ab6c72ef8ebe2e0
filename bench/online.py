"""Online ranking benchmark against the local Redis: ``python -m bench.online [--small]``.

Builds a synthetic bundle (100k songs / 50k users by default, candidate limits summing to 300),
publishes it under a private namespace, then measures ``rank`` p50/p99 in-process and over HTTP
(``apex-rank serve``, 2 workers, loopback) at concurrency 1, 8 and 32, next to the floor: a bare
pipelined Redis fetch of the same keys (pointer + user hash) at the same concurrency. Ends with
a fixed-rate HTTP load (bounded in time and count) counting errors and sampling server memory.
Every loop is bounded; all traffic goes to 127.0.0.1. The namespace is deleted afterwards.

``--bundle DIR`` keeps the built bundle there and reuses it on later runs (before/after numbers
then rank with the same model); ``--skip-http`` stops after the in-process levels.
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
from pathlib import Path
from typing import Any

from bench.common import percentile, print_header

LEVELS = (1, 8, 32)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_concurrent(fn: Any, users: list[str], concurrency: int, n_total: int,
                    max_s: float) -> tuple[list[float], int]:
    """Run ``fn(user)`` ``n_total`` times over ``concurrency`` threads; latencies and errors."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    per = max(1, n_total // concurrency)
    deadline = time.monotonic() + max_s

    def worker(j: int) -> None:
        mine = []
        for i in range(per):
            if time.monotonic() > deadline:
                break
            u = users[(j * per + i) % len(users)]
            t0 = time.perf_counter()
            try:
                fn(u)
            except Exception:  # noqa: BLE001 - counted
                with lock:
                    errors[0] += 1
                continue
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max_s + 30)
    return lat, errors[0]


def _summ(lat: list[float]) -> dict[str, float]:
    if not lat:
        return {"n": 0}
    return {"n": len(lat), "p50_ms": round(percentile(lat, 50) * 1000, 3),
            "p99_ms": round(percentile(lat, 99) * 1000, 3)}


def _rss_kb(pid: int) -> int:
    """Resident memory of a process and its children (kB)."""
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            pids += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def build_bundle(n_songs: int, n_users: int, out: Path, *, max_train_users: int = 1000) -> dict[str, Any]:
    """Build and save a bundle with 300 candidates per user. The APEX head is a seeded,
    untrained one (its priors only feed features; latency does not depend on their quality).
    ``max_train_users`` caps the users whose candidates train the reranker (``bench.capacity``
    raises it to time training at two sizes)."""
    import torch

    from apex_rank.model import ApexHead
    from apex_rank.predictor import ApexPredictor
    from apex_rank.ranking.candidates import CandidateConfig
    from apex_rank.ranking.cf import CFConfig
    from apex_rank.ranking.recommender import IndexConfig, Recommender, RecommenderConfig
    from apex_rank.ranking.reranker import RerankerConfig
    from bench.ranking import ivf_factory, make_bench_world

    t0 = time.perf_counter()
    songs, embeddings, inter = make_bench_world(n_songs, n_users, 20 * n_users)
    t1 = time.perf_counter()
    torch.manual_seed(0)
    apex = ApexPredictor(ApexHead(input_dim=64), encoder="synthetic", device="cpu")
    cfg = RecommenderConfig(
        candidates=CandidateConfig(als=120, content=80, pseudo_cf=60, fresh=40),  # 300 candidates
        reranker=RerankerConfig(n_estimators=60, early_stopping_rounds=15, max_train_users=max_train_users),
        cf=CFConfig(factors=32, iterations=8),
        # IVF content index as in bench.ranking: an exact scan of 100k vectors per request costs ~4.5 ms
        index=IndexConfig(content_factory=ivf_factory(n_songs), nprobe=32))
    rec = Recommender.build(songs, embeddings, inter, config=cfg, apex=apex)
    t2 = time.perf_counter()
    rec.save(out)
    return {"world_s": round(t1 - t0, 1), "build_s": round(t2 - t1, 1),
            "save_s": round(time.perf_counter() - t2, 1), "interactions": inter.height,
            "timings": {k: round(v, 2) for k, v in rec.report.get("timings", {}).items()},
            "n_rerank_rows": rec.report.get("n_rerank_rows")}

def _http_phase(args: argparse.Namespace, bundle: Path, ns: str, users: list[str],
                table: list[dict[str, Any]], n_req: int, load_s: float) -> dict[str, Any]:
    """``apex-rank serve`` (2 workers, loopback): HTTP latency per level of ``table`` (added to
    its rows), then the fixed-rate load; returns the load summary. Stops the server."""
    port = _free_port()
    env = dict(os.environ, APEX_RANK_THREADS="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "apex_rank.cli.main", "serve", "--bundle", str(bundle), "--redis",
         args.redis, "--namespace", ns, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2", "--budget-ms", "200"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the service did not start within 300 s")
        local = threading.local()

        degraded = [0]

        def http(u: str) -> None:
            cl = getattr(local, "c", None)
            if cl is None:
                cl = local.c = httpx.Client(base_url=base, timeout=10)
            r = cl.get("/recommend", params={"user_id": u, "k": args.k})
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            if r.json()["degraded"]:
                degraded[0] += 1  # an answer, but from the fallback list: reported separately

        for u in users[:20]:
            http(u)
        for row in table:
            degraded[0] = 0
            hl, he = _run_concurrent(http, users, row["concurrency"], n_req, 120)
            row["http"] = {**_summ(hl), "degraded": degraded[0]}
            row["errors"] += he
            if hl and row["floor"].get("n"):
                row["http_ratio_p50"] = round(row["http"]["p50_ms"] / row["floor"]["p50_ms"], 1)
            print(json.dumps({"concurrency": row["concurrency"], "http": row["http"],
                              "errors": he}), flush=True)

        # fixed-rate load: one request every 1/rate s, bounded by load_s and count
        degraded[0] = 0
        n_load = int(args.rate * load_s)
        interval = 1.0 / args.rate
        lat: list[float] = []
        errs = [0]
        mem: list[int] = [_rss_kb(server.pid)]
        lock = threading.Lock()

        def fire(u: str) -> None:
            t0 = time.perf_counter()
            try:
                http(u)
                with lock:
                    lat.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - counted
                with lock:
                    errs[0] += 1

        from concurrent.futures import ThreadPoolExecutor

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            for i in range(n_load):
                target = start + i * interval
                now = time.monotonic()
                if target > now:
                    time.sleep(target - now)
                if now - start > load_s + 5:
                    break
                pool.submit(fire, users[(i * 7919) % len(users)])
                if i % max(1, int(args.rate * 5)) == 0:
                    mem.append(_rss_kb(server.pid))
        mem.append(_rss_kb(server.pid))
        load = {"rate_per_s": args.rate, "degraded": degraded[0],
                          "seconds": round(time.monotonic() - start, 1),
                          "sent": n_load, "ok": len(lat), "errors": errs[0], **_summ(lat),
                          "rss_mb_start": round(mem[1] / 1024, 1) if len(mem) > 1 else None,
                          "rss_mb_end": round(mem[-1] / 1024, 1),
                          "rss_mb_max": round(max(mem) / 1024, 1)}
        print("load:", json.dumps(load), flush=True)
        return load
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--small", action="store_true", help="5k songs / 2k users, short phases")
    p.add_argument("--songs", type=int, default=None)
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--redis", default=os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--requests", type=int, default=None, help="requests per concurrency level")
    p.add_argument("--load-seconds", type=float, default=None)
    p.add_argument("--rate", type=float, default=10.0, help="requests/s of the fixed-rate load")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--out", default="bench/results/online.json")
    p.add_argument("--bundle", default=None,
                   help="bundle folder to reuse (built and saved there when missing)")
    p.add_argument("--skip-http", action="store_true", help="in-process levels only")
    args = p.parse_args(argv)
    n_songs = args.songs or (5000 if args.small else 100_000)
    n_users = args.users or (2000 if args.small else 50_000)
    n_req = args.requests or (100 if args.small else 400)
    load_s = args.load_seconds or (10.0 if args.small else 60.0)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from apex_rank.threads import configure_threads

    configure_threads()
    head = print_header(f"online ranking: {n_songs} songs, {n_users} users, k={args.k}")
    import redis

    from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, publish
    from apex_rank.ranking.online.engine import RankingEngine

    result: dict[str, Any] = {"header": head, "n_songs": n_songs, "n_users": n_users, "k": args.k}
    ns = f"bench{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="apexrank-bench-online-"))
    bundle = Path(args.bundle) if args.bundle else tmp / "bundle"
    client = redis.Redis.from_url(args.redis)
    try:
        if (bundle / "manifest.json").exists():
            result["build"] = {"reused": str(bundle)}
        else:
            result["build"] = build_bundle(n_songs, n_users, bundle)
        print("build:", result["build"], flush=True)
        configure_threads(1)  # serving: parallelism comes from requests (recorded in the result)
        result["serving_threads"] = 1
        engine = RankingEngine.load(bundle)
        cfg = OnlineConfig(namespace=ns, budget_ms=200.0)
        res = publish(engine, RedisStore(args.redis, ns, timeout_s=30), config=cfg)
        result["publish_s"] = round(res.seconds, 2)
        print(f"publish: version {res.version}, {res.n_songs} songs + {res.n_users} users in "
              f"{res.seconds:.2f} s", flush=True)
        ranker = OnlineRanker.connect(args.redis, namespace=ns, config=cfg, engine=engine)
        users = engine.recommender.user_ids
        from apex_rank.ranking.candidates import generate_candidates

        st = engine.recommender.user_state(users[0])
        n_c = generate_candidates([st], engine.recommender.sources, engine.recommender.config.candidates,
                                  min_per_source=args.k).height
        result["candidates_example_user"] = n_c
        keys = ranker.store.keys
        ver = ranker.version

        def floor(u: str) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.get(keys.current)
            pipe.hgetall(keys.user(ver, u))  # type: ignore[arg-type]
            pipe.execute()

        def inproc(u: str) -> None:
            r = ranker.rank(u, args.k)
            if r.degraded or len(r.items) != args.k:
                raise RuntimeError("degraded or short answer")

        for u in users[:20]:  # warm-up
            inproc(u)
        table: list[dict[str, Any]] = []
        for c in LEVELS:
            t0 = time.perf_counter()
            fl, fe = _run_concurrent(floor, users, c, n_req, 60)
            t1 = time.perf_counter()
            ip, ie = _run_concurrent(inproc, users, c, n_req, 90)
            t2 = time.perf_counter()
            # throughput: answers per second of wall time while c threads kept one request each in flight
            row = {"concurrency": c, "floor": {**_summ(fl), "per_s": round(len(fl) / (t1 - t0), 1)},
                   "in_process": {**_summ(ip), "per_s": round(len(ip) / (t2 - t1), 1)},
                   "errors": fe + ie}
            if fl and ip:
                row["ratio_p50"] = round(percentile(ip, 50) / percentile(fl, 50), 1)
                row["ratio_p99"] = round(percentile(ip, 99) / percentile(fl, 99), 1)
            table.append(row)
            print(json.dumps(row), flush=True)
        ranker.close()
        result["levels"] = table
        if not args.skip_http:
            result["load"] = _http_phase(args, bundle, ns, users, table, n_req, load_s)
    finally:
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
