"""Live warm-up on real Redis: plays move CF factors between retrains (issue 14, point 1).

A cold song played by 20 users of one taste rises for a 21st user of that taste, through the
``als`` source; a user created by ``/events`` gets the factor offline fold-in gives the same
history; warmed factors survive a publish; the consumer runs in its background thread.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from apex_rank.ranking.online import (
    Interaction,
    OnlineConfig,
    OnlineRanker,
    RedisStore,
    WarmUpConsumer,
    bundle_cf_loader,
    publish,
    record_many,
)
from apex_rank.ranking.online.engine import RankingEngine
from apex_rank.ranking.online.keys import decode_warm_song

from .online_support import bundle_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine() -> RankingEngine:
    """The publisher's engine (publishing never warms it)."""
    eng = RankingEngine.load(bundle_dir(7), max_batch=1)
    yield eng
    eng.close()


def taste_cluster(engine: RankingEngine, n: int, anchor: int = 0) -> list[str]:
    """The ``n`` bundle users whose CF factors are closest in angle to user ``anchor``'s (it first)."""
    cf = engine.recommender.cf
    U = cf.user_factors / np.linalg.norm(cf.user_factors, axis=1, keepdims=True)
    return [cf.user_ids[i] for i in np.argsort(-(U @ U[anchor]), kind="stable")[:n]]


def rank_of(ranker: OnlineRanker, user: str, song: str, k: int = 100) -> tuple[int | None, str | None]:
    """(1-based rank, source) of ``song`` in ``user``'s top-``k``; (None, None) when absent."""
    for r, item in enumerate(ranker.rank(user, k).items, start=1):
        if item.song_id == song:
            return r, item.source
    return None, None


def _setup(engine: RankingEngine, redis_url: str, ns: str) -> tuple[OnlineConfig, RedisStore,
                                                                       OnlineRanker, WarmUpConsumer]:
    cfg = OnlineConfig(namespace=ns, max_batch=1)
    store = RedisStore(redis_url, ns)
    publish(engine, store, config=cfg)
    serving = RankingEngine.load(bundle_dir(7), max_batch=1)  # warming mutates it
    ranker = OnlineRanker.connect(redis_url, namespace=ns, config=cfg, engine=serving, follow=False)
    consumer = WarmUpConsumer(store, cf_loader=bundle_cf_loader(engine=engine), config=cfg)
    return cfg, store, ranker, consumer


def _cold_song_absent_for(engine: RankingEngine, ranker: OnlineRanker, user: str) -> str:
    t = engine.recommender.songs
    top = {i.song_id for i in ranker.rank(user, 100).items}
    return next(s for i, s in enumerate(t.song_ids) if not t.warm[i] and s not in top)


def test_cold_song_played_by_20_users_of_one_taste_rises_for_a_21st_via_als(
        engine: RankingEngine, redis_url: str, redis_prefix: str) -> None:
    cfg, store, ranker, consumer = _setup(engine, redis_url, redis_prefix)
    target, *listeners = taste_cluster(engine, 21)
    song = _cold_song_absent_for(engine, ranker, target)
    assert rank_of(ranker, target, song) == (None, None)

    record_many(store, [Interaction(u, song) for u in listeners], config=cfg)
    assert consumer.catch_up() == 20
    ranker.follow_once()
    rank, source = rank_of(ranker, target, song)
    assert rank is not None and rank <= 20, rank  # was outside the top 100
    assert source == "als"
    factor, plays = decode_warm_song(store.read_warm(1)[song], song)
    assert plays == 20.0 and np.array_equal(factor, consumer.warm.song_factors[song])
    # a user of another taste is not pushed the song by the warm-up
    far = taste_cluster(engine, len(engine.recommender.cf.user_ids))[-1]
    far_rank, _ = rank_of(ranker, far, song, k=20)
    assert far_rank is None or far_rank > rank
    ranker.close()


def test_user_created_by_events_gets_the_offline_fold_in_factor(
        engine: RankingEngine, redis_url: str, redis_prefix: str) -> None:
    """Parity: the online user step equals ``Recommender.state_from_history`` (offline fold-in)
    for the same history and weights, bit for bit; the user is created through HTTP /events,
    which folds the factor in within the request (``EventUpdate``), and the warm-up consumer
    solves the same factor from the stream."""
    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.service import create_app

    cfg, store, ranker, consumer = _setup(engine, redis_url, redis_prefix)
    rec = engine.recommender
    songs = rec.cf.song_ids[3:9]
    kinds = ["play", "like", "play", "skip", "play", "like"]
    with TestClient(create_app(ranker, config=cfg)) as client:
        body = {"events": [{"user_id": "fresh-user", "song_id": s, "kind": k} for s, k in zip(songs, kinds)]
                + [{"user_id": "fresh-user", "song_id": songs[0], "kind": "play"}]}
        r = client.post("/events", json=body)
        assert r.status_code == 200 and r.json()["events"][0]["created"] is True
    in_request = store.read_user(1, "fresh-user")[1].cf_factor
    consumer.catch_up()
    online = store.read_user(1, "fresh-user")[1].cf_factor
    # the same history: the plays and likes (a skip is no interaction, online or in training)
    weights = {"play": 1.0, "like": 2.0}
    history = [(s, weights[k]) for s, k in zip(songs, kinds) if k != "skip"] + [(songs[0], 1.0)]
    offline = rec.state_from_history("fresh-user", [s for s, _ in history],
                                     weights=[w for _, w in history]).cf_factor
    assert online is not None and offline is not None and in_request is not None
    np.testing.assert_array_equal(online, offline)
    np.testing.assert_array_equal(in_request, offline)
    assert ranker.rank("fresh-user", 10).items[0].source != "fallback"
    ranker.close()


def test_warmed_factors_survive_a_publish_and_the_consumer_follows(
        engine: RankingEngine, redis_url: str, redis_prefix: str) -> None:
    cfg, store, ranker, consumer = _setup(engine, redis_url, redis_prefix)
    target, *listeners = taste_cluster(engine, 21, anchor=5)
    song = _cold_song_absent_for(engine, ranker, target)
    record_many(store, [Interaction(u, song) for u in listeners[:12]]
                + [Interaction("newcomer", s) for s in engine.recommender.cf.song_ids[:4]], config=cfg)
    consumer.catch_up()
    ranker.close()
    v1_song = store.read_warm(1)[song]
    v1_user = store.read_user(1, "newcomer")[1].cf_factor

    res = publish(engine, store, config=cfg)  # the same bundle again: version 2
    assert (res.version, res.warmed_songs, res.warmed_users) == (2, 1, 1)
    assert store.read_warm(2)[song] == v1_song  # same bundle, same events: same factor
    np.testing.assert_array_equal(store.read_user(2, "newcomer")[1].cf_factor, v1_user)

    serving = RankingEngine.load(bundle_dir(7), max_batch=1)
    with OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=serving,
                              follow=False) as ranker2:  # a version is loaded with its warm songs
        assert ranker2.version == 2 and rank_of(ranker2, target, song)[1] == "als"
        # the consumer moves to version 2 and keeps warming it
        record_many(store, [Interaction(u, song) for u in listeners[12:]], config=cfg)
        consumer.catch_up()
        assert consumer.version == 2
        assert decode_warm_song(store.read_warm(2)[song], song)[1] == 20.0
        assert decode_warm_song(store.read_warm(1)[song], song)[1] == 12.0  # the old one is left


def test_background_consumer_warms_within_seconds(engine: RankingEngine, redis_url: str,
                                                  redis_prefix: str) -> None:
    """The consumer thread and the ranker's follower thread, as served: the song rises without
    any call into either (the delay itself is measured by ``python -m bench.warmup``)."""
    cfg, store, ranker, _ = _setup(engine, redis_url, redis_prefix)
    ranker.close()
    target, *listeners = taste_cluster(engine, 21, anchor=9)
    serving = RankingEngine.load(bundle_dir(7), max_batch=1)
    with (OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=serving) as ranker,
          WarmUpConsumer(RedisStore(redis_url, redis_prefix), config=cfg,
                         cf_loader=bundle_cf_loader(engine=engine)).start() as consumer):
        song = _cold_song_absent_for(engine, ranker, target)
        record_many(store, [Interaction(u, song) for u in listeners], config=cfg)
        deadline = time.monotonic() + 30
        while rank_of(ranker, target, song)[0] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rank_of(ranker, target, song)[1] == "als"
        assert consumer.stats["errors"] == 0


def test_warmed_song_joins_the_ivf_als_source_and_a_batch_equals_single_calls(
        engine: RankingEngine) -> None:
    """Above ``als_index.min_songs`` the bundle's als source is the IVF index; warmed songs are
    merged into it the same way, leave the cold-song sources, and micro-batched requests get
    the answers of single calls."""
    from apex_rank.ranking.candidates import FactorIndexConfig
    from apex_rank.ranking.cf import solve_item_factor

    ivf = RankingEngine.load(bundle_dir(7), max_batch=1,
                                 als_index=FactorIndexConfig(min_songs=1, nprobe=10_000))
    rec = ivf.recommender
    assert ivf.approximate_als
    target, *listeners = taste_cluster(engine, 21, anchor=3)
    t = rec.songs
    song = next(s for i, s in enumerate(t.song_ids) if not t.warm[i])
    cf = rec.cf
    rows = np.asarray([cf.user_ids.index(u) for u in listeners])
    v = solve_item_factor(cf.user_factors, rows, np.ones(len(rows)), alpha=cf.step_alpha,
                          regularization=cf.config.regularization)
    assert ivf.warm_songs([song, "not-a-song", cf.song_ids[0]], np.stack([v, v, v]),
                          np.asarray([20.0, 1.0, 1.0])) == 1  # unknown and bundle-fitted: skipped
    users = [target, *listeners[:5]]
    states = {u: rec.user_state(u) for u in users}
    single = {u: ivf.rank_user(u, states[u], 400, ()) for u in users}
    assert [src for s, _, src in single[target] if s == song] == ["als"]
    batch = ivf._rank_states([rec.user_state(u) for u in users], 400, [frozenset()] * len(users))
    assert batch == single
    ivf.warm_songs([], np.zeros((0, v.shape[0]), np.float32), np.zeros(0), replace=True)
    assert not t.warm[t.index_of([song])[0]] and all(s != song or src != "als"
                                                      for s, _, src in ivf.rank_user(target, states[target], 400, ()))
