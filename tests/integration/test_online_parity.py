"""Parity: OnlineRanker.rank and GET /recommend equal Recommender.recommend (ids and order);
events and ingested songs change the next ranking, across ranker processes' followers."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from apex_rank.ranking.candidates import FactorIndexConfig, FactorSource
from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, ingest, publish, record
from apex_rank.ranking.online.engine import RankingEngine
from apex_rank.ranking.recommender import load_recommender

from .online_support import bundle_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bundle() -> str:
    return bundle_dir(7)


@pytest.fixture()
def published(bundle: str, redis_url: str, redis_prefix: str) -> RankingEngine:
    engine = RankingEngine.load(bundle)
    publish(engine, RedisStore(redis_url, redis_prefix), config=OnlineConfig(namespace=redis_prefix))
    return engine


def test_rank_equals_recommend_for_every_user(bundle: str, published: RankingEngine,
                                              redis_url: str, redis_prefix: str) -> None:
    rec = load_recommender(bundle)
    with OnlineRanker.connect(redis_url, namespace=redis_prefix, engine=published,
                              follow=False) as ranker:
        users = rec.user_ids + ["never-seen-user"]
        for u in users:
            got = ranker.rank(u, k=20)
            want = rec.recommend(u, k=20)
            assert not got.degraded and got.model_version == str(ranker.version)
            assert [i.song_id for i in got.items] == want["song_id"].to_list(), u
            assert [i.source for i in got.items] == want["source"].to_list(), u
            assert np.allclose([i.score for i in got.items], want["score"].to_numpy(), atol=1e-9)
        assert ranker.rank("never-seen-user", k=5).cold_user
        # with an exclude list and a large k
        u = rec.user_ids[3]
        excl = rec.recommend(u, k=5)["song_id"].to_list()
        got = ranker.rank(u, k=120, exclude=excl)
        assert [i.song_id for i in got.items] == rec.recommend(u, k=120, exclude=excl)["song_id"].to_list()
        assert not set(excl) & {i.song_id for i in got.items}


def test_online_requests_are_made_now_and_a_user_back_after_max_gap_gets_the_als_order(
        bundle: str, published: RankingEngine, redis_url: str, redis_prefix: str) -> None:
    """The engine ranks at its clock's time (``Recommender.recommend(at=...)``): a user whose
    latest play is more than the reranker's ``max_gap_s`` before the request gets what the
    offline path serves at that time, the ALS order with the trees breaking ties only."""
    rec = load_recommender(bundle)
    u = rec.user_ids[2]
    seen = rec.user_state(u).last_seen_s
    rr = published.recommender.reranker
    gap, clock = rr.max_gap_s, published.clock
    with OnlineRanker.connect(redis_url, namespace=redis_prefix, engine=published, follow=False) as ranker:
        try:
            rr.max_gap_s = rec.reranker.max_gap_s = 86400.0
            for at in (seen + 3600.0, seen + 30 * 86400.0):
                published.clock = lambda at=at: at
                got = [i.song_id for i in ranker.rank(u, k=20).items]
                assert got == rec.recommend(u, k=20, at=at)["song_id"].to_list(), at
            trusted = rec.recommend(u, k=20, at=seen + 3600.0)["song_id"].to_list()
            assert got != trusted  # 30 days later is a different list: the ALS order
        finally:
            rr.max_gap_s, published.clock = gap, clock


def test_http_recommend_equals_recommend(bundle: str, published: RankingEngine,
                                         redis_url: str, redis_prefix: str) -> None:
    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.service import create_app

    rec = load_recommender(bundle)
    with OnlineRanker.connect(redis_url, namespace=redis_prefix, engine=published,
                              follow=False) as ranker:
        client = TestClient(create_app(ranker))
        for u in rec.user_ids[:40] + ["never-seen-user"]:
            r = client.get("/recommend", params={"user_id": u, "k": 20})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["user_id"] == u and body["degraded"] is False
            assert [i["song_id"] for i in body["items"]] == rec.recommend(u, k=20)["song_id"].to_list()


def test_played_song_and_ingested_song_change_next_ranking_in_other_process(
        bundle: str, published: RankingEngine, redis_url: str, redis_prefix: str) -> None:
    rec = load_recommender(bundle)
    cfg = OnlineConfig(namespace=redis_prefix, follow_interval_s=0.2)
    a = OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=published)
    b = OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, bundle_dir=bundle)
    try:
        u = rec.user_ids[0]
        before = [i.song_id for i in a.rank(u, k=20).items]
        played = before[0]
        r = record(a.store, u, played, "play", time.time(), config=cfg)
        assert not r.created
        after = [i.song_id for i in a.rank(u, k=20).items]
        assert played not in after and after != before  # the play is history now
        # a new song: copy of a song the new user played, ingested through process a
        seed_song = rec.songs.song_ids[5]
        raw = np.asarray(rec.songs.embeddings[5], np.float32) * 3.0
        res = ingest(a, "brand-new-song", embedding=raw)
        assert res.priors.shape == (7,)
        deadline = time.monotonic() + 1.0  # other processes follow the catalogue within a second
        while not b.engine.has_song("brand-new-song") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b.engine.has_song("brand-new-song")
        made = record(b.store, "fresh-listener", seed_song, "like", config=cfg)
        assert made.created  # events for unknown users create them
        got_a = [i.song_id for i in a.rank("fresh-listener", k=50).items]
        got_b = [i.song_id for i in b.rank("fresh-listener", k=50).items]
        assert got_a == got_b and "brand-new-song" in got_a and seed_song not in got_a
    finally:
        a.close()
        b.close()


def test_ingested_priors_are_predicted_once_and_read_back_by_followers(
        bundle: str, published: RankingEngine, redis_url: str, redis_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (issue 14, point 4): ingest ran APEX twice and every follower ran it again;
    the priors stored in the song record were never read back."""
    follower = RankingEngine.load(bundle)
    calls: list[str] = []
    for name, eng in (("ingesting", published), ("follower", follower)):
        real = eng.recommender.apex.predict

        def counting(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(eng.recommender.apex, "predict", counting)
    cfg = OnlineConfig(namespace=redis_prefix, follow_interval_s=0.2)
    a = OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=published)
    b = OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=follower)
    try:
        songs = published.recommender.songs
        raw = np.asarray(songs.embeddings[5], np.float32) * 3.0
        res = ingest(a, "priors-once", embedding=raw)
        deadline = time.monotonic() + 2.0
        while not b.engine.has_song("priors-once") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b.engine.has_song("priors-once")
        assert calls == ["ingesting"]  # once, in the ingesting process
        rec_a, rec_b = published.recommender.songs, follower.recommender.songs
        pa = rec_a.priors[rec_a.index_of(["priors-once"])[0]]
        pb = rec_b.priors[rec_b.index_of(["priors-once"])[0]]
        np.testing.assert_array_equal(pa, res.priors)
        np.testing.assert_array_equal(pb, res.priors)
        record(a.store, "priors-listener", songs.song_ids[5], "like", config=cfg)
        got_a = [(i.song_id, i.score) for i in a.rank("priors-listener", k=50).items]
        got_b = [(i.song_id, i.score) for i in b.rank("priors-listener", k=50).items]
        assert "priors-once" in dict(got_a) and got_a == got_b
    finally:
        a.close()
        b.close()


def test_rank_equals_cli_recommend(bundle: str, published: RankingEngine, redis_url: str,
                                   redis_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    from apex_rank.cli.main import main

    with OnlineRanker.connect(redis_url, namespace=redis_prefix, engine=published,
                              follow=False) as ranker:
        for u in published.recommender.user_ids[:2] + ["never-seen-user"]:
            capsys.readouterr()
            assert main(["recommend", "--bundle", bundle, "--user", u, "-k", "15", "--device", "cpu"]) == 0
            printed = re.findall(r"\bs\d{6}\b", capsys.readouterr().out)
            assert printed == [i.song_id for i in ranker.rank(u, k=15).items], u


def test_engine_answers_als_from_the_ivf_index_above_min_songs(bundle: str) -> None:
    """Issue 15: from ``als_index.min_songs`` warm songs the engine's ``als`` source is the IVF
    index; the Recommender's own source (batch ranking, evaluation) stays exact. Scanning every
    list, the IVF source finds the exact top-N, so rankings equal ``recommend`` (also after a
    song is added: the engine reads the live Recommender); scanning one list, they do not."""
    small = RankingEngine.load(bundle)
    assert not small.approximate_als  # below the default 50k warm songs: exact
    engine = RankingEngine.load(bundle, als_index=FactorIndexConfig(min_songs=1, nprobe=10_000))
    rec = engine.recommender
    assert engine.approximate_als and isinstance(rec.sources[0], FactorSource)
    users = rec.user_ids[:60]

    def ranked(e: RankingEngine, u: str, k: int = 20) -> list[str]:
        return [s for s, _, _ in e.rank_user(u, rec.user_state(u), k, ())]

    for u in users:
        assert ranked(engine, u) == rec.recommend(u, k=20)["song_id"].to_list(), u
    coarse = RankingEngine.load(bundle, als_index=FactorIndexConfig(min_songs=1, nlist=16, nprobe=1))
    assert sum(ranked(coarse, u) != rec.recommend(u, k=20)["song_id"].to_list() for u in users) > 0
    engine.add_song("ivf-new-song", np.asarray(rec.songs.embeddings[5], np.float32) * 3.0,
                    np.zeros(7, np.float32))
    for u in users[:10]:
        assert ranked(engine, u, 50) == rec.recommend(u, k=50)["song_id"].to_list(), u


def test_regression_ingest_works_with_a_predictor_trained_without_aesthetic_labels(
        tmp_path: Any, redis_url: str, redis_prefix: str) -> None:
    """A bundle built from a songs table without aesthetic labels has an APEX head trained on
    streams and likes only, whose priors are NaN for the five other tasks: ingest refused every
    new song of such a bundle ('priors ... not finite'). Untrained tasks are NaN as predict
    returns them (``ApexPredictor.bad_prior_rows`` holds the rule)."""
    import polars as pl

    from apex_rank.ranking.recommender import Recommender
    from apex_rank.synthetic import WorldConfig, make_world

    w = make_world(WorldConfig(n_users=120, n_songs=400, seed=3))
    rec = Recommender.build(w.songs.select("song_id", "created_at"), w.embeddings,
                            w.interactions.filter(pl.col("ts") < w.cutoff))
    assert rec.apex.tasks == ("score_streams", "score_likes")
    engine = RankingEngine.load(rec.save(tmp_path / "b"), max_batch=1)
    cfg = OnlineConfig(namespace=redis_prefix)
    store = RedisStore(redis_url, redis_prefix)
    publish(engine, store, config=cfg)
    with OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=engine, follow=False) as r:
        res = ingest(r, "new-song", embedding=np.asarray(rec.songs.embeddings[3], np.float32))
        assert np.isfinite(res.priors[:2]).all() and np.isnan(res.priors[2:]).all()
        assert engine.has_song("new-song") and "new-song" in [i.song_id for i in r.rank(rec.user_ids[0], k=400).items]
    store.close()
    engine.close()
