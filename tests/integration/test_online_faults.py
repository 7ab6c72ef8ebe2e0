"""Faults with real Redis: atomic swap under concurrent readers, a publish killed halfway, two
publishers racing, Redis down (degraded answers, never an exception) and restarted (events
recorded before the restart survive, via the test's own append-only redis-server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from apex_rank.errors import StoreError
from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, publish, record
from apex_rank.ranking.online.engine import RankingEngine

from .online_support import OwnRedis, bundle_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engines() -> tuple[RankingEngine, RankingEngine]:
    return RankingEngine.load(bundle_dir(7)), RankingEngine.load(bundle_dir(8))


def _ids(engine: RankingEngine, store: RedisStore, version: int, user: str) -> list[str]:
    _, rec = store.read_user(version, user)
    return [s for s, _, _ in engine.rank_user(user, rec, 10, ())]


def test_atomic_swap_with_concurrent_readers(engines: tuple[RankingEngine, RankingEngine],
                                             redis_url: str, redis_prefix: str) -> None:
    e1, e2 = engines
    cfg = OnlineConfig(namespace=redis_prefix, batch_size=100, follow_interval_s=0.05)
    store = RedisStore(redis_url, redis_prefix)
    v1 = publish(e1, store, config=cfg).version
    users = e1.recommender.user_ids[:20]
    assert users == e2.recommender.user_ids[:20]  # same synthetic user ids, different bundles
    expected = {str(v1): {u: _ids(e1, store, v1, u) for u in users}}
    ranker = OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=e1)
    seen: list[tuple[str, str, list[str]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(offset: int) -> None:
        i = offset
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            u = users[i % len(users)]
            i += 1
            try:
                r = ranker.rank(u, k=10)
                seen.append((r.model_version, u, [it.song_id for it in r.items]))
            except BaseException as err:  # noqa: BLE001 - recorded and asserted below
                errors.append(err)

    threads = [threading.Thread(target=reader, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        v2 = publish(e2, store, config=cfg).version  # while the readers run
        expected[str(v2)] = {u: _ids(e2, store, v2, u) for u in users}
        deadline = time.monotonic() + 15
        while ranker.version != v2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        ranker.close()
    assert not errors, errors[:3]
    versions = {v for v, _, _ in seen}
    assert versions == {str(v1), str(v2)}, versions  # both served, nothing else
    assert any(expected[str(v1)][u] != expected[str(v2)][u] for u in users)
    for v, u, ids in seen:  # every answer is exactly its version's answer: no mixing
        assert ids == expected[v][u], (v, u)


def test_publish_killed_halfway_keeps_old_version_and_rerun_completes(
        engines: tuple[RankingEngine, RankingEngine], redis_url: str, redis_prefix: str) -> None:
    e1, _ = engines
    store = RedisStore(redis_url, redis_prefix)
    cfg = OnlineConfig(namespace=redis_prefix)
    v1 = publish(e1, store, config=cfg).version
    cmd = [sys.executable, "-m", "apex_rank.cli.main", "publish", "--bundle", bundle_dir(8),
           "--redis", redis_url, "--namespace", redis_prefix, "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        staged = v1 + 1
        # wait until the child has written part of its version, then kill it hard
        while time.monotonic() < deadline and proc.poll() is None:
            n_users = sum(1 for _ in store.client.scan_iter(match=store.keys.version_prefix(staged) + "u:*",
                                                             count=1000))
            if n_users >= 3:  # batches of 1 user: the rest of the publish is hundreds of round trips away
                break
            time.sleep(0.01)
        assert proc.poll() is None, "publish finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert store.current_version() == v1  # readers keep the old version
    assert store.read_meta(staged) is None  # the half-written one never got a manifest
    ttl = store.client.ttl(store.keys.songs(staged))
    assert 0 < ttl <= cfg.staging_ttl_s  # and expires on its own
    with OnlineRanker(store, config=cfg, engine=e1) as ranker:
        assert ranker.rank(e1.recommender.user_ids[0], k=5).model_version == str(v1)
    _, e2 = engines
    rerun = publish(e2, store, config=cfg)  # the re-run completes
    assert rerun.previous == v1 and store.current_version() == rerun.version > staged


def test_two_racing_publishers_one_wins_cleanly(engines: tuple[RankingEngine, RankingEngine],
                                                redis_url: str, redis_prefix: str) -> None:
    e1, e2 = engines
    store = RedisStore(redis_url, redis_prefix)
    cfg = OnlineConfig(namespace=redis_prefix, batch_size=200)
    v0 = publish(e1, store, config=cfg).version
    barrier = threading.Barrier(2, timeout=30)
    results: dict[str, object] = {}

    def run(name: str, engine: RankingEngine) -> None:
        first = [True]

        def on_batch(done: int, total: int) -> None:
            if first[0]:  # both have read the same pointer before either commits
                first[0] = False
                barrier.wait()

        try:
            results[name] = publish(engine, RedisStore(redis_url, redis_prefix), config=cfg,
                                    on_batch=on_batch)
        except StoreError as err:
            results[name] = err

    threads = [threading.Thread(target=run, args=(n, e)) for n, e in (("a", e1), ("b", e2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wins = [r for r in results.values() if not isinstance(r, StoreError)]
    losses = [r for r in results.values() if isinstance(r, StoreError)]
    assert len(wins) == 1 and len(losses) == 1, results
    assert "lost a race" in str(losses[0])
    winner = wins[0]
    assert store.current_version() == winner.version and winner.previous == v0  # type: ignore[attr-defined]
    meta = store.read_meta(winner.version)  # type: ignore[attr-defined]
    assert meta is not None and meta["n_songs"] == winner.n_songs  # type: ignore[attr-defined]


def test_redis_down_then_restarted_degrades_recovers_and_keeps_events(
        engines: tuple[RankingEngine, RankingEngine], tmp_path: Path) -> None:
    e1, _ = engines
    own = OwnRedis(tmp_path / "redis").start()
    try:
        cfg = OnlineConfig(namespace="faults", budget_ms=50, retry_s=0.2)
        store = RedisStore(own.url, "faults")
        v = publish(e1, store, config=cfg).version
        ranker = OnlineRanker.connect(own.url, config=cfg, engine=e1, follow=False)
        u = e1.recommender.user_ids[1]
        songs = e1.recommender.songs.song_ids
        ids = [record(store, u, songs[i], "play", 1_700_000_000 + i, config=cfg).event_id
               for i in range(5)]
        record(store, "created-by-event", songs[9], "like", config=cfg)
        normal = ranker.rank(u, k=10)
        assert not normal.degraded

        # Redis slow beyond the budget: a degraded answer within about the budget, no exception
        import redis

        sleeper = threading.Thread(
            target=lambda: redis.Redis.from_url(own.url).execute_command("DEBUG", "SLEEP", "0.6"))
        sleeper.start()
        time.sleep(0.1)
        t0 = time.perf_counter()
        slow = ranker.rank(u, k=10)
        assert slow.degraded and time.perf_counter() - t0 < 0.5
        sleeper.join(timeout=5)
        time.sleep(cfg.retry_s + 0.05)
        assert not ranker.rank(u, k=10).degraded  # recovered

        own.stop()  # Redis gone: answers keep coming, degraded, within budget
        t0 = time.perf_counter()
        down = [ranker.rank(u, k=10) for _ in range(20)]
        assert all(r.degraded for r in down) and len(down[0].items) == 10
        assert time.perf_counter() - t0 < 2.0
        assert ranker.rank("unknown-user", k=3).degraded

        own.start()  # same folder: the append-only file brings everything back
        time.sleep(cfg.retry_s + 0.05)
        back = ranker.rank(u, k=10)
        assert not back.degraded and back.model_version == str(v)
        assert [i.song_id for i in back.items] == [i.song_id for i in normal.items]
        got = [e.event_id for batch in RedisStore(own.url, "faults").read_events(0) for e in batch]
        assert got[:5] == ids and len(got) == 6
        assert RedisStore(own.url, "faults").read_user(v, "created-by-event")[1] is not None
        ranker.close()
    finally:
        own.stop()


def test_password_protected_redis(engines: tuple[RankingEngine, RankingEngine], tmp_path: Path) -> None:
    e1, _ = engines
    own = OwnRedis(tmp_path / "redis-auth", password="s3cret-pw").start()
    try:
        store = RedisStore(own.url, "auth")
        v = publish(e1, store, config=OnlineConfig(namespace="auth")).version
        with OnlineRanker.connect(own.url, namespace="auth", engine=e1, follow=False) as ranker:
            r = ranker.rank(e1.recommender.user_ids[0], k=5)
            assert not r.degraded and r.model_version == str(v)
        wrong = RedisStore(own.url.replace("s3cret-pw", "wrong-pw"), "auth")
        with pytest.raises(StoreError) as info:
            wrong.current_version()
        assert "s3cret" not in str(info.value) and "wrong-pw" not in str(info.value)
    finally:
        own.stop()


def test_loaded_versions_are_frozen_out_of_gc_and_a_replaced_one_is_freed(
        engines: tuple[RankingEngine, RankingEngine], redis_url: str, redis_prefix: str) -> None:
    """freeze_gc: after a load the bundle sits in the GC's permanent generation (a full
    collection no longer walks it during requests); after a switch the replaced engine is
    released, not kept alive by the freeze."""
    import gc
    import weakref

    from apex_rank.ranking.online.ranker import engine_loader

    e1, e2 = engines
    cfg = OnlineConfig(namespace=redis_prefix, batch_size=500)
    store = RedisStore(redis_url, redis_prefix)
    publish(e1, store, config=cfg)
    loaded: list[weakref.ref[RankingEngine]] = []
    base = engine_loader(cfg.fallback_size)

    def loader(folder: str) -> RankingEngine:
        eng = base(folder)
        loaded.append(weakref.ref(eng))
        return eng

    gc.unfreeze()
    try:
        plain = OnlineRanker(RedisStore(redis_url, redis_prefix), loader=loader,
                             config=OnlineConfig(namespace=redis_prefix, freeze_gc=False))
        assert gc.get_freeze_count() == 0
        plain.close()
        ranker = OnlineRanker(RedisStore(redis_url, redis_prefix), loader=loader, config=cfg)
        assert gc.get_freeze_count() > 10_000  # the bundle's containers, at least
        first = loaded[-1]
        v2 = publish(e2, store, config=cfg).version
        assert ranker.refresh() == v2 and not ranker.rank(e2.recommender.user_ids[0], k=5).degraded
        assert first() is None  # the replaced engine was collected
        assert loaded[-1]() is ranker.engine and gc.get_freeze_count() > 10_000
        ranker.close()
    finally:
        gc.unfreeze()
