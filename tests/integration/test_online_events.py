"""Events on real Redis (and the in-process store where both apply): recorded events export to
parquet (CLI) with the interactions contract, ``--since`` filters by stream time; a batch is
checked whole before anything is written (a bad event names its index; user state and stream
are untouched), ``ts`` must be seconds in [2000-01-01, now + 1 day], a 1000-event batch equals
1000 single records and costs as many round trips as one event, ``export-events`` skips and
reports rows an older writer left unusable, and ``/songs`` refuses values that overflow float32
or give non-finite priors (issue 14, points 2 and 4)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from apex_rank.errors import StoreError, UnknownIdError
from apex_rank.ranking.online import (
    InProcessStore,
    Interaction,
    OnlineConfig,
    OnlineRanker,
    OnlineStore,
    RedisStore,
    RequestError,
    export_events,
    publish,
    record,
    record_many,
)
from apex_rank.ranking.online.engine import RankingEngine
from apex_rank.ranking.online.events import check_ts
from apex_rank.ranking.online.keys import encode_song_record
from apex_rank.schemas import validate_interactions

from .online_support import bundle_dir

pytestmark = pytest.mark.integration

NOW = time.time()
SONGS = [f"s{i:03d}" for i in range(20)]


@pytest.fixture(params=["redis", "in-process"])
def store(request: pytest.FixtureRequest) -> Iterator[OnlineStore]:
    if request.param == "redis":
        s: OnlineStore = RedisStore(request.getfixturevalue("redis_url"),
                                    request.getfixturevalue("redis_prefix"), timeout_s=5.0)
    else:
        s = InProcessStore("mem")
    yield s
    s.close()


def _publish_songs(store: OnlineStore, dim: int = 8) -> int:
    """A current version holding ``SONGS`` with random embeddings (no bundle needed)."""
    v = store.next_version()
    emb = np.random.default_rng(v).normal(size=(len(SONGS), dim)).astype(np.float32)
    store.write_songs(v, SONGS, [encode_song_record(np.zeros(7), 0, 0, True)] * len(SONGS), emb, 600)
    store.write_meta(v, {"version": v}, 600)
    assert store.commit(v, store.current_version()).moved
    return v


def _stream(store: OnlineStore) -> list[tuple[str, str, str, float]]:
    return [(e.user_id, e.song_id, e.kind, e.ts) for b in store.read_events(0) for e in b]


def _state(store: OnlineStore, version: int, user: str) -> tuple[Any, ...] | None:
    rec = store.read_user(version, user)[1]
    if rec is None:
        return None
    return (rec.history, rec.activity, rec.last_seen_s,
            None if rec.profile is None else rec.profile.tobytes())


def test_export_events_cli(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    from apex_rank.cli.main import main

    engine = RankingEngine.load(bundle_dir(7))
    store = RedisStore(redis_url, redis_prefix)
    cfg = OnlineConfig(namespace=redis_prefix)
    with pytest.raises(StoreError, match="nothing is published"):
        record(store, "u1", "s000001", config=cfg)
    publish(engine, store, config=cfg)
    songs = engine.recommender.songs.song_ids
    record(store, "u1", songs[0], "play", 1_750_000_000.0, config=cfg)
    record(store, "u2", songs[1], "like", 1_750_000_100.0, config=cfg)
    time.sleep(0.01)
    cut = time.time()
    time.sleep(0.01)
    record(store, "u3", songs[2], "skip", config=cfg)
    with pytest.raises(UnknownIdError, match="not in the catalogue"):
        record(store, "u1", "no-such-song", config=cfg)
    with pytest.raises(RequestError, match="kind"):
        record(store, "u1", songs[0], "teleport", config=cfg)

    out = tmp_path / "events.parquet"
    assert main(["export-events", "--redis", redis_url, "--namespace", redis_prefix, "--out", str(out)]) == 0
    df = pl.read_parquet(out)
    assert df["user_id"].to_list() == ["u1", "u2", "u3"]
    assert df["kind"].to_list() == ["play", "like", "skip"] and df["weight"].to_list() == [1.0, 2.0, 0.0]
    validate_interactions(df.select("user_id", "song_id", "ts", "weight"))  # the interactions contract
    assert df["ts"][0].timestamp() == pytest.approx(1_750_000_000.0, abs=1)

    later = tmp_path / "later.parquet"
    assert main(["export-events", "--redis", redis_url, "--namespace", redis_prefix,
                 "--since", str(cut), "--out", str(later)]) == 0
    assert pl.read_parquet(later)["user_id"].to_list() == ["u3"]


@pytest.mark.parametrize(("bad", "error", "match"), [
    (Interaction("u1", "nosuchsong"), UnknownIdError, r"event 1: song_id 'nosuchsong' is not in"),
    (Interaction("u1", "s001", "teleport"), RequestError, r"event 1: kind 'teleport' is not one of"),
    (Interaction("u1", "s001", "play", 1.7e12), RequestError, r"event 1: ts .* milliseconds"),
    (Interaction("u 1", "s001"), RequestError, r"event 1: user_id 'u 1' is not a valid id"),
    (Interaction("u2", "s001", "play", True), RequestError, r"event 1: ts must be a number"),
])
def test_a_batch_with_one_bad_event_writes_nothing(store: OnlineStore, bad: Interaction,
                                                   error: type[Exception], match: str) -> None:
    """Regression (issue 14): ``[valid, unknown song]`` answered 404 yet wrote the first event;
    an invalid kind likewise. Now every event is checked first and the batch is all or nothing."""
    cfg = OnlineConfig()
    v = _publish_songs(store)
    record(store, "u1", "s000", "play", NOW - 60, config=cfg)
    before = (_state(store, v, "u1"), _state(store, v, "u2"), _stream(store))
    with pytest.raises(error, match=match):
        record_many(store, [Interaction("u1", "s002", "like", NOW), bad], config=cfg)
    assert (_state(store, v, "u1"), _state(store, v, "u2"), _stream(store)) == before
    assert len(before[2]) == 1 and before[1] is None
    # every bad event is named, with the count
    with pytest.raises(RequestError, match=r"2 of 3 event\(s\) refused, nothing recorded: event 0: "
                                           r".*; event 2: kind 'x'"):
        record_many(store, [Interaction("u1", "s002", "play", -1.0), Interaction("u1", "s003"),
                            Interaction("u1", "s003", "x")], config=cfg)
    assert _stream(store) == before[2]


@pytest.mark.parametrize(("ts", "match"), [
    (1.7e12, "looks like milliseconds since the epoch; give seconds"),
    (1.7e15, "looks like microseconds"),
    (1e300, "more than a day in the future"),
    (NOW + 2 * 86400, "more than a day in the future"),
    (631_152_000, "before 2000-01-01"),  # 1990-01-01
    (-5, "before 2000-01-01"),
    (0, "before 2000-01-01"),
    (True, "must be a number of unix seconds, got True"),
    ("1700000000", "must be a number"),
    (float("nan"), "not a finite number"),
    (float("inf"), "not a finite number"),
])
def test_timestamps_outside_the_window_are_refused(ts: object, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        check_ts(ts, now=NOW)


def test_timestamps_inside_the_window_are_kept() -> None:
    assert check_ts(946_684_800, now=NOW) == 946_684_800.0  # 2000-01-01 exactly
    assert check_ts(NOW + 86_000, now=NOW) == NOW + 86_000  # clocks a little ahead
    assert check_ts(1_750_000_000, now=NOW) == 1_750_000_000.0


def test_a_1000_event_batch_equals_single_records_in_constant_round_trips(
        redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One batch of 1000 events (50 users, some already known, plays/likes/skips, shuffled
    times) leaves the same user states and stream as 1000 ``record`` calls; the in-process
    store agrees; and the batch costs the same number of Redis round trips as one event."""
    import redis.connection

    cfg = OnlineConfig(history_len=30)
    rng = np.random.default_rng(3)
    kinds = ["play", "like", "skip"]
    batch = [Interaction(f"u{int(rng.integers(50))}", SONGS[int(rng.integers(len(SONGS)))],
                         kinds[int(rng.integers(3))], float(NOW - rng.integers(0, 10**6)))
             for _ in range(1000)]
    seed = [Interaction(f"u{i}", SONGS[i % 20], "play", NOW - 2e6) for i in range(0, 50, 5)]

    redis_store = RedisStore(redis_url, redis_prefix)
    one_by_one, in_process = InProcessStore("a"), InProcessStore("b")
    versions = [_publish_songs(s) for s in (redis_store, one_by_one, in_process)]
    assert len(set(versions)) == 1  # same version number, so the same random embeddings
    v = versions[0]
    probe = Interaction("u0", "s000", "play", NOW - 3e6)  # the one-event batch
    for s in (redis_store, one_by_one, in_process):
        record_many(s, seed, config=cfg)  # also opens the Redis connections before counting
    sends = [0]
    real = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        sends[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    record_many(redis_store, [probe], config=cfg)
    one_event = sends[0]
    sends[0] = 0
    got = record_many(redis_store, batch, config=cfg)
    thousand = sends[0]
    monkeypatch.undo()
    assert thousand == one_event <= 5, (one_event, thousand)  # before: 6 per event, 6000 here

    record(one_by_one, *probe, config=cfg)
    want = [record(one_by_one, *e, config=cfg) for e in batch]
    record_many(in_process, [probe], config=cfg)
    got_mem = record_many(in_process, batch, config=cfg)
    for res in (got, got_mem):
        assert [(r.user_id, r.created, r.history_len) for r in res] == \
            [(r.user_id, r.created, r.history_len) for r in want]
    assert any(r.created for r in got) and not all(r.created for r in got)
    assert _stream(redis_store) == _stream(in_process) == _stream(one_by_one)
    for u in sorted({e.user_id for e in batch}):
        assert _state(redis_store, v, u) == _state(in_process, v, u) == _state(one_by_one, v, u), u
    assert [e.event_id for b in redis_store.read_events(0) for e in b][-1000:] == \
        [r.event_id for r in got]


def test_export_skips_bad_rows_and_reports_them(redis_url: str, redis_prefix: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Regression (issue 14): one row written with ts 1e300 (or in milliseconds) by an older
    writer made ``export-events`` fail for the whole namespace. Now bad rows are skipped and
    reported by stream id; the export always completes."""
    import redis

    from apex_rank.cli.main import main

    store = RedisStore(redis_url, redis_prefix)
    cfg = OnlineConfig(namespace=redis_prefix)
    _publish_songs(store)
    record(store, "u1", "s000", "play", 1_750_000_000.0, config=cfg)
    client = redis.Redis.from_url(redis_url)
    ok = {"u": "u9", "s": "s001", "k": "play", "t": "1750000000.0", "w": "1.0"}
    bad_rows = [{**ok, "t": "1e300"}, {**ok, "t": "1.7e12"}, {**ok, "t": "abc"},
                {**ok, "t": "1.0"},  # ts true, stored as 1970 by the old writer
                {k: v for k, v in ok.items() if k != "t"}, {**ok, "u": "bad id"},
                {**ok, "w": "nan"}, {**ok, "k": "teleport"}, {**ok, "s": b"\xff\xfe"},
                {**ok, "t": "inf"}]
    bad_ids = [client.xadd(store.keys.events, row).decode() for row in bad_rows]
    record(store, "u2", "s002", "like", 1_750_000_100.0, config=cfg)

    res = export_events(store, tmp_path / "lib.parquet")
    assert (res.rows, res.skipped, len(res.problems)) == (2, len(bad_rows), 5)
    assert res.problems[0].startswith(f"event {bad_ids[0]}: ts 1e+300 is more than a day in the future")
    assert "milliseconds" in res.problems[1] and "not a number" in res.problems[2]
    assert "before 2000-01-01" in res.problems[3] and "missing" in res.problems[4]

    out = tmp_path / "events.parquet"
    capsys.readouterr()
    assert main(["export-events", "--redis", redis_url, "--namespace", redis_prefix,
                 "--out", str(out)]) == 0
    said = capsys.readouterr()
    df = pl.read_parquet(out)
    assert df["user_id"].to_list() == ["u1", "u2"]
    validate_interactions(df.select("user_id", "song_id", "ts", "weight"))
    assert "wrote 2 events" in said.out
    assert f"skipped {len(bad_rows)} bad event row(s) (first shown):" in said.err
    assert all(f"event {eid}:" in said.err for eid in bad_ids[:5])


@pytest.fixture()
def client(redis_url: str, redis_prefix: str):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from apex_rank.ranking.online.service import create_app

    engine = RankingEngine.load(bundle_dir(7))
    cfg = OnlineConfig(namespace=redis_prefix, max_body_bytes=256 * 1024)
    store = RedisStore(redis_url, redis_prefix)
    publish(engine, store, config=cfg)
    ranker = OnlineRanker.connect(redis_url, namespace=redis_prefix, config=cfg, engine=engine,
                                  follow=False)
    with TestClient(create_app(ranker, config=cfg), raise_server_exceptions=False) as c:
        c.engine, c.store = engine, store  # type: ignore[attr-defined]
        yield c
    ranker.close()


def test_events_over_http_are_all_or_nothing(client) -> None:  # type: ignore[no-untyped-def]
    songs = client.engine.recommender.songs.song_ids
    store, v = client.store, client.store.current_version()
    ok = {"user_id": "fresh-user", "song_id": songs[0], "ts": NOW}
    n0 = len(_stream(store))
    cases = [
        ({"user_id": "fresh-user", "song_id": "nosuchsong"}, 404, "event 1: song_id 'nosuchsong'"),
        ({**ok, "kind": "teleport"}, 422, "event 1: kind 'teleport'"),
        ({**ok, "ts": 1.7e12}, 422, "event 1: ts 1700000000000.0 looks like milliseconds"),
        ({**ok, "ts": 1e300}, 422, "event 1: ts 1e+300 is more than a day in the future"),
        ({**ok, "ts": NOW + 2 * 86400}, 422, "more than a day in the future"),
        ({**ok, "ts": 631_152_000}, 422, "event 1: ts 631152000.0 is before 2000-01-01"),
        ({**ok, "ts": -5}, 422, "before 2000-01-01"),
    ]
    for bad, status, says in cases:
        r = client.post("/events", json={"events": [ok, bad]})
        assert r.status_code == status and says in r.json()["detail"], (bad, r.text)
    r = client.post("/events", json={"events": [ok, {**ok, "ts": True}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "events", 1, "ts"]
    assert len(_stream(store)) == n0 and store.read_user(v, "fresh-user")[1] is None

    many = [{"user_id": f"web{i % 40}", "song_id": songs[i % 97], "kind": "play", "ts": NOW - i}
            for i in range(1000)]
    r = client.post("/events", json={"events": many})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["recorded"] == 1000 and sum(e["created"] for e in body["events"]) == 40
    assert len(_stream(store)) == n0 + 1000
    assert store.read_user(v, "web7")[1].activity == 25.0


def _song_body(song_id: str, embedding: str, popularity: str = "0") -> str:
    return f'{{"song_id": "{song_id}", "embedding": {embedding}, "popularity": {popularity}}}'


def test_songs_cannot_poison_the_catalogue(client, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Regression (issue 14): ``popularity: Infinity`` or ``1e39``, an embedding of 3e38 values
    or an all-zero one got 200 and stored NaN priors. Each is a 422 naming the field now."""
    d = client.engine.embedding_dim
    fine = json.dumps(np.random.default_rng(0).normal(size=d).tolist())
    cases = [
        (_song_body("n1", fine, "Infinity"), "popularity"),
        (_song_body("n1", fine, "1e39"), "popularity"),
        (_song_body("n1", fine, "NaN"), "popularity"),
        (_song_body("n1", json.dumps([3e38] * d)), "norm that overflows float32"),
        (_song_body("n1", json.dumps([1e39] + [0.1] * (d - 1))), "NaN or inf (as float32)"),
        (_song_body("n1", "[NaN" + ", 0.1" * (d - 1) + "]"), "embedding"),
        (_song_body("n1", json.dumps([0.0] * d)), "all zeros"),
    ]
    for body, says in cases:
        r = client.post("/songs", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and says in r.text, (body[:80], r.text)
    # a predictor whose output is not finite for a task it was trained on (untrained tasks are NaN)
    monkeypatch.setattr(client.engine.recommender.apex, "predict",
                        lambda e: np.full((len(e), 7), np.nan, np.float32))
    r = client.post("/songs", content=_song_body("n1", fine), headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not finite where the predictor was trained" in r.json()["detail"]
    assert not client.engine.has_song("n1")
    assert client.store.ingested_ids(client.store.current_version()) == []
    monkeypatch.undo()
    r = client.post("/songs", content=_song_body("n1", fine, "3.5"), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert all(np.isfinite(r.json()["priors"]))


def test_batches_load_their_scripts_on_a_fresh_or_flushed_server(tmp_path: Path) -> None:
    """The batch scripts run by EVALSHA: a server that never saw them (or lost them to a restart
    or SCRIPT FLUSH) answers NOSCRIPT, and the store loads them and runs the batch once."""
    import redis

    from .online_support import OwnRedis

    own = OwnRedis(tmp_path / "redis").start()
    try:
        store = RedisStore(own.url, "scripts")
        v = _publish_songs(store)
        record_many(store, [Interaction("u1", "s000", "play", NOW), Interaction("u1", "s001")])
        redis.Redis.from_url(own.url).script_flush()
        record_many(store, [Interaction("u1", "s002", "like", NOW)])
        assert store.read_user(v, "u1")[1].history == ("s000", "s001", "s002")
        assert len(_stream(store)) == 3
        store.close()
    finally:
        own.stop()
