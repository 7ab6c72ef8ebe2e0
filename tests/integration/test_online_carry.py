"""Publishing a new version carries what was recorded online since the bundle's cutoff: songs
ingested and events recorded before (and while) it publishes land in the new version exactly
once, on real Redis."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, ingest, publish, record
from apex_rank.ranking.online.engine import RankingEngine

from .online_support import BackgroundWriter, bundle_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine() -> RankingEngine:
    eng = RankingEngine.load(bundle_dir(7), max_batch=1)
    yield eng
    eng.close()


def _unplayed(engine: RankingEngine, user: str, n: int) -> list[str]:
    hist = set(dict(engine.user_states())[user].history)
    return [s for s in engine.recommender.songs.song_ids if s not in hist][:n]


def test_republish_keeps_events_and_ingested_songs(engine: RankingEngine, redis_url: str,
                                                   redis_prefix: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = OnlineConfig(namespace=redis_prefix)
    store = RedisStore(redis_url, redis_prefix)
    assert engine.data_until_s < 1e12 and publish(engine, store, config=cfg).version == 1
    users = engine.recommender.user_ids
    u, u2 = users[0], users[1]
    played = _unplayed(engine, u, 3)
    for s in played:
        record(store, u, s, "play", config=cfg)
    serving = RankingEngine.load(bundle_dir(7), max_batch=1)  # ingest mutates its engine
    with OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=serving,
                              follow=False) as ranker:
        emb = np.asarray(engine.recommender.songs.embeddings[5], np.float32) + 0.01
        ingested = ingest(ranker, "carried-song", embedding=emb)
    serving.close()
    record(store, u2, "carried-song", "like", config=cfg)
    record(store, "brand-new-user", played[0], "play", config=cfg)
    _, before = store.read_user(1, u)

    res = publish(engine, store, config=cfg)  # the same bundle again: version 2
    assert (res.version, res.carried_songs, res.replayed_events) == (2, 1, 5)
    cur, after = store.read_user(2, u)
    assert cur == 2 and after.history == before.history and list(after.history[-3:]) == played
    assert after.activity == before.activity
    np.testing.assert_allclose(after.profile, before.profile, rtol=1e-6)
    assert store.read_user(2, u2)[1].history[-1] == "carried-song"
    assert store.read_user(2, "brand-new-user")[1].history == (played[0],)
    assert store.ingested_ids(2) == ["carried-song"] and store.read_songs(2, ["carried-song"])[0][1]
    # a ranker starting on version 2 can rank the carried song, with the priors ingest stored
    fresh = RankingEngine.load(bundle_dir(7), max_batch=1)
    predicted: list[int] = []
    real = fresh.recommender.apex.predict

    def counting(*args: Any, **kwargs: Any) -> Any:
        predicted.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fresh.recommender.apex, "predict", counting)
    with OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=fresh,
                              follow=False) as r2:
        assert r2.version == 2 and r2.engine.has_song("carried-song")
    t = fresh.recommender.songs
    np.testing.assert_array_equal(t.priors[t.index_of(["carried-song"])[0]], ingested.priors)
    assert predicted == []  # read back from the carried record, not predicted again
    fresh.close()

    plain = publish(engine, store, config=cfg, carry=False)  # opt out: the bundle's state only
    assert plain.replayed_events == 0 and store.read_user(plain.version, "brand-new-user")[1] is None
    assert store.read_user(plain.version, u)[1].history == dict(engine.user_states())[u].history


def test_events_recorded_during_a_publish_land_exactly_once(engine: RankingEngine, redis_url: str,
                                                            redis_prefix: str) -> None:
    """A writer records plays without pause while a new version is published: afterwards every
    user's activity on the new version is its bundle activity plus its recorded plays, i.e. no
    event was lost in the switch and none was applied twice."""
    cfg = OnlineConfig(namespace=redis_prefix, batch_size=50)  # small batches: a longer publish
    store = RedisStore(redis_url, redis_prefix)
    publish(engine, store, config=cfg)
    base = {u: r.activity for u, r in engine.user_states()}
    users = engine.recommender.user_ids[:8]
    songs = engine.recommender.songs.song_ids
    counts = dict.fromkeys(users, 0)
    with BackgroundWriter(redis_url, redis_prefix, users, songs, cfg, counts) as writer:
        while writer.total() < 20:  # some events before the publish starts
            time.sleep(0.005)
        res = publish(engine, store, config=cfg)
        n_during = writer.total()
        time.sleep(0.05)  # and some after it committed
    assert not writer.failures, writer.failures
    assert sum(counts.values()) > n_during > 20
    for u in users:
        got = store.read_user(res.version, u)[1]
        assert got.activity == base[u] + counts[u], (u, got.activity, base[u], counts[u])


def test_carry_over_skips_events_an_older_writer_let_through(engine: RankingEngine, redis_url: str,
                                                             redis_prefix: str) -> None:
    """An event row with ts 1e300 or in milliseconds (what writers before the time window
    stored) is not replayed into the next version: it would set the user's last-seen time, from
    which song ages are measured, to the year 10^292."""
    import redis

    cfg = OnlineConfig(namespace=redis_prefix)
    store = RedisStore(redis_url, redis_prefix)
    publish(engine, store, config=cfg)
    u = engine.recommender.user_ids[0]
    song = engine.recommender.songs.song_ids[0]
    now = float(int(time.time()) - 10)  # later than any build-time play
    record(store, u, song, "play", ts=now, config=cfg)
    client = redis.Redis.from_url(redis_url)
    for t in ("1e300", "1.7e12"):
        client.xadd(store.keys.events, {"u": u, "s": song, "k": "play", "t": t, "w": "1"})
    client.close()
    res = publish(engine, store, config=cfg)
    assert res.replayed_events == 1
    got = store.read_user(res.version, u)[1]
    assert got.last_seen_s == now and got.activity == dict(engine.user_states())[u].activity + 1
    store.close()
