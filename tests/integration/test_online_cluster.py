"""The online store on Redis Cluster (issue 16, part 3), against a local cluster of 3 masters and
3 replicas started by this module: publish, rank parity with one Redis server (same bundle,
same answers), events recorded and reflected as on one server, carry-over at publish, and a
master failed over (``CLUSTER FAILOVER`` on its replica) during traffic with no acknowledged
event lost. The store contract's tests (``test_online_store.py``) run here on the cluster too.
One cluster for the module, in a temp folder, without persistence, stopped even when a test
fails."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from apex_rank.errors import StoreError, UnknownIdError, VersionMovedError
from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, ingest, publish, record
from apex_rank.ranking.online.engine import RankingEngine
from apex_rank.ranking.online.events import Interaction, record_many
from apex_rank.ranking.online.redis_store import redact_url

from .online_support import BackgroundWriter, bundle_dir
from .test_online_store import (  # noqa: F401 - the store contract's tests, run here on the cluster
    _publish_empty,
    play,
    test_catalogue_announcements,
    test_publish_commit_read_cycle,
    test_record_event_creates_user_and_streams,
    test_record_events_is_all_or_nothing,
    test_warm_write_read_and_log,
    test_worker_metrics_are_stamped_with_the_store_clock_and_dropped_by_name,
    test_writes_to_a_replaced_version_are_refused,
)

pytestmark = [pytest.mark.scale, pytest.mark.integration]

BUDGET = OnlineConfig(budget_ms=3000.0)  # shared cores: a ranking must not fall back on a slow call


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class OwnCluster:
    """A Redis Cluster of ``3`` masters with one replica each on 127.0.0.1, in ``folder``.

    Ports come from 7300-7399 (each node's cluster bus listens on its port + 10000, so the
    ephemeral range is unfit); ``--save "" --appendonly no``: nothing outlives the test.
    """

    def __init__(self, folder: Path, masters: int = 3) -> None:
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} binary is not installed")
        self.folder = folder
        n = 2 * masters
        for base in range(7300, 7400, n):
            ports = list(range(base, base + n))
            if all(_bindable(p) and _bindable(p + 10000) for p in ports):
                break
        else:
            pytest.skip("no 6 free ports (and bus ports) in 7300-7399 for a local Redis Cluster")
        self.ports = ports
        self.url = f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def node(self, port: int):  # noqa: ANN201 - a redis.Redis
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start(self) -> OwnCluster:
        for p in self.ports:
            d = self.folder / str(p)
            d.mkdir(parents=True)
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--dir", str(d),
                 "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf",
                 "--cluster-node-timeout", "3000", "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--logfile", str(d / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in self.ports:
            self._wait(lambda p=p: self.node(p).ping(), f"node {p} answers")
        made = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False)
        if made.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {made.stdout[-800:]} {made.stderr[-400:]}")
        for p in self.ports:
            self._wait(lambda p=p: b"cluster_state:ok" in self.node(p).execute_command("CLUSTER", "INFO"),
                       f"node {p} reports cluster_state:ok")
        self._wait(lambda: all(self._synced(p) for p in self.ports), "every replica in sync")
        return self

    def _synced(self, port: int) -> bool:
        info = self.node(port).info("replication")
        return info["role"] == "master" or info.get("master_link_status") == "up"

    def _wait(self, check, what: str, timeout: float = 30.0) -> None:  # noqa: ANN001
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"local Redis Cluster: timed out waiting until {what}")

    def master_and_replica_of(self, key: str) -> tuple[int, int]:
        """The ports of the master serving ``key``'s slot and of its replica."""
        probe = self.node(self.ports[0])
        slot = int(probe.execute_command("CLUSTER", "KEYSLOT", key))
        nodes = [line.split() for line in probe.execute_command("CLUSTER", "NODES").decode().splitlines()]
        port = {f[0]: int(f[1].split("@")[0].rpartition(":")[2]) for f in nodes}
        for f in nodes:
            if "master" in f[2]:
                for rng in f[8:]:
                    lo, _, hi = rng.partition("-")
                    if int(lo) <= slot <= int(hi or lo):
                        replica = next(g[0] for g in nodes if g[3] == f[0])
                        return port[f[0]], port[replica]
        raise RuntimeError(f"no master serves slot {slot}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # no persistence: nothing to flush
        for proc in self.procs:
            proc.wait(timeout=10)
        self.procs = []


@pytest.fixture(scope="module")
def cluster() -> Iterator[OwnCluster]:
    folder = Path(tempfile.mkdtemp(prefix="apexrank-cluster-"))
    own = OwnCluster(folder)
    try:
        yield own.start()
    finally:
        own.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def engine() -> Iterator[RankingEngine]:
    eng = RankingEngine.load(bundle_dir(7), max_batch=1)
    yield eng
    eng.close()


def _ns() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


@pytest.fixture()
def store(cluster: OwnCluster) -> Iterator[RedisStore]:
    """A cluster store on a fresh namespace, for the contract tests imported above."""
    s = RedisStore(cluster.url, _ns(), timeout_s=5.0)
    yield s
    s.close()


def test_cluster_urls_are_checked_and_redacted() -> None:
    assert RedisStore("redis+cluster://h1:7000,h2:7001", "x").kind == "redis-cluster"
    assert RedisStore("redis://h1:7000/0", "x").kind == "redis"
    with pytest.raises(StoreError, match="only database 0"):
        RedisStore("redis+cluster://127.0.0.1:7000/3", "x")
    with pytest.raises(StoreError, match=r"seed node 'h2' is not host:port"):
        RedisStore("redis+cluster://:pw@h1:7000,h2", "x")
    with pytest.raises(StoreError, match="not a rediss:// URL"):
        RedisStore("redis+cluster://h1:7000?ssl_ca_certs=/ca.pem", "x")
    assert redact_url("rediss+cluster://app:s3cret@h1:7000,h2:7000") == "rediss+cluster://h1:7000,h2:7000"


def test_a_cluster_url_to_a_plain_server_fails_with_a_store_error(redis_url: str) -> None:
    plain = redis_url.split("://", 1)[1].rsplit("/", 1)[0]
    store = RedisStore(f"redis+cluster://:pw@{plain}", "x", timeout_s=2.0)
    assert store.ping() is False
    with pytest.raises(StoreError, match=r"redis\+cluster://.*current failed: .*Cluster mode is not enabled") as info:
        store.current_version()
    assert "pw" not in str(info.value)


def test_publish_and_rank_parity_with_one_server(cluster: OwnCluster, engine: RankingEngine,
                                                 redis_url: str, redis_prefix: str) -> None:
    """The same bundle published to one server and to the cluster ranks every user alike; the
    users' states spread over the three masters, the namespace's other keys share one slot."""
    ns = _ns()
    single = publish(engine, RedisStore(redis_url, redis_prefix), config=OnlineConfig(namespace=redis_prefix))
    store = RedisStore(cluster.url, ns)
    res = publish(engine, store, config=OnlineConfig(namespace=ns))
    assert (res.n_songs, res.n_users) == (single.n_songs, single.n_users) and store.current_version() == 1
    masters = [p for p in cluster.ports if cluster.node(p).info("replication")["role"] == "master"]
    assert len(masters) == 3 and all(cluster.node(p).dbsize() > 20 for p in masters)
    users = engine.recommender.user_ids[:40] + ["never-seen-user"]
    with OnlineRanker.connect(redis_url, namespace=redis_prefix, config=BUDGET, engine=engine,
                              follow=False) as one, \
         OnlineRanker.connect(cluster.url, namespace=ns, config=BUDGET, engine=engine,
                              follow=False) as many:
        assert many.store.kind == "redis-cluster" and many.version == 1
        for u in users:
            a, b = one.rank(u, k=20), many.rank(u, k=20)
            assert not a.degraded and not b.degraded
            assert [i.song_id for i in b.items] == [i.song_id for i in a.items], u
            np.testing.assert_allclose([i.score for i in b.items], [i.score for i in a.items], atol=1e-9)
    store.close()


def test_events_are_recorded_and_reflected_as_on_one_server(cluster: OwnCluster, engine: RankingEngine,
                                                            redis_url: str, redis_prefix: str) -> None:
    """A batch over many users (many slots) leaves every state as one server leaves it, is on the
    stream, and changes the next ranking; a refused batch and a batch for a version that moved
    write nothing."""
    ns = _ns()
    one = RedisStore(redis_url, redis_prefix)
    many = RedisStore(cluster.url, ns)
    for s, name in ((one, redis_prefix), (many, ns)):
        publish(engine, s, config=OnlineConfig(namespace=name))
    users = engine.recommender.user_ids[:30] + ["new-a", "new-b"]
    songs = engine.recommender.songs.song_ids
    t0 = float(int(time.time()) - 600)
    batch = [Interaction(u, songs[(13 * i) % len(songs)], ("play", "like", "skip")[i % 3], t0 + i)
             for i, u in enumerate(users * 3)]
    got = {name: record_many(s, batch, config=OnlineConfig(namespace=name), engine=engine)
           for s, name in ((one, redis_prefix), (many, ns))}
    assert [(r.user_id, r.created, r.history_len) for r in got[ns]] == \
        [(r.user_id, r.created, r.history_len) for r in got[redis_prefix]]
    for u in users:
        a, b = one.read_user(1, u)[1], many.read_user(1, u)[1]
        assert b.history == a.history and b.activity == a.activity and b.last_seen_s == a.last_seen_s, u
        np.testing.assert_allclose(b.profile, a.profile, rtol=1e-6)
    stream = [e for page in many.read_events(0) for e in page]
    assert [e.event_id for e in stream] == [r.event_id for r in got[ns]]
    assert [(e.user_id, e.song_id, e.ts) for e in stream] == [(i.user_id, i.song_id, i.ts) for i in batch]
    with OnlineRanker.connect(redis_url, namespace=redis_prefix, config=BUDGET, engine=engine,
                              follow=False) as r1, \
         OnlineRanker.connect(cluster.url, namespace=ns, config=BUDGET, engine=engine,
                              follow=False) as r2:
        for u in users[:5] + ["new-a"]:
            assert [i.song_id for i in r2.rank(u, k=10).items] == [i.song_id for i in r1.rank(u, k=10).items]
    def states() -> dict[str, tuple]:
        return {u: (s.history, s.activity) for u in users if (s := many.read_user(1, u)[1])}

    before = states()
    with pytest.raises(UnknownIdError, match="not in the catalogue"):
        record_many(many, [Interaction(users[0], songs[0]), Interaction(users[1], "no-such-song")],
                    config=OnlineConfig(namespace=ns))
    publish(engine, many, config=OnlineConfig(namespace=ns))  # version 2: version 1 is retired
    with pytest.raises(VersionMovedError, match="version 1 is no longer current"):
        many.record_events(1, [{"u": users[0], "s": songs[0], "k": "play", "t": str(t0), "w": "1"}],
                           [users[0]], lambda u, old: old, 60, 1000)
    assert states() == before
    assert len([e for page in many.read_events(0) for e in page]) == len(batch)  # nothing appended
    one.close()
    many.close()


def test_concurrent_writers_of_the_same_users_lose_no_update(store: RedisStore) -> None:
    """Three writers record batches for the same three users at once: the per-slot
    compare-and-set makes a writer that lost a race read and compute again, so every event is
    in its user's state exactly once."""
    v = _publish_empty(store)
    e = np.array([1, 0, 0, 0], np.float32)
    users = ["hot-a", "hot-b", "hot-c"]
    failures: list[BaseException] = []

    def writer() -> None:
        w = RedisStore(store.url, store.keys.namespace, timeout_s=5.0)
        try:
            for _ in range(30):
                w.record_events(v, [{"u": u, "s": "a", "k": "play", "t": "1.7e9", "w": "1"} for u in users],
                                users, lambda u, old: play(u, old, "a", e, 1.7e9), 60, 10000)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            failures.append(err)
        finally:
            w.close()

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures
    assert [store.read_user(v, u)[1].activity for u in users] == [90, 90, 90]
    assert len([x for b in store.read_events(0) for x in b]) == 270


def test_carry_over_at_publish(cluster: OwnCluster, engine: RankingEngine) -> None:
    """Events and an ingested song recorded on version 1, and plays recorded without pause while
    version 2 is published, land in version 2 exactly once (activity = bundle + plays)."""
    ns = _ns()
    cfg = OnlineConfig(namespace=ns, batch_size=50)
    store = RedisStore(cluster.url, ns)
    publish(engine, store, config=cfg)
    base = {u: r.activity for u, r in engine.user_states()}
    users = engine.recommender.user_ids[:8]
    songs = engine.recommender.songs.song_ids
    serving = RankingEngine.load(bundle_dir(7), max_batch=1)  # ingest mutates its engine
    with OnlineRanker.connect(cluster.url, namespace=ns, config=BUDGET, engine=serving, follow=False) as r:
        ingest(r, "carried-song", embedding=np.asarray(engine.recommender.songs.embeddings[5], np.float32) + 0.01)
    serving.close()
    record(store, users[0], "carried-song", "like", config=cfg)
    counts = dict.fromkeys(users, 0)
    counts[users[0]] = 1
    with BackgroundWriter(cluster.url, ns, users, songs, cfg, counts) as writer:
        while writer.total() < 20:
            time.sleep(0.005)
        res = publish(engine, store, config=cfg)
        n_during = writer.total()
        time.sleep(0.05)
    assert not writer.failures, writer.failures
    assert res.version == 2 and res.carried_songs == 1 and sum(counts.values()) > n_during > 20
    assert store.ingested_ids(2) == ["carried-song"]
    for u in users:
        got = store.read_user(2, u)[1]
        assert got.activity == base[u] + counts[u], (u, got.activity, base[u], counts[u])
    assert store.read_user(2, users[0])[1].history.count("carried-song") == 1
    store.close()


def test_master_failover_during_traffic_loses_no_acknowledged_event(cluster: OwnCluster,
                                                                      engine: RankingEngine) -> None:
    """While a writer records batches and a ranker ranks, the master holding the namespace slot
    (pointer, event stream) hands over to its replica (``CLUSTER FAILOVER``). Every acknowledged
    event is on the stream and in its user's state, none twice; writes and rankings succeed
    again after the failover."""
    ns = _ns()
    cfg = OnlineConfig(namespace=ns)
    store = RedisStore(cluster.url, ns, timeout_s=5.0)
    publish(engine, store, config=cfg)
    base = {u: r.activity for u, r in engine.user_states()}
    users = engine.recommender.user_ids[:24]
    songs = engine.recommender.songs.song_ids
    master, replica = cluster.master_and_replica_of(store.keys.events)
    acked: list[tuple[str, str, float]] = []  # (event id, user, ts)
    failed: list[str] = []
    ranked = {"ok": 0, "degraded": 0}
    stop = threading.Event()
    t0 = float(int(time.time()) - 900)

    def traffic() -> None:
        w = RedisStore(cluster.url, ns, timeout_s=5.0)
        i = 0
        with OnlineRanker.connect(cluster.url, namespace=ns, config=BUDGET, engine=engine,
                                  follow=False) as ranker:
            while not stop.is_set():
                evs = [Interaction(users[(i + j) % len(users)], songs[(i + 5 * j) % len(songs)], "play",
                                   t0 + (i + j) / 1000.0) for j in range(6)]
                try:
                    done = record_many(w, evs, config=cfg, engine=engine)
                    acked.extend((d.event_id, e.user_id, e.ts) for d, e in zip(done, evs, strict=True))
                except StoreError as err:
                    failed.append(str(err))
                    time.sleep(0.02)
                got = ranker.rank(users[i % len(users)], k=10)
                ranked["degraded" if got.degraded else "ok"] += 1
                i += 6
        w.close()

    th = threading.Thread(target=traffic)
    th.start()
    try:
        while len(acked) < 60:
            time.sleep(0.01)
        assert th.is_alive()
        cluster.node(replica).execute_command("CLUSTER", "FAILOVER")
        cluster._wait(lambda: cluster.node(replica).info("replication")["role"] == "master",
                      f"replica {replica} took over from master {master}", timeout=20)
        n_at_failover = len(acked)
        deadline = time.monotonic() + 20
        while len(acked) < n_at_failover + 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        ok_after = ranked["ok"]
        time.sleep(0.3)
    finally:
        stop.set()
        th.join(timeout=30)
    assert cluster.node(master).info("replication")["role"] == "slave"
    assert len(acked) >= n_at_failover + 60, f"writes did not recover after the failover: {failed[-3:]}"
    assert ranked["ok"] > ok_after, "rankings did not recover after the failover"
    stream = {e.event_id: e for page in store.read_events(0) for e in page}
    assert all(eid in stream for eid, _, _ in acked)  # no acknowledged event lost
    assert len({(e.user_id, e.ts) for e in stream.values()}) == len(stream)  # none appended twice
    cur = store.current_version()
    for u in users:
        n_acked = sum(1 for _, x, _ in acked if x == u)
        on_stream = sum(1 for e in stream.values() if e.user_id == u)
        got = store.read_user(cur, u)[1].activity - base[u]
        assert n_acked <= got <= on_stream, (u, n_acked, got, on_stream, failed[:3])
    store.close()
