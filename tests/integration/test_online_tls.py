"""The online store over TLS (``rediss://``), with and without a password, on the test's own
TLS-only redis-server: publish, follow, record and rank work and equal the offline
``Recommender.recommend``; a client that does not trust the server's certificate gets a clean
:class:`StoreError` (no secret in it) and the ranker answers degraded instead of raising."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote

import pytest

from apex_rank.errors import StoreError
from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, publish, record
from apex_rank.ranking.online.engine import RankingEngine
from apex_rank.ranking.recommender import load_recommender

from .online_support import OwnRedis, bundle_dir, self_signed_cert

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine() -> RankingEngine:
    return RankingEngine.load(bundle_dir(7))


@pytest.mark.parametrize("password", [None, "tls-s3cret-pw"], ids=["no-password", "password"])
def test_rediss_publish_record_and_rank_equal_recommend(engine: RankingEngine, tmp_path: Path,
                                                        password: str | None) -> None:
    own = OwnRedis(tmp_path / "redis-tls", password=password, tls=True).start()
    try:
        assert own.url.startswith("rediss://") and "ssl_ca_certs=" in own.url
        # the server speaks TLS only: the same host and port without TLS is refused
        plain = own.url.replace("rediss://", "redis://", 1).split("?")[0]
        with pytest.raises(StoreError):
            RedisStore(plain, "tls", timeout_s=2.0).current_version()

        cfg = OnlineConfig(namespace="tls", follow_interval_s=0.1)
        store = RedisStore(own.url, "tls")
        v = publish(engine, store, config=cfg).version
        assert store.current_version() == v

        rec = load_recommender(bundle_dir(7))
        users = rec.user_ids[:25]
        # the default connect: request store plus the follower thread, both over TLS
        with OnlineRanker.connect(own.url, namespace="tls", config=cfg, engine=engine) as ranker:
            for u in [*users, "never-seen-user"]:
                got = ranker.rank(u, k=20)
                assert not got.degraded and got.model_version == str(v), (u, got.reason)
                assert [i.song_id for i in got.items] == rec.recommend(u, k=20)["song_id"].to_list(), u
            assert ranker.rank("never-seen-user", k=5).cold_user

            # an event over TLS (a WATCH/MULTI transaction) is stored and read back
            u = users[0]
            song = rec.recommend(u, k=1)["song_id"].to_list()[0]
            ev = record(store, u, song, "play", 1_700_000_000, config=cfg)
            got_events = [e for batch in RedisStore(own.url, "tls").read_events(0) for e in batch]
            assert [(e.event_id, e.user_id, e.song_id) for e in got_events] == [(ev.event_id, u, song)]
            after = ranker.rank(u, k=20)
            assert not after.degraded and song not in {i.song_id for i in after.items}
        store.close()
    finally:
        own.stop()


def test_rediss_untrusted_certificate_fails_cleanly_and_ranker_degrades(
        engine: RankingEngine, tmp_path: Path) -> None:
    own = OwnRedis(tmp_path / "redis-tls", password="tls-s3cret-pw", tls=True).start()
    try:
        cfg = OnlineConfig(namespace="tlswrong", budget_ms=200, retry_s=0.2, follow_interval_s=0.1)
        v = publish(engine, RedisStore(own.url, "tlswrong"), config=cfg).version

        other_cert, _ = self_signed_cert(tmp_path / "other-ca", "other")  # same CN, another key
        wrong_url = own.url.replace(quote(str(own.cert), safe="/"), quote(str(other_cert), safe="/"))
        assert wrong_url != own.url and "other-cert.pem" in wrong_url

        wrong = RedisStore(wrong_url, "tlswrong", timeout_s=2.0)
        assert wrong.ping() is False
        with pytest.raises(StoreError) as info:
            wrong.current_version()
        msg = str(info.value)
        assert f"127.0.0.1:{own.port}" in msg  # names the server ...
        assert "apexrank:tlswrong:{tlswrong}:current" in msg  # ... and the namespace's key
        assert "certificate verify failed" in msg.lower(), msg  # says why
        assert "tls-s3cret-pw" not in msg  # and never the password
        with pytest.raises(StoreError) as pub_info:
            publish(engine, wrong, config=cfg)
        assert "tls-s3cret-pw" not in str(pub_info.value)

        # a ranker started against the untrusted server serves its bundle, degraded, never raising
        with OnlineRanker.connect(wrong_url, namespace="tlswrong", config=cfg,
                                  bundle_dir=bundle_dir(7)) as ranker:
            assert ranker.version is None
            u = engine.recommender.user_ids[0]
            first = ranker.rank(u, k=10)
            assert first.degraded and first.model_version == "fallback" and len(first.items) == 10
            time.sleep(cfg.retry_s + 0.05)  # past the retry pause: it tries the store again, still degraded
            again = ranker.rank(u, k=10)
            assert again.degraded and [i.song_id for i in again.items] == [i.song_id for i in first.items]

        # the trusted URL still reaches the same server and its version
        with OnlineRanker.connect(own.url, namespace="tlswrong", config=cfg, engine=engine,
                                  follow=False) as ok:
            assert not ok.rank(u, k=10).degraded and ok.version == v
    finally:
        own.stop()
