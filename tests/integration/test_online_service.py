"""The HTTP service against bad input (real Redis): 4xx with a reason, never 5xx; health,
metrics and the OpenAPI schema."""

from __future__ import annotations

import numpy as np
import pytest

from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, publish
from apex_rank.ranking.online.engine import RankingEngine

from .online_support import bundle_dir

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(redis_url: str, redis_prefix: str):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.service import create_app

    engine = RankingEngine.load(bundle_dir(7))
    cfg = OnlineConfig(namespace=redis_prefix, max_k=200, max_body_bytes=16 * 1024)
    publish(engine, RedisStore(redis_url, redis_prefix), config=cfg)
    ranker = OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=engine,
                                  follow=False)
    with TestClient(create_app(ranker, config=cfg), raise_server_exceptions=False) as c:
        c.engine = engine  # type: ignore[attr-defined]
        yield c
    ranker.close()


@pytest.mark.parametrize("params, status", [
    ({"user_id": "u 1"}, 422), ({"user_id": ""}, 422), ({"user_id": "x" * 200}, 422),
    ({"user_id": "u{1}*"}, 422), ({}, 422), ({"user_id": "u1", "k": 0}, 422),
    ({"user_id": "u1", "k": -3}, 422), ({"user_id": "u1", "k": 10**9}, 422),
    ({"user_id": "u1", "k": "ten"}, 422), ({"user_id": "u1", "exclude": "ok,bad id"}, 422),
    ({"user_id": "u1", "cold_share": 1.5}, 422), ({"user_id": "u1", "cold_share": -0.1}, 422),
    ({"user_id": "u1", "cold_share": "some"}, 422), ({"user_id": "u1", "cold_share": "nan"}, 422),
])
def test_bad_recommend_requests_are_4xx(client, params: dict, status: int) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/recommend", params=params)
    assert r.status_code == status, r.text
    assert "detail" in r.json()


def test_k_at_the_limit_and_unknown_user(client) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/recommend", params={"user_id": "somebody-new", "k": 200})
    assert r.status_code == 200
    body = r.json()
    assert len(body["items"]) == 200 and body["degraded"] is False
    assert {i["source"] for i in body["items"]} == {"fallback"}  # cold-user path


def test_cold_share_over_http_equals_the_recommender(client) -> None:  # type: ignore[no-untyped-def]
    rec = client.engine.recommender
    u = rec.user_ids[0]
    r = client.get("/recommend", params={"user_id": u, "k": 10, "cold_share": 0.3})
    assert r.status_code == 200, r.text
    body = r.json()
    want = rec.recommend(u, k=10, cold_share=0.3)
    assert [i["song_id"] for i in body["items"]] == want["song_id"].to_list()
    assert int(want["is_cold"].sum()) == 3 and body["cold_shortfall"] == 0
    assert "cold_shortfall" not in client.get("/recommend", params={"user_id": u, "k": 10}).json()


def test_bad_events_and_unknown_song(client) -> None:  # type: ignore[no-untyped-def]
    song = client.engine.recommender.songs.song_ids[0]
    cases = [
        ({"events": []}, 422),
        ({"events": [{"user_id": "u 1", "song_id": song}]}, 422),
        ({"events": [{"user_id": "u1", "song_id": song, "kind": "teleport"}]}, 422),
        ({"events": [{"user_id": "u1", "song_id": song, "ts": -5}]}, 422),
        ({"events": [{"user_id": "u1", "song_id": "no-such-song"}]}, 404),
        ({"nope": 1}, 422),
    ]
    for body, status in cases:
        r = client.post("/events", json=body)
        assert r.status_code == status, (body, r.text)
        assert "detail" in r.json()
    r = client.post("/events", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/events", json={"events": [{"user_id": "brand-new-user", "song_id": song}]})
    assert r.status_code == 200 and r.json()["events"][0]["created"] is True
    rec = client.get("/recommend", params={"user_id": "brand-new-user", "k": 10}).json()
    assert song not in [i["song_id"] for i in rec["items"]]
    assert {i["source"] for i in rec["items"]} != {"fallback"}  # now a known (content) user


def test_oversized_bodies_are_413(client) -> None:  # type: ignore[no-untyped-def]
    big = {"events": [{"user_id": "u1", "song_id": "s" * 100}] * 400}
    r = client.post("/events", json=big)
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b" " * 1024

    r = client.post("/events", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413

    def small():  # type: ignore[no-untyped-def]  # chunked and under the limit: handled normally
        yield b'{"events": [{"user_id": "u-chunked", '
        yield ('"song_id": "' + client.engine.recommender.songs.song_ids[0] + '"}]}').encode()

    r = client.post("/events", content=small(), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["recorded"] == 1


def test_malformed_length_is_400_and_a_crash_is_a_plain_500(client) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    app = client.app
    sent: list[dict] = []

    async def call(scope: dict) -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg: dict) -> None:
            sent.append(msg)

        await app(scope, receive, send)

    scope = {"type": "http", "method": "POST", "path": "/events", "raw_path": b"/events",
             "query_string": b"", "headers": [(b"content-length", b"12abc")], "http_version": "1.1",
             "scheme": "http", "server": ("t", 80), "client": ("t", 1), "root_path": "",
             "app": app}
    asyncio.run(call(scope))
    assert sent[0]["status"] == 400 and b"Content-Length" in sent[1]["body"]

    ranker = app.state.ranker

    def boom(*a, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("bug")

    ranker.rank, real = boom, ranker.rank
    try:
        r = client.get("/recommend", params={"user_id": "u1"})
    finally:
        ranker.rank = real
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}
    assert 'apexrank_requests_total{route="/recommend",status="500"} 1' in client.get("/metrics").text


def test_songs_endpoint(client) -> None:  # type: ignore[no-untyped-def]
    d = client.engine.embedding_dim
    emb = np.random.default_rng(0).normal(size=d).tolist()
    assert client.post("/songs", json={"song_id": "bad id", "embedding": emb}).status_code == 422
    assert client.post("/songs", json={"song_id": "n1", "embedding": emb[:-1]}).status_code == 422
    assert client.post("/songs", json={"song_id": "n1", "embedding": []}).status_code == 422
    r = client.post("/songs", json={"song_id": "n1", "embedding": emb})
    assert r.status_code == 200, r.text
    assert len(r.json()["priors"]) == 7
    dup = client.post("/songs", json={"song_id": "n1", "embedding": emb})
    assert dup.status_code == 422 and "already exists" in dup.json()["detail"]


def test_health_metrics_openapi(client) -> None:  # type: ignore[no-untyped-def]
    client.get("/recommend", params={"user_id": "u1", "k": 3})
    client.get("/recommend", params={"user_id": "bad id"})
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["store_reachable"] is True
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert 'apexrank_requests_total{route="/recommend",status="200"}' in m.text
    assert 'apexrank_errors_total{route="/recommend"}' in m.text
    assert "apexrank_request_seconds_bucket" in m.text and "apexrank_degraded_total 0" in m.text
    assert client.get("/openapi.json").status_code == 404  # off unless access.docs
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.access import AccessConfig
    from apex_rank.ranking.online.service import create_app

    ranker = client.app.state.ranker
    cfg = replace(ranker.config, access=AccessConfig(docs=True))
    with TestClient(create_app(ranker, config=cfg)) as docs:
        spec = docs.get("/openapi.json").json()
    assert {"/recommend", "/events", "/songs", "/health", "/metrics"} <= set(spec["paths"])
