"""The store contract: RedisStore (real server) and InProcessStore pass the same tests."""

from __future__ import annotations

import numpy as np
import pytest

from apex_rank.errors import RequestError, StoreError
from apex_rank.ranking.online.events import EventUpdate
from apex_rank.ranking.online.keys import (
    Keys,
    check_id,
    decode_song_record,
    encode_song_record,
)
from apex_rank.ranking.online.memory_store import InProcessStore
from apex_rank.ranking.online.redis_store import RedisStore
from apex_rank.ranking.online.store import OnlineStore
from apex_rank.ranking.state import UserState

pytestmark = pytest.mark.integration


def play(uid: str, old: UserState | None, song: str, emb: np.ndarray, ts: float = float("nan")) -> UserState:
    """``old`` after one play of ``song`` (the update record_many applies, history bound 3)."""
    return EventUpdate(history_len=3).step(uid, old, song, emb, 1.0, ts)


@pytest.fixture(params=["redis", "in-process"])
def store(request: pytest.FixtureRequest) -> OnlineStore:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        ns = request.getfixturevalue("redis_prefix")
        s: OnlineStore = RedisStore(url, ns, timeout_s=2.0)
    else:
        s = InProcessStore("mem")
    yield s
    s.close()


def test_key_format_is_versioned_and_documented() -> None:
    """Schema 2: hash tags put the namespace's keys in one slot and each user's in another; every
    key of a version still matches ``apexrank:<NS>:v<V>:*``."""
    from redis.crc import key_slot

    k = Keys("prod")
    assert k.current == "apexrank:prod:{prod}:current"
    assert k.user(7, "u1") == "apexrank:prod:v7:u:{u1}"
    assert k.songs(7) == "apexrank:prod:v7:{prod}:songs"
    namespace_slot = {key_slot(x.encode()) for x in (k.current, k.seq, k.events, k.catalogue, k.warm_log,
                                                      k.metrics, k.meta(7), k.songs(7), k.emb(7),
                                                      k.ingested(7), k.warm(7), k.meta(8))}
    assert len(namespace_slot) == 1
    assert key_slot(k.user(7, "u1").encode()) == key_slot(k.user(8, "u1").encode()) == key_slot(b"u1")
    assert all(x.startswith(k.version_prefix(7)) for x in (k.meta(7), k.warm(7), k.user(7, "u1")))
    with pytest.raises(StoreError, match="namespace"):
        Keys("bad ns")


def test_a_namespace_of_key_schema_1_is_reported_not_read(redis_url: str, redis_prefix: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Data written under schema 1 (keys without hash tags) is not read: the store reports
    nothing published, logs once that the namespace must be published again, and publishes."""
    import logging

    import redis

    client = redis.Redis.from_url(redis_url)
    client.set(f"apexrank:{redis_prefix}:current", "3", ex=60)  # schema 1's pointer
    client.close()
    store = RedisStore(redis_url, redis_prefix)
    with caplog.at_level(logging.WARNING):
        assert store.current_version() is None and store.current_version() is None
    said = [r.getMessage() for r in caplog.records if "key schema 1" in r.getMessage()]
    assert len(said) == 1 and "publish the bundle again" in said[0]
    assert _publish_empty(store) == 1 and store.current_version() == 1
    store.close()


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "u*", "u{1}", "é", "a\nb", "u1\n", None, 5])
def test_malformed_ids_are_refused(bad: object) -> None:
    with pytest.raises(RequestError, match="not a valid id"):
        check_id(bad, "user_id")


def test_song_record_roundtrip() -> None:
    priors = np.arange(7, dtype=np.float32)
    rec = decode_song_record(encode_song_record(priors, 12.0, 3.5, True), "x")
    assert np.array_equal(rec["priors"], priors)
    assert rec["popularity"] == 12.0 and rec["age_days"] == 3.5 and rec["is_cold"] is True
    assert len(encode_song_record(priors, 0, 0, False)) == 40


def test_publish_commit_read_cycle(store: OnlineStore) -> None:
    assert store.current_version() is None
    v = store.next_version()
    emb = np.eye(3, 4, dtype=np.float32)
    recs = [encode_song_record(np.full(7, i, np.float32), i, 1.0, False) for i in range(3)]
    store.write_songs(v, ["a", "b", "c"], recs, emb, 60)
    store.write_users(v, [("u1", UserState("u1", np.ones(2, np.float32), emb[0], ("a",), 1))], 60)
    with pytest.raises(StoreError, match="manifest"):
        store.commit(v, None)  # no manifest yet: an incomplete publish is never made current
    store.write_meta(v, {"version": v}, 60)
    res = store.commit(v, None)
    assert res.moved and res.before is None
    cur, rec = store.read_user(v, "u1")
    assert cur == v and rec is not None
    assert rec.history == ("a",) and np.array_equal(rec.cf_factor, np.ones(2, np.float32))
    assert store.read_user(v, "nobody")[1] is None
    (r, e), (r2, _) = store.read_songs(v, ["b", "zzz"])
    assert decode_song_record(r, "b")["popularity"] == 1.0 and r2 is None
    # compare-and-set: a stale expectation does not move the pointer
    v2 = store.next_version()
    store.write_meta(v2, {"version": v2}, 60)
    assert store.commit(v2, None)[:2] == (False, v)
    assert store.current_version() == v


def _publish_empty(store: OnlineStore) -> int:
    v = store.next_version()
    store.write_meta(v, {"version": v}, 60)
    assert store.commit(v, store.current_version()).moved
    return v


def test_record_event_creates_user_and_streams(store: OnlineStore) -> None:
    v = _publish_empty(store)
    e = np.array([1, 0, 0, 0], np.float32)

    def upd(old: UserState | None) -> UserState:
        return play("new", old, "a", e)

    for _ in range(2):
        eid, new = store.record_event(v, {"u": "new", "s": "a", "k": "play", "t": "1.0", "w": "1"},
                                      "new", upd, 60, 1000)
    assert new.history == ("a",) and new.activity == 2
    assert np.isnan(new.last_seen_s)  # no ts given: unknown, and stored as absent
    events = [ev for batch in store.read_events(0) for ev in batch]
    assert [ev.user_id for ev in events] == ["new", "new"] and events[-1].event_id == eid
    _, new = store.record_event(v, {"u": "new", "s": "a", "k": "play", "t": "1.7e9", "w": "1"}, "new",
                                lambda old: play("new", old, "a", e, 1.7e9), 60, 1000)
    assert new.last_seen_s == 1.7e9
    assert store.read_user(v, "new")[1].last_seen_s == 1.7e9  # the latest interaction time round-trips


def test_record_events_is_all_or_nothing(store: OnlineStore) -> None:
    """record_events writes every user and every event of a batch, or, when the update fails for
    one user, nothing at all (neither the users before it nor the stream)."""
    v = _publish_empty(store)
    e = np.array([1, 0, 0, 0], np.float32)
    ev = [{"u": u, "s": "a", "k": "play", "t": "1.7e9", "w": "1"} for u in ("p", "q", "p")]

    def upd(uid: str, old: UserState | None) -> UserState:
        rec = old
        for _ in range(2 if uid == "p" else 1):
            rec = play(uid, rec, "a", e, 1.7e9)
        assert rec is not None
        return rec

    def fails_on_q(uid: str, old: UserState | None) -> UserState:
        if uid == "q":
            raise RuntimeError("update failed")
        return upd(uid, old)

    with pytest.raises(RuntimeError, match="update failed"):
        store.record_events(v, ev, ["p", "q", "p"], fails_on_q, 60, 1000)
    assert store.read_user(v, "p")[1] is None and [x for b in store.read_events(0) for x in b] == []
    ids, new = store.record_events(v, ev, ["p", "q", "p"], upd, 60, 1000)
    assert len(ids) == 3 and sorted(new) == ["p", "q"] and new["p"].activity == 2
    got = [x for b in store.read_events(0) for x in b]
    assert [x.event_id for x in got] == ids and [x.user_id for x in got] == ["p", "q", "p"]
    assert store.read_user(v, "q")[1].activity == 1
    assert store.record_events(v, [], [], upd, 60, 1000) == ([], {})


def test_catalogue_announcements(store: OnlineStore) -> None:
    v = _publish_empty(store)
    start = store.last_catalogue_id()
    store.add_song(v, "s-new", encode_song_record(np.zeros(7), 0, 0, True), np.ones(4), 60)
    rows = store.read_catalogue(start, block_ms=100)
    assert [(s, ver) for _, s, ver in rows] == [("s-new", v)]
    assert store.ingested_ids(v) == ["s-new"]


def test_history_bound_and_profile_norm() -> None:
    rec = None
    for i in range(5):
        rec = play("u", rec, f"s{i}", np.eye(4, dtype=np.float32)[i % 4] * 3, 1.7e9 + i)
    assert rec is not None and rec.history == ("s2", "s3", "s4") and rec.history_weights == (1.0, 1.0, 1.0)
    assert abs(float(np.linalg.norm(rec.profile)) - 1.0) < 1e-5


def test_last_seen_is_the_latest_event_time_whatever_the_arrival_order() -> None:
    """Song ages are measured from the user's latest interaction (ranking.rerank_features age_days):
    a late-arriving older event must not move it back."""
    e = np.ones(4, np.float32)
    rec = play("u", None, "a", e, 200.0)
    rec = play("u", rec, "b", e, 100.0)
    assert rec.last_seen_s == 200.0
    rec = play("u", rec, "c", e, 300.0)
    assert rec.last_seen_s == 300.0


def test_writes_to_a_replaced_version_are_refused(store: OnlineStore) -> None:
    """record_event / add_song / update_users(require_current) write only while their version is
    current: a publish that moved the pointer in between sends the caller to the new version."""
    from apex_rank.errors import VersionMovedError

    old = _publish_empty(store)
    new = _publish_empty(store)
    e = np.array([1, 0, 0, 0], np.float32)

    def upd(prev: UserState | None) -> UserState:
        return play("x", prev, "a", e)

    ev = {"u": "x", "s": "a", "k": "play", "t": "1.0", "w": "1"}
    with pytest.raises(VersionMovedError, match=f"version {old} is no longer current"):
        store.record_event(old, ev, "x", upd, 60, 1000)
    with pytest.raises(VersionMovedError):
        store.add_song(old, "s1", encode_song_record(np.zeros(7), 0, 0, True), e, 60)
    with pytest.raises(VersionMovedError):
        store.update_users(old, ["x"], lambda u, r: upd(r), 60, require_current=True)
    assert store.read_user(old, "x")[1] is None and store.ingested_ids(old) == []
    assert [ev for b in store.read_events(0) for ev in b] == []  # nothing half-written
    # staging writes (require_current=False) go to any version
    store.update_users(old, ["x"], lambda u, r: upd(r), 60, require_current=False)
    assert store.read_user(old, "x")[1].history == ("a",)
    store.add_song(old, "s1", encode_song_record(np.zeros(7), 0, 0, True), e, 60, require_current=False)
    assert store.ingested_ids(old) == ["s1"]
    eid, _ = store.record_event(new, ev, "x", upd, 60, 1000)
    # the commit reports the stream positions at the moment the pointer moved
    v3 = store.next_version()
    store.write_meta(v3, {"version": v3}, 60)
    res = store.commit(v3, new)
    assert res.moved and res.events_mark == eid and res.catalogue_mark == store.last_catalogue_id()


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("rediss://app:s3cret@h:6380/1?ssl_ca_certs=/etc/ca.pem&password=s3cret",
     "rediss://h:6380/1?ssl_ca_certs=/etc/ca.pem&password=***"),
    ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
])
def test_urls_in_messages_hide_credentials(url: str, shown: str) -> None:
    from apex_rank.ranking.online.redis_store import redact_url

    assert redact_url(url) == shown


def test_malformed_store_urls_fail_at_construction() -> None:
    with pytest.raises(StoreError, match="not a rediss:// URL"):
        RedisStore("redis://127.0.0.1:6379/0?ssl_ca_certs=/etc/ca.pem", "x")
    with pytest.raises(StoreError, match="must start with redis://"):
        RedisStore("http://127.0.0.1:6379/0", "x")


def test_warm_write_read_and_log(store: OnlineStore) -> None:
    """write_warm stores warm records and users' factors (the rest of a state kept) in one
    transaction, announces the songs on the warm log, and refuses a version that moved."""
    from apex_rank.errors import VersionMovedError
    from apex_rank.ranking.online.keys import decode_warm_song, encode_warm_song

    v = _publish_empty(store)
    e = np.array([1, 0, 0, 0], np.float32)
    store.record_event(v, {"u": "p", "s": "a", "k": "play", "t": "1.7e9", "w": "1"}, "p",
                       lambda old: play("p", old, "a", e, 1.7e9), 60, 1000)
    events, last = store.read_new_events("0-0", count=10)
    assert [x.user_id for x in events] == ["p"] and last == events[0].event_id == store.last_event_id()
    assert store.read_new_events(last, block_ms=10) == ([], last)
    assert store.last_warm_id() == "0-0"
    f = np.array([0.5, -1.0], np.float32)
    store.write_warm(v, [("s1", encode_warm_song(f, 3)), ("s2", encode_warm_song(-f, 1))], {"p": f},
                     60, require_current=True)
    back = store.read_warm(v)
    assert sorted(back) == ["s1", "s2"] and store.read_warm(v, ["s2", "nope"]).keys() == {"s2"}
    factor, plays = decode_warm_song(back["s1"], "s1")
    assert np.array_equal(factor, f) and plays == 3.0
    rec = store.read_user(v, "p")[1]
    assert np.array_equal(rec.cf_factor, f) and rec.history == ("a",) and rec.last_seen_s == 1.7e9
    (eid, songs, ver), = store.read_warm_log("0-0")
    assert (songs, ver) == (["s1", "s2"], v) and store.last_warm_id() == eid
    _publish_empty(store)
    with pytest.raises(VersionMovedError, match="no longer current"):
        store.write_warm(v, [("s3", encode_warm_song(f, 1))], {}, 60, require_current=True)
    assert "s3" not in store.read_warm(v) and store.read_warm_log(eid) == []


def test_worker_metrics_are_stamped_with_the_store_clock_and_dropped_by_name(store: OnlineStore) -> None:
    import json
    import time

    store.write_worker_metrics("w1", {"requests": 3})
    store.write_worker_metrics("w2", {"requests": 5})
    now, raws = store.read_worker_metrics()
    assert abs(now - time.time()) < 5  # the local Redis and this process share a clock
    snaps = {w: json.loads(raw) for w, raw in raws.items()}
    assert snaps["w1"]["requests"] == 3 and snaps["w2"]["requests"] == 5
    assert 0 <= now - snaps["w1"]["at"] < 5
    store.drop_worker_metrics(["w1"])
    assert set(store.read_worker_metrics()[1]) == {"w2"}
