"""The online store contract and its two implementations: Redis and in-process.

:class:`OnlineStore` is the one contract; :class:`RedisStore` is the production store
(pipelined reads and writes, a TTL on every versioned key, a lazily created client, an atomic
compare-and-set of the ``current`` pointer in a Lua script) and :class:`InProcessStore` holds
the same data in dictionaries for the demo when no Redis is reachable. Both pass the same
tests. The key layout and field codecs are written down in :mod:`.keys`.

Example
-------
>>> store = InProcessStore("demo")
>>> store.current_version() is None
True
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from apex_rank.errors import ContentionError, MissingDependencyError, StoreError, VersionMovedError

from .keys import Keys, decode_history, decode_vector, encode_history, encode_vector

log = logging.getLogger(__name__)

# Compare-and-set of the pointer: move it only if it still holds the version the publisher saw
# when it started and the new version's manifest (written last) exists. Returns {status, old,
# last event id, last catalogue id}: the stream positions at the moment of the move (events and
# ingests up to them were written to the old version, later ones to the new one).
_COMMIT_LUA = """
local function last(key)
  local r = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if r[1] then return r[1][1] end
  return '0-0'
end
local cur = redis.call('GET', KEYS[1])
if (cur or '') ~= ARGV[1] then return {0, cur or '', '', ''} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1, cur or '', '', ''} end
redis.call('SET', KEYS[1], ARGV[2])
return {1, cur or '', last(KEYS[3]), last(KEYS[4])}
"""


# The users of a batch in one command: KEYS are their hashes; returns each one's HGETALL.
_READ_USERS_LUA = """
local out = {}
for k = 1, #KEYS do out[k] = redis.call('HGETALL', KEYS[k]) end
return out
"""

# The writes of a batch in one command, run inside the MULTI of an optimistic transaction (the
# WATCH guards the pointer and the users). KEYS: the event stream, then the user hashes. ARGV:
# ttl, maxlen, number of events; per event its field count and field/value pairs (XADD, first:
# an XADD that fails leaves nothing written); per user its field count and pairs (the hash is
# replaced: DEL, HSET, EXPIRE). Returns the stream ids.
_WRITE_BATCH_LUA = """
local ttl, maxlen, i = ARGV[1], ARGV[2], 4
local ids = {}
for e = 1, tonumber(ARGV[3]) do
  local n = tonumber(ARGV[i])
  ids[e] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, i + 1, i + 2 * n))
  i = i + 1 + 2 * n
end
for k = 2, #KEYS do
  local n = tonumber(ARGV[i])
  redis.call('DEL', KEYS[k])
  redis.call('HSET', KEYS[k], unpack(ARGV, i + 1, i + 2 * n))
  redis.call('EXPIRE', KEYS[k], ttl)
  i = i + 1 + 2 * n
end
return ids
"""


_SCRIPTS = (_READ_USERS_LUA, _WRITE_BATCH_LUA)
# run by EVALSHA (loaded on NOSCRIPT): redis-py's Script in a pipeline costs a SCRIPT EXISTS
# round trip per call
_READ_USERS_SHA, _WRITE_BATCH_SHA = (hashlib.sha1(s.encode()).hexdigest() for s in _SCRIPTS)


class CommitResult(NamedTuple):
    """What :meth:`OnlineStore.commit` did: whether the pointer moved, its value before, and the
    event and catalogue stream ids at the moment it moved (``""`` when it did not)."""

    moved: bool
    before: int | None
    events_mark: str
    catalogue_mark: str


def stream_id_before(ms: int) -> str:
    """The stream id just before millisecond ``ms`` (an exclusive start that includes ``ms``)."""
    return "0-0" if ms <= 0 else f"{ms - 1}-18446744073709551615"


def stream_key(eid: str) -> tuple[int, int]:
    """A stream id ``"ms-seq"`` as a comparable pair."""
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class UserRecord:
    """A user's online state as stored (see :mod:`.keys` for the fields)."""

    factor: np.ndarray | None = None
    profile: np.ndarray | None = None
    history: list[str] = field(default_factory=list)
    activity: float = 0.0
    last_seen_s: float = float("nan")


@dataclass(frozen=True)
class Event:
    """One recorded interaction, as read back from the event stream."""

    event_id: str
    user_id: str
    song_id: str
    kind: str
    ts: float
    weight: float


def _user_to_fields(rec: UserRecord) -> dict[str, bytes]:
    # numbers as repr(float): the bytes json.dumps writes for a finite float, 8x cheaper (a
    # batch of events encodes and decodes hundreds of users)
    fields: dict[str, bytes] = {
        "h": encode_history(rec.history),
        "n": repr(float(rec.activity)).encode(),
    }
    if rec.factor is not None:
        fields["f"] = encode_vector(rec.factor)
    if rec.profile is not None:
        fields["p"] = encode_vector(rec.profile)
    if math.isfinite(rec.last_seen_s):
        fields["t"] = repr(float(rec.last_seen_s)).encode()
    return fields


def _user_from_fields(raw: dict[Any, Any], where: str) -> UserRecord | None:
    if not raw:
        return None
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    try:
        activity = float(f.get("n", b"0"))  # a JSON number, as float() reads it
        last_seen = float(f["t"]) if f.get("t") else float("nan")
    except (ValueError, TypeError) as err:
        raise StoreError(f"{where}: activity or last-seen field is not a number") from err
    return UserRecord(
        factor=decode_vector(f["f"], where) if f.get("f") else None,
        profile=decode_vector(f["p"], where) if f.get("p") else None,
        history=decode_history(f.get("h"), where),
        activity=activity,
        last_seen_s=last_seen,
    )


def _with_factor(factors: Mapping[str, np.ndarray]) -> Callable[[str, UserRecord | None], UserRecord]:
    """The pure user update of :meth:`OnlineStore.write_warm`: the state with its CF factor set."""

    def update(uid: str, old: UserRecord | None) -> UserRecord:
        rec = old or UserRecord()
        return UserRecord(np.asarray(factors[uid], dtype=np.float32), rec.profile, list(rec.history),
                          rec.activity, rec.last_seen_s)

    return update


class OnlineStore:
    """Contract of an online store. Versions are integers; ``None`` means none published.

    Writers (:mod:`.publisher`) stage a version, then :meth:`commit` moves ``current`` with a
    compare-and-set; readers (:mod:`.ranker`) read the pointer and one user's state in one
    round trip with :meth:`read_user`; :mod:`.events` appends a batch of events and updates the
    users' states in one transaction with :meth:`record_events`.
    """

    keys: Keys
    kind: str = "abstract"

    def ping(self) -> bool:
        """True when the store answers."""
        raise NotImplementedError

    def current_version(self) -> int | None:
        raise NotImplementedError

    def next_version(self) -> int:
        """A version number no other publisher will get."""
        raise NotImplementedError

    def write_songs(self, version: int, ids: Sequence[str], records: Sequence[bytes],
                    embeddings: np.ndarray, ttl_s: int) -> None:
        """Write one batch of song records and embeddings ((n, d) float32) under ``version``."""
        raise NotImplementedError

    def write_users(self, version: int, users: Sequence[tuple[str, UserRecord]], ttl_s: int) -> None:
        """Write one batch of user states under ``version``."""
        raise NotImplementedError

    def write_meta(self, version: int, meta: dict[str, Any], ttl_s: int) -> None:
        """Write the manifest of ``version``; call it last (it marks a complete publish)."""
        raise NotImplementedError

    def read_meta(self, version: int) -> dict[str, Any] | None:
        raise NotImplementedError

    def version_present(self, version: int) -> tuple[int | None, bool]:
        """The ``current`` pointer and whether ``version`` still has its manifest and song
        records (both gone after a Redis restart that lost its data). Redis: one round trip."""
        return self.current_version(), self.read_meta(version) is not None

    def commit(self, version: int, expected: int | None) -> CommitResult:
        """Atomically point ``current`` at ``version`` if it still equals ``expected``.

        Raises :class:`StoreError` when the manifest of ``version`` is missing (an incomplete
        publish is never made current).
        """
        raise NotImplementedError

    def expire_version(self, version: int, ttl_s: int) -> int:
        """Set the TTL of every key of ``version``; returns how many keys were touched."""
        raise NotImplementedError

    def read_user(self, version: int, user_id: str) -> tuple[int | None, UserRecord | None]:
        """One round trip: the ``current`` pointer and ``user_id``'s state under ``version``."""
        raise NotImplementedError

    def read_songs(self, version: int, ids: Sequence[str]) -> list[tuple[bytes | None, bytes | None]]:
        """(record, embedding) raw bytes per id (``None`` where unknown), one round trip."""
        raise NotImplementedError

    def record_events(self, version: int, events: Sequence[dict[str, str]], user_ids: Sequence[str],
                      update: Callable[[str, UserRecord | None], UserRecord], ttl_s: int,
                      maxlen: int) -> tuple[list[str], dict[str, UserRecord]]:
        """Append ``events`` to the stream, in order, and replace the state of each user in
        ``user_ids`` under ``version`` by ``update(user_id, old)``, all or nothing and only while
        ``version`` is current (else :class:`VersionMovedError`, nothing written).

        A bounded number of round trips whatever the batch size (Redis: WATCH, one read of the
        pointer and the users, MULTI/EXEC of one script doing every write). ``update`` must be
        pure: a transaction retried after a concurrent write calls it again. An exception it
        raises leaves nothing written. Returns the stream ids (one per event) and the new states
        by user id.
        """
        raise NotImplementedError

    def record_event(self, version: int, event: dict[str, str], user_id: str,
                     update: Callable[[UserRecord | None], UserRecord], ttl_s: int,
                     maxlen: int) -> tuple[str, UserRecord]:
        """One event through :meth:`record_events`: returns its stream id and the new state."""
        ids, new = self.record_events(version, [event], [user_id], lambda _u, old: update(old),
                                      ttl_s, maxlen)
        return ids[0], new[user_id]

    def update_users(self, version: int, user_ids: Sequence[str],
                     update: Callable[[str, UserRecord | None], UserRecord], ttl_s: int, *,
                     require_current: bool) -> None:
        """Replace each user's state under ``version`` by ``update(user_id, old)`` in one
        transaction (retried if a concurrent writer touched one of them); with
        ``require_current``, only while ``version`` is current (else :class:`VersionMovedError`)."""
        raise NotImplementedError

    def read_events(self, since_ms: int, until_ms: int | None = None, *,
                    after_id: str | None = None, until_id: str | None = None,
                    batch: int = 10000,
                    on_bad: Callable[[str, str], None] | None = None) -> Iterator[list[Event]]:
        """Batches of events with stream time in ``[since_ms, until_ms]``, oldest first;
        ``after_id`` (exclusive) and ``until_id`` (inclusive) bound by stream id instead.

        A row that is not an event (a missing field, a number that does not parse, bytes that
        are not UTF-8: an older or foreign writer) is left out and passed to
        ``on_bad(stream_id, reason)`` (default: a logged warning); a batch may then be shorter
        or empty. Whether a parsed event is plausible (ids, kind, time window) is the reader's
        call (:func:`.events.event_problem`).
        """
        raise NotImplementedError

    def add_song(self, version: int, song_id: str, record: bytes, embedding: np.ndarray,
                 ttl_s: int, *, require_current: bool = True) -> str:
        """Add one ingested song to ``version`` and announce it on the catalogue stream, as one
        transaction; with ``require_current``, only while ``version`` is current (else
        :class:`VersionMovedError`). Returns the catalogue stream id."""
        raise NotImplementedError

    def ingested_ids(self, version: int) -> list[str]:
        raise NotImplementedError

    def read_new_events(self, after_id: str, *, block_ms: int = 0,
                        count: int = 1000) -> tuple[list[Event], str]:
        """Up to ``count`` events after stream id ``after_id``, waiting up to ``block_ms`` for one
        when there are none (0: do not wait), and the last stream id read (rows that are not
        events are skipped, as in :meth:`read_events`, but read past). The warm-up consumer
        follows the event stream with it."""
        raise NotImplementedError

    def last_event_id(self) -> str:
        """The id of the latest event on the stream (``"0-0"``: none)."""
        raise NotImplementedError

    def write_warm(self, version: int, songs: Sequence[tuple[str, bytes]],
                   users: Mapping[str, np.ndarray], ttl_s: int, *, require_current: bool) -> None:
        """Store what the warm-up consumer solved, as one transaction: warm records (see
        :mod:`.keys`) of ``songs`` in ``v{V}:warm``, the CF factor (field ``f``) of each user in
        ``users`` (the rest of their state is kept; a user without a state gets one holding
        only the factor), and one announcement of the songs on the warm log. With
        ``require_current``, only while ``version`` is current (else
        :class:`VersionMovedError`, nothing written)."""
        raise NotImplementedError

    def read_warm(self, version: int, ids: Sequence[str] | None = None) -> dict[str, bytes]:
        """Warm records of ``version`` by song id: those of ``ids`` that exist, or all (None)."""
        raise NotImplementedError

    def read_warm_log(self, after_id: str) -> list[tuple[str, list[str], int]]:
        """Warm-log announcements after ``after_id``: (stream id, song ids, version)."""
        raise NotImplementedError

    def last_warm_id(self) -> str:
        """The id of the latest warm-log announcement (``"0-0"``: none)."""
        raise NotImplementedError

    def read_catalogue(self, after_id: str, block_ms: int = 0) -> list[tuple[str, str, int]]:
        """Catalogue announcements after ``after_id``: (stream id, song id, version)."""
        raise NotImplementedError

    def last_catalogue_id(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (no-op for the in-process store)."""


_SECRET_QUERY = ("password", "username", "ssl_password")


def redact_url(url: str) -> str:
    """``url`` fit for logs and messages: user and password dropped, password-like query values
    masked, scheme kept (so a message still shows whether TLS was in use)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit

    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        query = urlencode([(k, "***" if k.lower() in _SECRET_QUERY else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="/*")
    except ValueError:
        return "<unparsable url>"
    return f"{parts.scheme}://{host}{parts.path}" + (f"?{query}" if query else "")


def _check_url(url: str) -> None:
    from urllib.parse import parse_qsl, urlsplit

    try:
        parts = urlsplit(url)
        keys = [k for k, _ in parse_qsl(parts.query)]
    except ValueError as err:
        raise StoreError(f"invalid Redis URL {redact_url(url)}: {err}") from err
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise StoreError(f"Redis URL {redact_url(url)} must start with redis://, rediss:// (TLS) "
                         "or unix://")
    tls = [k for k in keys if k.startswith("ssl_")]
    if tls and parts.scheme != "rediss":
        raise StoreError(f"Redis URL {redact_url(url)} sets TLS options ({', '.join(tls)}) but is "
                         "not a rediss:// URL")


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else ("" if x is None else str(x))


def _warn_bad_event(eid: str, reason: str) -> None:
    log.warning("event %s skipped: %s", eid, reason)


def _parse_events(rows: Sequence[tuple[Any, dict[Any, Any]]],
                  on_bad: Callable[[str, str], None] | None) -> list[Event]:
    """Stream rows -> events; rows that are not events go to ``on_bad`` (see read_events)."""
    out = []
    for raw_id, raw in rows:
        eid = _text(raw_id)
        try:
            f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                 for k, v in raw.items()}
        except UnicodeDecodeError:
            (on_bad or _warn_bad_event)(eid, "a field is not UTF-8 text")
            continue
        missing = [k for k in ("u", "s", "k", "t") if k not in f]
        if missing:
            (on_bad or _warn_bad_event)(eid, f"field(s) {', '.join(missing)} missing")
            continue
        try:
            ts = float(f["t"])
        except ValueError:
            (on_bad or _warn_bad_event)(eid, f"t {f['t']!r} is not a number")
            continue
        try:
            w = float(f.get("w", 1))
        except ValueError:
            (on_bad or _warn_bad_event)(eid, f"w {f['w']!r} is not a number")
            continue
        out.append(Event(eid, f["u"], f["s"], f["k"], ts, w))
    return out


class RedisStore(OnlineStore):
    """The online store on a real Redis server (plain, password or ``rediss://`` TLS URLs).

    Parameters
    ----------
    url:
        ``redis://[:password@]host:port/db`` or ``rediss://...``.
    namespace:
        Key namespace ``NS`` (see :mod:`.keys`).
    timeout_s:
        Socket and connect timeout of every call; the ranker sets it to its latency budget.

    The client is created on first use, so constructing a store never touches the network.
    """

    kind = "redis"

    def __init__(self, url: str, namespace: str = "default", *, timeout_s: float = 5.0) -> None:
        _check_url(url)
        self.url = url
        self.keys = Keys(namespace)
        self.timeout_s = float(timeout_s)
        self._client: Any = None
        self._lock = threading.Lock()
        self._commit_script: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        import redis
                    except ImportError as err:  # pragma: no cover - redis is a dependency
                        raise MissingDependencyError(
                            "the online store needs redis: pip install 'apex-rank[serve]'") from err
                    self._client = redis.Redis.from_url(
                        self.url, socket_timeout=self.timeout_s,
                        socket_connect_timeout=self.timeout_s, health_check_interval=30)
        return self._client

    def _fail(self, what: str, err: Exception) -> StoreError:
        return StoreError(f"redis at {redact_url(self.url)}: {what} failed: "
                          f"{type(err).__name__}: {err}")

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            return False

    def current_version(self) -> int | None:
        import redis

        try:
            raw = self.client.get(self.keys.current)
        except redis.RedisError as err:
            raise self._fail(f"GET {self.keys.current}", err) from err
        return int(raw) if raw else None

    def next_version(self) -> int:
        import redis

        try:
            return int(self.client.incr(self.keys.seq))
        except redis.RedisError as err:
            raise self._fail(f"INCR {self.keys.seq}", err) from err

    def write_songs(self, version: int, ids: Sequence[str], records: Sequence[bytes],
                    embeddings: np.ndarray, ttl_s: int) -> None:
        import redis

        emb = np.ascontiguousarray(embeddings, dtype="<f4")
        songs_key, emb_key = self.keys.songs(version), self.keys.emb(version)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(songs_key, mapping=dict(zip(ids, records, strict=True)))
            pipe.hset(emb_key, mapping={sid: emb[i].tobytes() for i, sid in enumerate(ids)})
            pipe.expire(songs_key, ttl_s)
            pipe.expire(emb_key, ttl_s)
            pipe.execute()
        except redis.RedisError as err:
            raise self._fail(f"writing {len(ids)} songs to {songs_key}", err) from err

    def write_users(self, version: int, users: Sequence[tuple[str, UserRecord]], ttl_s: int) -> None:
        import redis

        try:
            pipe = self.client.pipeline(transaction=False)
            for uid, rec in users:  # version numbers are never reused: the keys are new
                key = self.keys.user(version, uid)
                pipe.hset(key, mapping=_user_to_fields(rec))
                pipe.expire(key, ttl_s)
            pipe.execute()
        except redis.RedisError as err:
            raise self._fail(f"writing {len(users)} users of version {version}", err) from err

    def write_meta(self, version: int, meta: dict[str, Any], ttl_s: int) -> None:
        import redis

        try:
            self.client.set(self.keys.meta(version), json.dumps(meta), ex=ttl_s)
        except redis.RedisError as err:
            raise self._fail(f"SET {self.keys.meta(version)}", err) from err

    def read_meta(self, version: int) -> dict[str, Any] | None:
        import redis

        try:
            raw = self.client.get(self.keys.meta(version))
        except redis.RedisError as err:
            raise self._fail(f"GET {self.keys.meta(version)}", err) from err
        return json.loads(raw) if raw else None

    def version_present(self, version: int) -> tuple[int | None, bool]:
        import redis

        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.keys.current)
            pipe.exists(self.keys.meta(version), self.keys.songs(version))
            cur, n = pipe.execute()
        except redis.RedisError as err:
            raise self._fail(f"EXISTS {self.keys.meta(version)}", err) from err
        return (int(cur) if cur else None), int(n) == 2

    def commit(self, version: int, expected: int | None) -> CommitResult:
        import redis

        try:
            if self._commit_script is None:
                self._commit_script = self.client.register_script(_COMMIT_LUA)
            status, before, ev, cat = self._commit_script(
                keys=[self.keys.current, self.keys.meta(version), self.keys.events,
                      self.keys.catalogue],
                args=["" if expected is None else str(expected), str(version)])
        except redis.RedisError as err:
            raise self._fail(f"commit of version {version}", err) from err
        before_v = int(before) if before else None
        if int(status) == -1:
            raise StoreError(f"version {version} has no manifest {self.keys.meta(version)}; "
                             "refusing to make an incomplete publish current")
        return CommitResult(int(status) == 1, before_v, _text(ev), _text(cat))

    def expire_version(self, version: int, ttl_s: int) -> int:
        import redis

        n = 0
        try:
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=self.keys.version_prefix(version) + "*", count=2000):
                batch.append(key)
                if len(batch) >= 2000:
                    n += self._expire_batch(batch, ttl_s)
                    batch = []
            n += self._expire_batch(batch, ttl_s)
        except redis.RedisError as err:
            raise self._fail(f"expiring version {version}", err) from err
        return n

    def _expire_batch(self, keys: list[bytes], ttl_s: int) -> int:
        if not keys:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.expire(k, ttl_s)
        pipe.execute()
        return len(keys)

    def read_user(self, version: int, user_id: str) -> tuple[int | None, UserRecord | None]:
        import redis

        key = self.keys.user(version, user_id)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.keys.current)
            pipe.hgetall(key)
            cur, raw = pipe.execute()
        except redis.RedisError as err:
            raise self._fail(f"HGETALL {key}", err) from err
        return (int(cur) if cur else None), _user_from_fields(raw, key)

    def read_songs(self, version: int, ids: Sequence[str]) -> list[tuple[bytes | None, bytes | None]]:
        import redis

        if not ids:
            return []
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(self.keys.songs(version), list(ids))
            pipe.hmget(self.keys.emb(version), list(ids))
            recs, embs = pipe.execute()
        except redis.RedisError as err:
            raise self._fail(f"HMGET {self.keys.songs(version)}", err) from err
        return list(zip(recs, embs, strict=True))

    def record_events(self, version: int, events: Sequence[dict[str, str]], user_ids: Sequence[str],
                      update: Callable[[str, UserRecord | None], UserRecord], ttl_s: int,
                      maxlen: int) -> tuple[list[str], dict[str, UserRecord]]:
        if not events:
            return [], {}
        return self._write_batch(version, user_ids, update, ttl_s, events, maxlen, True,
                                 f"recording {len(events)} event(s)")

    def _write_batch(self, version: int, user_ids: Sequence[str],
                     update: Callable[[str, UserRecord | None], UserRecord], ttl_s: int,
                     events: Sequence[dict[str, str]], maxlen: int, require_current: bool,
                     what: str, also: Callable[[Any], None] | None = None
                     ) -> tuple[list[str], dict[str, UserRecord]]:
        """Replace users by ``update`` and append ``events`` in one optimistic transaction of
        three round trips and two commands besides the WATCH (the scripts above), whatever the
        batch size: per-command overhead, not the network, bounds a batch's cost here.
        ``also(pipe)`` queues more writes into the same MULTI (before the script)."""
        users = list(dict.fromkeys(user_ids))
        keys = [self.keys.user(version, u) for u in users]
        new: dict[str, UserRecord] = {}

        def read(pipe: Any) -> None:
            pipe.evalsha(_READ_USERS_SHA, len(keys), *keys)

        def write(pipe: Any, results: list[Any]) -> None:
            new.clear()  # a retried transaction starts over
            if also is not None:
                also(pipe)
            args: list[Any] = [ttl_s, maxlen, len(events)]
            for e in events:
                args.append(len(e))
                for name, text in e.items():
                    args += (name, text)
            for u, k, flat in zip(users, keys, results[0], strict=True):
                old = _user_from_fields(dict(zip(flat[::2], flat[1::2], strict=True)), k)
                new[u] = rec = update(u, old)
                fields = _user_to_fields(rec)
                args.append(len(fields))
                for name, raw in fields.items():
                    args += (name, raw)
            pipe.evalsha(_WRITE_BATCH_SHA, 1 + len(keys), self.keys.events, *keys, *args)

        res = self._transaction(version, keys, read, write, require_current,
                                f"{what} for {len(users)} user(s) of version {version}")
        return [_text(x) for x in res[-1]], dict(new)

    def _transaction(self, version: int, watch: list[str], read: Callable[[Any], None] | None,
                     write: Callable[[Any, list[Any]], None], require_current: bool,
                     what: str) -> list[Any]:
        """An optimistic transaction in at most three round trips, whatever its size: WATCH
        ``watch`` (+ the pointer when ``require_current``); one pipelined read of the pointer and
        of what ``read(pipe)`` queues; MULTI, the writes ``write(pipe, results)`` queues (the
        results of ``read``), EXEC. Retried with back-off while another writer touches a
        watched key. The read pipeline uses another connection: that is safe, as EXEC fails if a
        watched key changed at any time after the WATCH."""
        import redis

        try:
            with self.client.pipeline(transaction=True) as pipe:
                for attempt in range(20):  # optimistic retries when another writer touches a key
                    try:
                        keys = [*watch, *([self.keys.current] if require_current else [])]
                        if keys:
                            pipe.watch(*keys)
                        results: list[Any] = []
                        if require_current or read is not None:
                            reader = self.client.pipeline(transaction=False)
                            if require_current:
                                reader.get(self.keys.current)
                            if read is not None:
                                read(reader)
                            results = reader.execute()
                        if require_current:
                            cur, results = results[0], results[1:]
                            if cur is None or int(cur) != version:
                                raise VersionMovedError(
                                    f"{what}: version {version} is no longer current "
                                    f"({self.keys.current} = {_text(cur) or 'unset'})")
                        pipe.multi()
                        write(pipe, results)
                        return list(pipe.execute())
                    except redis.exceptions.NoScriptError:
                        # first use on this server (or after a restart / SCRIPT FLUSH): load the
                        # scripts and run again (a script that is not loaded wrote nothing)
                        for script in _SCRIPTS:
                            self.client.script_load(script)
                        continue
                    except redis.WatchError:
                        # jittered, growing back-off: a writer looping on the same keys (a burst of
                        # plays during a publish's carry-over) otherwise wins all 20 rounds on a
                        # loaded machine (seen in CI)
                        time.sleep(random.uniform(0.0, min(0.05, 0.001 * 2**attempt)))
                        continue
        except redis.RedisError as err:
            raise self._fail(what, err) from err
        raise ContentionError(f"{what}: too many concurrent writers, nothing written")

    def update_users(self, version: int, user_ids: Sequence[str],
                     update: Callable[[str, UserRecord | None], UserRecord], ttl_s: int, *,
                     require_current: bool) -> None:
        if user_ids:
            self._write_batch(version, user_ids, update, ttl_s, [], 0, require_current, "updating")

    def read_events(self, since_ms: int, until_ms: int | None = None, *,
                    after_id: str | None = None, until_id: str | None = None,
                    batch: int = 10000,
                    on_bad: Callable[[str, str], None] | None = None) -> Iterator[list[Event]]:
        import redis

        start = f"({after_id}" if after_id else f"{int(since_ms)}-0"
        end = until_id or ("+" if until_ms is None else f"{int(until_ms)}-18446744073709551615")
        while True:
            try:
                rows = self.client.xrange(self.keys.events, min=start, max=end, count=batch)
            except redis.RedisError as err:
                raise self._fail(f"XRANGE {self.keys.events}", err) from err
            if not rows:
                return
            yield _parse_events(rows, on_bad)
            if len(rows) < batch:
                return
            start = "(" + _text(rows[-1][0])

    def add_song(self, version: int, song_id: str, record: bytes, embedding: np.ndarray,
                 ttl_s: int, *, require_current: bool = True) -> str:
        def write(pipe: Any, _: list[Any]) -> None:
            pipe.hset(self.keys.songs(version), song_id, record)
            pipe.hset(self.keys.emb(version), song_id, encode_vector(embedding))
            pipe.sadd(self.keys.ingested(version), song_id)
            pipe.expire(self.keys.ingested(version), ttl_s)
            pipe.xadd(self.keys.catalogue, {"s": song_id, "v": str(version)}, maxlen=100000,
                      approximate=True)

        res = self._transaction(version, [], None, write, require_current,
                                f"ingesting song {song_id!r}")
        return _text(res[-1])

    def ingested_ids(self, version: int) -> list[str]:
        import redis

        try:
            return sorted(m.decode() for m in self.client.smembers(self.keys.ingested(version)))
        except redis.RedisError as err:
            raise self._fail(f"SMEMBERS {self.keys.ingested(version)}", err) from err

    def read_new_events(self, after_id: str, *, block_ms: int = 0,
                        count: int = 1000) -> tuple[list[Event], str]:
        import redis

        try:
            res = self.client.xread({self.keys.events: after_id}, count=count, block=block_ms or None)
        except redis.RedisError as err:
            raise self._fail(f"XREAD {self.keys.events}", err) from err
        rows = [row for _, page in res or [] for row in page]
        return _parse_events(rows, None), (_text(rows[-1][0]) if rows else after_id)

    def write_warm(self, version: int, songs: Sequence[tuple[str, bytes]],
                   users: Mapping[str, np.ndarray], ttl_s: int, *, require_current: bool) -> None:
        if not songs and not users:
            return
        key = self.keys.warm(version)

        def also(pipe: Any) -> None:
            if songs:
                pipe.hset(key, mapping=dict(songs))
                pipe.expire(key, ttl_s)
                pipe.xadd(self.keys.warm_log, {"v": str(version), "s": ",".join(s for s, _ in songs)},
                          maxlen=100000, approximate=True)

        self._write_batch(version, list(users), _with_factor(users), ttl_s, [], 0, require_current,
                          f"writing {len(songs)} warmed song(s) and {len(users)} user factor(s)",
                          also=also)

    def read_warm(self, version: int, ids: Sequence[str] | None = None) -> dict[str, bytes]:
        import redis

        key = self.keys.warm(version)
        try:
            if ids is None:
                return {_text(k): v for k, v in self.client.hgetall(key).items()}
            if not ids:
                return {}
            return {s: v for s, v in zip(ids, self.client.hmget(key, list(ids)), strict=True)
                    if v is not None}
        except redis.RedisError as err:
            raise self._fail(f"reading {key}", err) from err

    def read_warm_log(self, after_id: str) -> list[tuple[str, list[str], int]]:
        import redis

        try:
            res = self.client.xread({self.keys.warm_log: after_id}, count=1000)
        except redis.RedisError as err:
            raise self._fail(f"XREAD {self.keys.warm_log}", err) from err
        return [(_text(eid), _text(f[b"s"]).split(","), int(f[b"v"]))
                for _, rows in res or [] for eid, f in rows]

    def last_warm_id(self) -> str:
        return self._last_id(self.keys.warm_log)

    def last_event_id(self) -> str:
        return self._last_id(self.keys.events)

    def _last_id(self, key: str) -> str:
        import redis

        try:
            rows = self.client.xrevrange(key, count=1)
        except redis.RedisError as err:
            raise self._fail(f"XREVRANGE {key}", err) from err
        return _text(rows[0][0]) if rows else "0-0"

    def read_catalogue(self, after_id: str, block_ms: int = 0) -> list[tuple[str, str, int]]:
        import redis

        try:
            res = self.client.xread({self.keys.catalogue: after_id}, count=1000,
                                    block=block_ms or None)
        except redis.RedisError as err:
            raise self._fail(f"XREAD {self.keys.catalogue}", err) from err
        out = []
        for _, rows in res or []:
            for eid, f in rows:
                out.append((eid.decode(), f[b"s"].decode(), int(f[b"v"])))
        return out

    def last_catalogue_id(self) -> str:
        import redis

        try:
            rows = self.client.xrevrange(self.keys.catalogue, count=1)
        except redis.RedisError as err:
            raise self._fail(f"XREVRANGE {self.keys.catalogue}", err) from err
        return rows[0][0].decode() if rows else "0-0"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class InProcessStore(OnlineStore):
    """The same store in this process's memory (for the demo without a Redis server).

    TTLs are recorded but not enforced; nothing is shared between processes or persisted.
    """

    kind = "in-process"

    def __init__(self, namespace: str = "default") -> None:
        self.keys = Keys(namespace)
        self._lock = threading.RLock()
        self._current: int | None = None
        self._seq = itertools.count(1)
        self._meta: dict[int, dict[str, Any]] = {}
        self._songs: dict[int, dict[str, bytes]] = {}
        self._emb: dict[int, dict[str, bytes]] = {}
        self._ingested: dict[int, set[str]] = {}
        self._users: dict[int, dict[str, UserRecord]] = {}
        self._events: list[tuple[str, dict[str, str]]] = []
        self._catalogue: list[tuple[str, str, int]] = []
        self._warm: dict[int, dict[str, bytes]] = {}
        self._warm_log: list[tuple[str, list[str], int]] = []
        self._last_ms, self._last_seq = 0, 0
        self._cv = threading.Condition(self._lock)

    def _stream_id(self) -> str:
        ms = int(time.time() * 1000)
        if ms <= self._last_ms:
            ms, self._last_seq = self._last_ms, self._last_seq + 1
        else:
            self._last_seq = 0
        self._last_ms = ms
        return f"{ms}-{self._last_seq}"

    def ping(self) -> bool:
        return True

    def current_version(self) -> int | None:
        return self._current

    def next_version(self) -> int:
        with self._lock:
            return next(self._seq)

    def write_songs(self, version: int, ids: Sequence[str], records: Sequence[bytes],
                    embeddings: np.ndarray, ttl_s: int) -> None:
        emb = np.ascontiguousarray(embeddings, dtype="<f4")
        with self._lock:
            s, e = self._songs.setdefault(version, {}), self._emb.setdefault(version, {})
            for i, sid in enumerate(ids):
                s[sid], e[sid] = records[i], emb[i].tobytes()

    def write_users(self, version: int, users: Sequence[tuple[str, UserRecord]], ttl_s: int) -> None:
        with self._lock:
            u = self._users.setdefault(version, {})
            for uid, rec in users:
                u[uid] = rec

    def write_meta(self, version: int, meta: dict[str, Any], ttl_s: int) -> None:
        with self._lock:
            self._meta[version] = json.loads(json.dumps(meta))

    def read_meta(self, version: int) -> dict[str, Any] | None:
        return self._meta.get(version)

    def commit(self, version: int, expected: int | None) -> CommitResult:
        with self._lock:
            before = self._current
            if before != expected:
                return CommitResult(False, before, "", "")
            if version not in self._meta:
                raise StoreError(f"version {version} has no manifest; refusing to make it current")
            self._current = version
            return CommitResult(True, before, self._events[-1][0] if self._events else "0-0",
                                self._catalogue[-1][0] if self._catalogue else "0-0")

    def _check_current(self, version: int, what: str) -> None:
        if self._current != version:
            raise VersionMovedError(f"{what}: version {version} is no longer current "
                                    f"(current is {self._current})")

    def expire_version(self, version: int, ttl_s: int) -> int:
        return 0

    def read_user(self, version: int, user_id: str) -> tuple[int | None, UserRecord | None]:
        with self._lock:
            return self._current, self._users.get(version, {}).get(user_id)

    def read_songs(self, version: int, ids: Sequence[str]) -> list[tuple[bytes | None, bytes | None]]:
        with self._lock:
            s, e = self._songs.get(version, {}), self._emb.get(version, {})
            return [(s.get(i), e.get(i)) for i in ids]

    def record_events(self, version: int, events: Sequence[dict[str, str]], user_ids: Sequence[str],
                      update: Callable[[str, UserRecord | None], UserRecord], ttl_s: int,
                      maxlen: int) -> tuple[list[str], dict[str, UserRecord]]:
        if not events:
            return [], {}
        with self._lock:
            self._check_current(version, f"recording {len(events)} event(s)")
            users = self._users.setdefault(version, {})
            # every new state first: an update that raises leaves nothing written
            new = {u: update(u, users.get(u)) for u in dict.fromkeys(user_ids)}
            users.update(new)
            ids = []
            for e in events:
                ids.append(self._stream_id())
                self._events.append((ids[-1], dict(e)))
            del self._events[: max(0, len(self._events) - maxlen)]
            self._cv.notify_all()
            return ids, new

    def update_users(self, version: int, user_ids: Sequence[str],
                     update: Callable[[str, UserRecord | None], UserRecord], ttl_s: int, *,
                     require_current: bool) -> None:
        with self._lock:
            if require_current:
                self._check_current(version, f"updating {len(user_ids)} users")
            users = self._users.setdefault(version, {})
            for u in user_ids:
                users[u] = update(u, users.get(u))

    def read_events(self, since_ms: int, until_ms: int | None = None, *,
                    after_id: str | None = None, until_id: str | None = None,
                    batch: int = 10000,
                    on_bad: Callable[[str, str], None] | None = None) -> Iterator[list[Event]]:
        lo = stream_key(after_id) if after_id else None
        hi = stream_key(until_id) if until_id else None
        with self._lock:
            rows = [(eid, f) for eid, f in self._events
                    if (stream_key(eid) > lo if lo else stream_key(eid)[0] >= since_ms)
                    and (stream_key(eid) <= hi if hi else
                         until_ms is None or stream_key(eid)[0] <= until_ms)]
        for i in range(0, len(rows), batch):
            yield _parse_events(rows[i : i + batch], on_bad)

    def add_song(self, version: int, song_id: str, record: bytes, embedding: np.ndarray,
                 ttl_s: int, *, require_current: bool = True) -> str:
        with self._cv:
            if require_current:
                self._check_current(version, f"ingesting song {song_id!r}")
            self._songs.setdefault(version, {})[song_id] = record
            self._emb.setdefault(version, {})[song_id] = encode_vector(embedding)
            self._ingested.setdefault(version, set()).add(song_id)
            eid = self._stream_id()
            self._catalogue.append((eid, song_id, version))
            self._cv.notify_all()
            return eid

    def ingested_ids(self, version: int) -> list[str]:
        return sorted(self._ingested.get(version, set()))

    def read_new_events(self, after_id: str, *, block_ms: int = 0,
                        count: int = 1000) -> tuple[list[Event], str]:
        after = stream_key(after_id)
        with self._cv:
            rows = [r for r in self._events if stream_key(r[0]) > after][:count]
            if not rows and block_ms:
                self._cv.wait(block_ms / 1000)
                rows = [r for r in self._events if stream_key(r[0]) > after][:count]
        return _parse_events(rows, None), (rows[-1][0] if rows else after_id)

    def write_warm(self, version: int, songs: Sequence[tuple[str, bytes]],
                   users: Mapping[str, np.ndarray], ttl_s: int, *, require_current: bool) -> None:
        if not songs and not users:
            return
        with self._cv:
            if require_current:
                self._check_current(version, "writing warmed factors")
            self._warm.setdefault(version, {}).update(songs)
            states = self._users.setdefault(version, {})
            update = _with_factor(users)
            for u in users:
                states[u] = update(u, states.get(u))
            if songs:
                self._warm_log.append((self._stream_id(), [s for s, _ in songs], version))
            self._cv.notify_all()

    def read_warm(self, version: int, ids: Sequence[str] | None = None) -> dict[str, bytes]:
        with self._lock:
            warm = self._warm.get(version, {})
            return dict(warm) if ids is None else {s: warm[s] for s in ids if s in warm}

    def read_warm_log(self, after_id: str) -> list[tuple[str, list[str], int]]:
        after = stream_key(after_id)
        with self._lock:
            return [r for r in self._warm_log if stream_key(r[0]) > after]

    def last_warm_id(self) -> str:
        return self._warm_log[-1][0] if self._warm_log else "0-0"

    def last_event_id(self) -> str:
        return self._events[-1][0] if self._events else "0-0"

    def read_catalogue(self, after_id: str, block_ms: int = 0) -> list[tuple[str, str, int]]:
        after = stream_key(after_id)
        with self._cv:
            rows = [r for r in self._catalogue if stream_key(r[0]) > after]
            if not rows and block_ms:
                self._cv.wait(block_ms / 1000)
                rows = [r for r in self._catalogue if stream_key(r[0]) > after]
            return rows

    def last_catalogue_id(self) -> str:
        return self._catalogue[-1][0] if self._catalogue else "0-0"


def open_store(url: str | None, namespace: str = "default", *, timeout_s: float = 5.0,
               fallback: bool = False) -> OnlineStore:
    """A :class:`RedisStore` for ``url``; with ``fallback=True`` an :class:`InProcessStore`
    when ``url`` is ``None`` or not reachable (logged), else a :class:`StoreError`."""
    if url:
        store = RedisStore(url, namespace, timeout_s=timeout_s)
        if store.ping():
            return store
        if not fallback:
            raise StoreError(f"no Redis server reachable at {redact_url(url)}")
        log.warning("no Redis at %s; using an in-process store", redact_url(url))
    return InProcessStore(namespace)
