"""Parity of user state (issue 12): after events recorded online through the real service
(``POST /events``, real Redis), each user's stored state (profile, history with its weights,
activity, latest time, CF factor) equals an offline recompute from the same history, and so it
does on the next version after a publish, whose carry-over replays the events.

The offline recompute is ``Recommender.state_from_history`` over the user's whole history (the
bundle's training rows, then the events): the incremental profile update must land on the
half-life mean of every event the build computes, and a user created by events must get the CF
factor the offline fold-in solves. A user the bundle fitted keeps the bundle's factor."""

from __future__ import annotations

import numpy as np
import pytest

from apex_rank.ranking.online import OnlineConfig, OnlineRanker, RedisStore, publish
from apex_rank.ranking.online.engine import RankingEngine
from apex_rank.ranking.online.events import EVENT_WEIGHTS
from apex_rank.ranking.recommender import Recommender
from apex_rank.ranking.state import UserState

from .online_support import bundle_dir, bundle_world

pytestmark = pytest.mark.integration


def offline_state(rec: Recommender, user: str, history: list[tuple[str, float, float]]) -> UserState:
    """The offline recompute from ``(song, ts, weight)`` rows; a user the bundle fitted keeps
    its factor (the bundle's, as online)."""
    st = rec.state_from_history(user, [s for s, _, _ in history], ts=[t for _, t, _ in history],
                                weights=[w for _, _, w in history])
    if rec.cf.has_user(user):
        return UserState(user, rec.user_state(user).cf_factor, st.profile, st.history, st.activity,
                         st.last_seen_s, st.history_weights)
    return st


def assert_same_state(online: UserState | None, offline: UserState) -> None:
    assert online is not None, f"user {offline.user_id} has no online state"
    where = f"user {offline.user_id}"
    assert online.history == offline.history, where
    np.testing.assert_allclose(online.weights, offline.weights, err_msg=where)
    assert online.activity == offline.activity and online.last_seen_s == offline.last_seen_s, where
    for name in ("profile", "cf_factor"):
        a, b = getattr(online, name), getattr(offline, name)
        assert (a is None) == (b is None), f"{where}: {name} {a} vs {b}"
        if a is not None:
            np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"{where}: {name}")


def test_online_state_equals_an_offline_recompute_before_and_after_a_publish(
        redis_url: str, redis_prefix: str) -> None:
    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.service import create_app

    engine = RankingEngine.load(bundle_dir(7), max_batch=1)
    rec = engine.recommender
    cfg = OnlineConfig(namespace=redis_prefix)
    store = RedisStore(redis_url, redis_prefix)
    publish(engine, store, config=cfg)
    ranker = OnlineRanker(store, config=cfg, engine=engine)

    train = bundle_world(7).interactions
    bundle_users = rec.user_ids[:3]
    warm = [s for s, w in zip(rec.songs.song_ids, rec.songs.warm, strict=True) if w]
    cold = [s for s, w in zip(rec.songs.song_ids, rec.songs.warm, strict=True) if not w]
    t0 = rec.songs.now_s + 3600.0  # online events come after the bundle's data
    plan: dict[str, list[tuple[str, str]]] = {
        "fresh-listener": [(warm[3], "play"), (warm[4], "like"), (warm[5], "skip"), (warm[3], "play"),
                           (cold[0], "play"), (warm[6], "play")],
        "cold-only-listener": [(cold[1], "play"), (cold[2], "like")],  # no CF factor to fold in yet
        "skipper": [(warm[7], "skip")],
    }
    for i, u in enumerate(bundle_users):
        seen = train.filter(train["user_id"] == u)["song_id"].to_list()
        plan[u] = [(seen[0], "like"), (warm[10 + i], "play"), (warm[11 + i], "skip"), (cold[3 + i], "play"),
                   (warm[10 + i], "play")]
    body = []
    for n, (u, evs) in enumerate(plan.items()):
        body += [{"user_id": u, "song_id": s, "kind": k, "ts": t0 + 600.0 * (n + 10 * j)}
                 for j, (s, k) in enumerate(evs)]
    with TestClient(create_app(ranker, config=cfg)) as client:
        half = len(body) // 2  # two requests: a user's state goes through the store in between
        for chunk in (body[:half], body[half:]):
            r = client.post("/events", json={"events": chunk})
            assert r.status_code == 200, r.text

    offline = {}
    for u in plan:
        rows = train.filter(train["user_id"] == u)
        history = [(s, t.timestamp(), w) for s, t, w in
                   zip(rows["song_id"], rows["ts"].dt.replace_time_zone("UTC"), rows["weight"], strict=True)]
        history += [(e["song_id"], e["ts"], EVENT_WEIGHTS[e["kind"]]) for e in body if e["user_id"] == u]
        offline[u] = offline_state(rec, u, history)
    assert offline["fresh-listener"].cf_factor is not None and offline["cold-only-listener"].cf_factor is None
    assert offline["skipper"].profile is None and offline["skipper"].cf_factor is None

    for version in (1, 2):
        if version == 2:
            res = publish(engine, store, config=cfg)  # the same bundle again; the carry-over replays
            assert res.version == 2 and res.replayed_events == len(body)
        for u, want in offline.items():
            assert_same_state(store.read_user(version, u)[1], want)
    ranker.close()
    store.close()
