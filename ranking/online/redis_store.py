"""The online store on a real Redis server: :class:`RedisStore` (the contract is :mod:`.store`).

All Redis access of the online layer goes through this class. Where things are:

- Lua scripts (module level, below): the compare-and-set of the ``current`` pointer
  (``_COMMIT_LUA``), the read of a batch's users (``_READ_USERS_LUA``) and the writes of a
  batch of events and users (``_WRITE_BATCH_LUA``);
- pipelines: one per method, built and executed inside it (reads that need several keys are one
  round trip);
- optimistic transactions (WATCH / MULTI / EXEC with retries): :meth:`RedisStore._transaction`
  and :meth:`RedisStore._write_batch` on top of it;
- URLs: :func:`redact_url` (for logs and messages) and the URL check of the constructor.

Field codecs and key names come from :mod:`.keys`.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from apex_rank.errors import ContentionError, MissingDependencyError, StoreError, VersionMovedError
from apex_rank.ranking.state import UserState

from .keys import Event, Keys, as_text, decode_events, decode_user, encode_user, encode_vector
from .store import CommitResult, OnlineStore, with_factor

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


def check_url(url: str) -> None:
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
        check_url(url)
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

    def write_users(self, version: int, users: Sequence[tuple[str, UserState]], ttl_s: int) -> None:
        import redis

        try:
            pipe = self.client.pipeline(transaction=False)
            for uid, rec in users:  # version numbers are never reused: the keys are new
                key = self.keys.user(version, uid)
                pipe.hset(key, mapping=encode_user(rec))
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
        return CommitResult(int(status) == 1, before_v, as_text(ev), as_text(cat))

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

    def read_user(self, version: int, user_id: str) -> tuple[int | None, UserState | None]:
        import redis

        key = self.keys.user(version, user_id)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.keys.current)
            pipe.hgetall(key)
            cur, raw = pipe.execute()
        except redis.RedisError as err:
            raise self._fail(f"HGETALL {key}", err) from err
        return (int(cur) if cur else None), decode_user(user_id, raw, key)

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
                      update: Callable[[str, UserState | None], UserState], ttl_s: int,
                      maxlen: int) -> tuple[list[str], dict[str, UserState]]:
        if not events:
            return [], {}
        return self._write_batch(version, user_ids, update, ttl_s, events, maxlen, True,
                                 f"recording {len(events)} event(s)")

    def _write_batch(self, version: int, user_ids: Sequence[str],
                     update: Callable[[str, UserState | None], UserState], ttl_s: int,
                     events: Sequence[dict[str, str]], maxlen: int, require_current: bool,
                     what: str, also: Callable[[Any], None] | None = None
                     ) -> tuple[list[str], dict[str, UserState]]:
        """Replace users by ``update`` and append ``events`` in one optimistic transaction of
        three round trips and two commands besides the WATCH (the scripts above), whatever the
        batch size: per-command overhead, not the network, bounds a batch's cost here.
        ``also(pipe)`` queues more writes into the same MULTI (before the script)."""
        users = list(dict.fromkeys(user_ids))
        keys = [self.keys.user(version, u) for u in users]
        new: dict[str, UserState] = {}

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
                old = decode_user(u, dict(zip(flat[::2], flat[1::2], strict=True)), k)
                new[u] = rec = update(u, old)
                fields = encode_user(rec)
                args.append(len(fields))
                for name, raw in fields.items():
                    args += (name, raw)
            pipe.evalsha(_WRITE_BATCH_SHA, 1 + len(keys), self.keys.events, *keys, *args)

        res = self._transaction(version, keys, read, write, require_current,
                                f"{what} for {len(users)} user(s) of version {version}")
        return [as_text(x) for x in res[-1]], dict(new)

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
                                    f"({self.keys.current} = {as_text(cur) or 'unset'})")
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
                     update: Callable[[str, UserState | None], UserState], ttl_s: int, *,
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
            yield decode_events(rows, on_bad)
            if len(rows) < batch:
                return
            start = "(" + as_text(rows[-1][0])

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
        return as_text(res[-1])

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
        return decode_events(rows, None), (as_text(rows[-1][0]) if rows else after_id)

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

        self._write_batch(version, list(users), with_factor(users), ttl_s, [], 0, require_current,
                          f"writing {len(songs)} warmed song(s) and {len(users)} user factor(s)",
                          also=also)

    def read_warm(self, version: int, ids: Sequence[str] | None = None) -> dict[str, bytes]:
        import redis

        key = self.keys.warm(version)
        try:
            if ids is None:
                return {as_text(k): v for k, v in self.client.hgetall(key).items()}
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
        return [(as_text(eid), as_text(f[b"s"]).split(","), int(f[b"v"]))
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
        return as_text(rows[0][0]) if rows else "0-0"

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

    def write_worker_metrics(self, worker: str, snapshot: dict[str, Any]) -> None:
        import redis

        try:
            sec, usec = self.client.time()
            raw = json.dumps({**snapshot, "at": float(sec) + usec / 1e6}, separators=(",", ":"))
            self.client.hset(self.keys.metrics, worker, raw)
        except redis.RedisError as err:
            raise self._fail(f"HSET {self.keys.metrics} {worker}", err) from err

    def read_worker_metrics(self) -> tuple[float, dict[str, bytes]]:
        import redis

        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.time()
            pipe.hgetall(self.keys.metrics)
            (sec, usec), raws = pipe.execute()
        except redis.RedisError as err:
            raise self._fail(f"HGETALL {self.keys.metrics}", err) from err
        return float(sec) + usec / 1e6, {as_text(k): v for k, v in raws.items()}

    def drop_worker_metrics(self, workers: Sequence[str]) -> None:
        import redis

        if not workers:
            return
        try:
            self.client.hdel(self.keys.metrics, *workers)
        except redis.RedisError as err:
            raise self._fail(f"HDEL {self.keys.metrics}", err) from err

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
