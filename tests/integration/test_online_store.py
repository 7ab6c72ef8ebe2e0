"""The store contract: RedisStore (real server) and InProcessStore pass the same tests."""

from __future__ import annotations

import numpy as np
import pytest

from apex_rank.errors import StoreError
from apex_rank.ranking.online.events import apply_event
from apex_rank.ranking.online.keys import (
    Keys,
    RequestError,
    check_id,
    decode_song_record,
    encode_song_record,
)
from apex_rank.ranking.online.store import InProcessStore, OnlineStore, RedisStore, UserRecord

pytestmark = pytest.mark.integration


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
    k = Keys("prod")
    assert k.current == "apexrank:prod:current"
    assert k.user(7, "u1") == "apexrank:prod:v7:u:u1"
    assert k.songs(7) == "apexrank:prod:v7:songs"
    with pytest.raises(StoreError, match="namespace"):
        Keys("bad ns")


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "u*", "u{1}", "é", "a\nb", None, 5])
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
    store.write_users(v, [("u1", UserRecord(np.ones(2, np.float32), emb[0], ["a"], 1.0))], 60)
    with pytest.raises(StoreError, match="manifest"):
        store.commit(v, None)  # no manifest yet: an incomplete publish is never made current
    store.write_meta(v, {"version": v}, 60)
    assert store.commit(v, None) == (True, None)
    cur, rec = store.read_user(v, "u1")
    assert cur == v and rec is not None
    assert rec.history == ["a"] and np.array_equal(rec.factor, np.ones(2, np.float32))
    assert store.read_user(v, "nobody")[1] is None
    (r, e), (r2, _) = store.read_songs(v, ["b", "zzz"])
    assert decode_song_record(r, "b")["popularity"] == 1.0 and r2 is None
    # compare-and-set: a stale expectation does not move the pointer
    v2 = store.next_version()
    store.write_meta(v2, {"version": v2}, 60)
    assert store.commit(v2, None) == (False, v)
    assert store.current_version() == v


def test_record_event_creates_user_and_streams(store: OnlineStore) -> None:
    v = store.next_version()
    e = np.array([1, 0, 0, 0], np.float32)

    def upd(old: UserRecord | None) -> UserRecord:
        return apply_event(old, "a", e, 1.0, history_len=3, alpha=0.1)

    for _ in range(2):
        eid, new = store.record_event(v, {"u": "new", "s": "a", "k": "play", "t": "1.0", "w": "1"},
                                      "new", upd, 60, 1000)
    assert new.history == ["a"] and new.activity == 2.0
    events = [ev for batch in store.read_events(0) for ev in batch]
    assert [ev.user_id for ev in events] == ["new", "new"] and events[-1].event_id == eid


def test_catalogue_announcements(store: OnlineStore) -> None:
    v = store.next_version()
    start = store.last_catalogue_id()
    store.add_song(v, "s-new", encode_song_record(np.zeros(7), 0, 0, True), np.ones(4), 60)
    rows = store.read_catalogue(start, block_ms=100)
    assert [(s, ver) for _, s, ver in rows] == [("s-new", v)]
    assert store.ingested_ids(v) == ["s-new"]


def test_history_bound_and_profile_norm() -> None:
    rec = None
    for i in range(5):
        rec = apply_event(rec, f"s{i}", np.eye(4, dtype=np.float32)[i % 4] * 3, 1.0,
                          history_len=3, alpha=0.1)
    assert rec is not None and rec.history == ["s2", "s3", "s4"]
    assert abs(float(np.linalg.norm(rec.profile)) - 1.0) < 1e-5
