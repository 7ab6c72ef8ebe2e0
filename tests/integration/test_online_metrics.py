"""``/metrics`` across workers (real Redis): two apps on one namespace stand for two ``serve``
workers; each one's ``/metrics`` reports the sum of both, a worker whose key is gone drops out,
and an unreachable store leaves ``/metrics`` answering with the local numbers."""

from __future__ import annotations

import json

import pytest

from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, publish
from apex_rank.ranking.online.engine import RankingEngine

from .online_support import bundle_dir, free_port

pytestmark = pytest.mark.integration

RECOMMEND_200 = 'apexrank_requests_total{route="/recommend",status="200"}'


def _value(text: str, name: str) -> float:
    """The value of the sample line ``name`` (metric and labels, exactly) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_metrics_are_summed_over_workers(redis_url: str, redis_prefix: str) -> None:
    import redis
    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.service import create_app

    engine = RankingEngine.load(bundle_dir(7))
    cfg = OnlineConfig(namespace=redis_prefix)
    publish(engine, RedisStore(redis_url, redis_prefix), config=cfg)
    users = engine.recommender.user_ids
    rankers = [OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=engine,
                                    follow=False) for _ in range(2)]
    # a long period: the background threads stay idle, the test flushes by hand
    app_a, app_b = (create_app(r, config=cfg, metrics_flush_s=60.0, worker_id=w)
                    for r, w in zip(rankers, ("worker-a", "worker-b"), strict=True))
    direct = redis.Redis.from_url(redis_url)
    try:
        with TestClient(app_a) as a, TestClient(app_b) as b:
            for i in range(3):
                assert a.get("/recommend", params={"user_id": users[i], "k": 5}).status_code == 200
            for i in range(2):
                assert b.get("/recommend", params={"user_id": users[i], "k": 5}).status_code == 200
            assert app_a.state.metrics_flusher.flush_now() and app_b.state.metrics_flusher.flush_now()

            key = RedisStore(redis_url, redis_prefix).keys.metrics
            assert sorted(direct.hkeys(key)) == [b"worker-a", b"worker-b"]
            for client in (a, b):
                text = client.get("/metrics").text
                assert _value(text, RECOMMEND_200) == 5
                assert _value(text, 'apexrank_request_seconds_count{route="/recommend"}') == 5
                assert _value(text, "apexrank_workers") == 2

            # worker b dies: once its snapshot is older than 5 periods it leaves the sum (and the hash)
            old = json.loads(direct.hget(key, "worker-b"))
            direct.hset(key, "worker-b", json.dumps({**old, "at": old["at"] - 5 * 60.0 - 1}))
            text = a.get("/metrics").text
            assert _value(text, RECOMMEND_200) == 3 and _value(text, "apexrank_workers") == 1
            assert direct.hkeys(key) == [b"worker-a"]
            assert _value(b.get("/metrics").text, RECOMMEND_200) == 5  # b's own numbers are live
        assert not direct.hexists(key, "worker-a")  # a clean shutdown removes its snapshot at once
    finally:
        direct.close()
        for r in rankers:
            r.close()


def test_metrics_answer_locally_when_the_store_is_unreachable() -> None:
    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.service import create_app

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    cfg = OnlineConfig(namespace="metricsdown")
    with OnlineRanker.connect(url, namespace="metricsdown", config=cfg,
                              bundle_dir=bundle_dir(7)) as ranker:
        app = create_app(ranker, config=cfg)
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.get("/recommend", params={"user_id": "u1", "k": 5})
            assert r.status_code == 200 and r.json()["degraded"] is True
            assert app.state.metrics_flusher.flush_now() is False
            m = c.get("/metrics")
            assert m.status_code == 200
            assert _value(m.text, RECOMMEND_200) == 1
            assert _value(m.text, "apexrank_degraded_total") == 1
            assert _value(m.text, "apexrank_workers") == 1
