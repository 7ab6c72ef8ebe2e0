"""Write access of the HTTP service against the real app and Redis (issue 14, point 3, and the
health part of point 5): API keys (401), /recommend open or closed, per-key rate limit and
new-user cap (429 + Retry-After), ``serve`` refusing to bind beyond loopback without a key,
generic 503 bodies, the API docs off by default, and a version whose keys were lost reported
as degraded."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from apex_rank.errors import ConfigError
from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, publish
from apex_rank.ranking.online.access import AccessConfig, KeyRing
from apex_rank.ranking.online.engine import RankingEngine

from .online_support import bundle_dir, free_port

pytestmark = pytest.mark.integration

KEY = "k-" + "a1b2c3d4" * 4
OTHER_KEY = "k-" + "ffffeeee" * 4
AUTH = {"Authorization": f"Bearer {KEY}"}


class Clock:
    """A hand-moved monotonic clock for the quota buckets."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def served(redis_url: str, redis_prefix: str) -> Iterator[dict[str, Any]]:
    """A published bundle and a ranker on it; ``make(access=..., keys=...)`` builds a client."""
    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.service import create_app

    engine = RankingEngine.load(bundle_dir(7))
    cfg = OnlineConfig(namespace=redis_prefix, data_check_s=0.05)
    store = RedisStore(redis_url, redis_prefix)
    publish(engine, store, config=cfg)
    ranker = OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=engine,
                                  follow=False)
    clients: list[Any] = []

    def make(access: AccessConfig | None = None, keys: tuple[str, ...] = (KEY,)) -> Any:
        c_cfg = replace(cfg, access=access or AccessConfig())
        app = create_app(ranker, config=c_cfg, keys=KeyRing.from_keys(keys))
        app.state.access.clock = Clock()
        c = TestClient(app, raise_server_exceptions=False)
        c.__enter__()
        clients.append(c)
        return c

    try:
        yield {"make": make, "engine": engine, "store": store, "cfg": cfg, "ranker": ranker,
               "song": engine.recommender.songs.song_ids[0], "user": engine.recommender.user_ids[0]}
    finally:
        for c in clients:
            c.__exit__(None, None, None)
        ranker.close()
        store.close()


def _event(user: str, song: str) -> dict[str, Any]:
    return {"events": [{"user_id": user, "song_id": song}]}


def test_writes_need_the_key_and_recommend_stays_open(served: dict[str, Any]) -> None:
    c = served["make"]()
    song, user = served["song"], served["user"]
    r = c.post("/events", json=_event(user, song))
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert "API key" in r.json()["detail"]
    for header in (f"Bearer {OTHER_KEY}", f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer ", ""):
        r = c.post("/events", json=_event(user, song), headers={"Authorization": header})
        assert r.status_code == 401, header
        assert 'error="invalid_token"' in r.headers["www-authenticate"], header
    r = c.post("/songs", json={"song_id": "new-song", "embedding": [0.1] * 32})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert served["store"].read_songs(served["ranker"].version, ["new-song"]) == [(None, None)]

    r = c.post("/events", json=_event(user, song), headers=AUTH)
    assert r.status_code == 200, r.text
    r = c.post("/events", json=_event(user, song), headers={"authorization": f"bearer  {KEY} "})
    assert r.status_code == 200, r.text  # scheme is case-insensitive, spaces around are ignored
    assert c.get("/recommend", params={"user_id": user, "k": 5}).status_code == 200
    assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    text = c.get("/metrics").text
    assert 'apexrank_requests_total{route="/events",status="401"} 7' in text


def test_recommend_can_be_closed(served: dict[str, Any]) -> None:
    c = served["make"](AccessConfig(protect_recommend=True))
    params = {"user_id": served["user"], "k": 5}
    r = c.get("/recommend", params=params)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert c.get("/recommend", params=params,
                 headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 401
    assert c.get("/recommend", params=params, headers=AUTH).status_code == 200
    assert c.get("/health").status_code == 200  # health and metrics stay open
    with pytest.raises(ConfigError, match="protect_recommend needs an API key"):
        served["make"](AccessConfig(protect_recommend=True), keys=())


def test_without_a_key_writes_are_open_but_quotas_apply(served: dict[str, Any]) -> None:
    c = served["make"](AccessConfig(rate_per_s=1.0, burst=2), keys=())
    song, user = served["song"], served["user"]
    assert c.post("/events", json=_event(user, song)).status_code == 200
    assert c.post("/events", json=_event(user, song)).status_code == 200
    r = c.post("/events", json=_event(user, song))
    assert r.status_code == 429 and r.headers["retry-after"] == "1"


def test_rate_limit_per_key_is_429_with_retry_after(served: dict[str, Any]) -> None:
    c = served["make"](AccessConfig(rate_per_s=0.5, burst=3), keys=(KEY, OTHER_KEY))
    clock = c.app.state.access.clock
    song, user = served["song"], served["user"]
    for _ in range(3):  # the burst; a refused (422) request counts like any other
        assert c.post("/events", json={"events": []}, headers=AUTH).status_code == 422
    r = c.post("/events", json=_event(user, song), headers=AUTH)
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "2"  # one token at 0.5/s
    assert "rate limit of 0.5 requests/s (burst 3)" in r.json()["detail"]
    assert c.post("/songs", json={}, headers=AUTH).status_code == 429  # one bucket per key
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert c.post("/events", json=_event(user, song), headers=other).status_code == 200  # its own
    assert c.get("/recommend", params={"user_id": user, "k": 3}).status_code == 200  # open: free
    clock.t += 1.0
    r = c.post("/events", json=_event(user, song), headers=AUTH)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    clock.t += 1.0
    assert c.post("/events", json=_event(user, song), headers=AUTH).status_code == 200
    assert 'route="/events",status="429"' in c.get("/metrics").text


def test_new_user_cap_is_429_with_retry_after(served: dict[str, Any]) -> None:
    c = served["make"](AccessConfig(new_users_per_min=3, rate_per_s=0))
    clock = c.app.state.access.clock
    song, known = served["song"], served["user"]
    for _ in range(5):  # events of a known user create nobody: the cap does not move
        assert c.post("/events", json=_event(known, song), headers=AUTH).status_code == 200

    def new_users(*names: str) -> Any:
        return c.post("/events", headers=AUTH,
                      json={"events": [{"user_id": n, "song_id": song} for n in names]})

    r = new_users("fresh-1", "fresh-2", "fresh-1")  # 2 created
    assert r.status_code == 200 and [e["created"] for e in r.json()["events"]] == [True, True, False]
    r = new_users("fresh-3", "fresh-4")  # 1 left: passes, and the request is recorded whole
    assert r.status_code == 200 and r.json()["recorded"] == 2
    r = new_users("fresh-5")  # 1 user over the cap: 2 tokens missing at 3/min = 40 s
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "40" and "3 new users per minute" in r.json()["detail"]
    version = served["ranker"].version
    assert served["store"].read_user(version, "fresh-5")[1] is None  # nothing written
    clock.t += 39.0
    assert new_users("fresh-5").status_code == 429
    clock.t += 1.0
    assert new_users("fresh-5").status_code == 200


def test_serve_refuses_a_public_host_without_a_key(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Any) -> None:
    from apex_rank.cli.main import main

    monkeypatch.delenv("APEX_RANK_API_KEY", raising=False)
    monkeypatch.delenv("APEX_RANK_API_KEY_FILE", raising=False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        assert main(["serve", "--host", host, "--port", str(free_port())]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith("apex-rank serve: error: --host ") and "--insecure" in err

    short = tmp_path / "short.key"
    short.write_text("abc\n")
    assert main(["serve", "--host", "0.0.0.0", "--api-key-file", str(short)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "16-256 visible ASCII" in err and "abc" not in err
    assert main(["serve", "--api-key-file", str(tmp_path / "none.key")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--protect-recommend"]) == 2
    assert "protect_recommend needs an API key" in capsys.readouterr().err


def test_503_bodies_are_generic_and_the_log_has_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.service import create_app

    port = free_port()  # nothing listens there
    url = f"redis://127.0.0.1:{port}/0"
    cfg = OnlineConfig(namespace="nodata")
    with OnlineRanker.connect(url, namespace="nodata", config=cfg, bundle_dir=bundle_dir(7),
                              follow=False) as ranker:
        app = create_app(ranker, config=cfg, keys=KeyRing())
        caplog.set_level(logging.WARNING)
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.post("/events", json=_event("u1", "s1"))
            assert r.status_code == 503 and r.json() == {"detail": "store unavailable"}
            r = c.post("/songs", json={"song_id": "n1", "embedding": [0.5] * 32})
            assert r.status_code == 503 and r.json() == {"detail": "store unavailable"}
            h = c.get("/health").json()
            assert h["status"] == "degraded" and h["store_reachable"] is False
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert f"127.0.0.1:{port}" in logged and "apexrank:nodata:{nodata}:current" in logged


def test_api_docs_are_off_unless_asked_for(served: dict[str, Any]) -> None:
    c = served["make"]()
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert c.get(path).status_code == 404, path
    d = served["make"](AccessConfig(docs=True))
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert d.get(path).status_code == 200, path
    assert {"/recommend", "/events", "/songs"} <= set(d.get("/openapi.json").json()["paths"])


def _delete(store: RedisStore, pattern: str) -> None:
    keys = list(store.client.scan_iter(match=pattern, count=1000))
    if keys:
        store.client.delete(*keys)


def test_lost_data_is_degraded_in_recommend_and_health(served: dict[str, Any],
                                                       redis_prefix: str) -> None:
    import time

    c = served["make"]()
    store, user = served["store"], served["user"]
    params = {"user_id": user, "k": 5}
    before = c.get("/recommend", params=params).json()
    assert before["degraded"] is False and {i["source"] for i in before["items"]} != {"fallback"}
    h = c.get("/health").json()
    assert h["status"] == "ok" and h["version_keys_present"] is True

    # a Redis restart without persistence: every key of the namespace gone (own prefix only)
    _delete(store, f"apexrank:{redis_prefix}:*")
    r = c.get("/recommend", params=params).json()
    assert r["degraded"] is True  # at once: the pointer read comes with the user's state
    h = c.get("/health").json()
    assert h["status"] == "degraded" and h["store_reachable"] is True
    assert h["version_keys_present"] is False

    # republished (the version counter was lost too, so it may get the same number)
    publish(served["engine"], store, config=served["cfg"])
    time.sleep(0.1)  # data_check_s = 0.05
    assert c.get("/recommend", params=params).json()["degraded"] is False
    assert c.get("/health").json()["status"] == "ok"

    # the pointer survives but the version's records were evicted: found by the periodic check
    version = store.current_version()
    assert version is not None
    _delete(store, f"apexrank:{redis_prefix}:v{version}:*")
    time.sleep(0.1)
    c.get("/recommend", params=params)  # this one runs the check
    r = c.get("/recommend", params=params).json()
    assert r["degraded"] is True and r["model_version"] == str(version)
    assert c.get("/health").json()["version_keys_present"] is False
    assert "apexrank_degraded_total" in c.get("/metrics").text


def test_serve_config_from_toml_and_flags(tmp_path: Any) -> None:
    import json

    from apex_rank.cli.main import build_parser
    from apex_rank.cli.serve_cmds import serve_config
    from apex_rank.config import from_dict, to_dict

    toml = tmp_path / "serve.toml"
    toml.write_text('[online]\nnamespace = "prod"\n\n[online.access]\nrate_per_s = 5.0\n'
                    'burst = 7\nprotect_recommend = true\n')
    args = build_parser().parse_args(["serve", "--config", str(toml), "--burst", "9", "--docs"])
    cfg = serve_config(args)
    assert cfg.namespace == "prod" and cfg.budget_ms == 50.0
    assert cfg.access == AccessConfig(rate_per_s=5.0, burst=9, protect_recommend=True, docs=True)
    # what serve hands its workers ($APEX_RANK_ONLINE_CONFIG) reads back equal
    assert from_dict(OnlineConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    toml.write_text("[online.access]\nrate_per_sec = 5.0\n")
    with pytest.raises(ConfigError, match="rate_per_sec"):
        serve_config(build_parser().parse_args(["serve", "--config", str(toml)]))
