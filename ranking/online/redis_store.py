"""The online store on a real Redis server or Redis Cluster: :class:`RedisStore` (the contract
is :mod:`.store`).

All Redis access of the online layer goes through this class. A ``redis+cluster://`` (or
``rediss+cluster://``) URL selects cluster mode: the client is a ``redis.cluster.RedisCluster``
and batches of user writes go slot by slot (:meth:`RedisStore._write_batch_per_slot`); every
other method is the same code, as the key format (:mod:`.keys`, schema 2) keeps each
transaction and script on one slot. Where things are:

- Lua scripts (module level, below): the compare-and-set of the ``current`` pointer
  (``_COMMIT_LUA``), the read of a batch's users (``_READ_USERS_LUA``) and the writes of a
  batch of events and users (``_WRITE_BATCH_LUA``);
- pipelines: one per method, built and executed inside it (reads that need several keys are one
  round trip);
- optimistic transactions (WATCH / MULTI / EXEC with retries): :meth:`RedisStore._transaction`
  and :meth:`RedisStore._write_batch` on top of it; on a cluster the compare-and-set of the
  users' states (``_WRITE_USERS_CAS_LUA``) takes the place of the WATCH of the users;
- URLs: :func:`redact_url` (for logs and messages) and the URL check of the constructor.

Field codecs and key names come from :mod:`.keys`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from apex_rank.errors import ContentionError, MissingDependencyError, StoreError, VersionMovedError
from apex_rank.ranking.state import UserState

from .keys import KEY_SCHEMA, Event, Keys, as_text, decode_events, decode_user, encode_user, encode_vector
from .store import CommitResult, OnlineStore, with_factor

log = logging.getLogger(__name__)

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


# Redis Cluster: replace the states of users of one slot only if each is still the state the
# new one was computed from (a compare-and-set on a digest, see state_digest), all or none.
# KEYS: the user hashes. ARGV: ttl, the writing call's token; per user the digest of the state
# its new one was computed from ('' when it had none), the field count and the field/value
# pairs. The token is stored in field 'x': a call that finds its own token already there (its
# reply was lost and redis-py ran it again) writes nothing twice. Returns 1 when written (or
# already written by this call), 0 when a state changed in between (nothing written).
_WRITE_USERS_CAS_LUA = """
local function digest(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return '' end
  local values, names = {}, {}
  for j = 1, #flat, 2 do values[flat[j]] = flat[j + 1]; names[#names + 1] = flat[j] end
  table.sort(names)
  local parts = {}
  for j = 1, #names do parts[j] = names[j] .. '\\n' .. #values[names[j]] .. ':' .. values[names[j]] end
  return redis.sha1hex(table.concat(parts))
end
local i, stale, done = 3, false, true
for k = 1, #KEYS do
  if redis.call('HGET', KEYS[k], 'x') ~= ARGV[2] then done = false end
  if digest(KEYS[k]) ~= ARGV[i] then stale = true end
  i = i + 2 + 2 * tonumber(ARGV[i + 1])
end
if done then return 1 end
if stale then return 0 end
i = 3
for k = 1, #KEYS do
  local n = tonumber(ARGV[i + 1])
  redis.call('DEL', KEYS[k])
  redis.call('HSET', KEYS[k], 'x', ARGV[2], unpack(ARGV, i + 2, i + 1 + 2 * n))
  redis.call('EXPIRE', KEYS[k], ARGV[1])
  i = i + 2 + 2 * n
end
return 1
"""


_SCRIPTS = (_READ_USERS_LUA, _WRITE_BATCH_LUA, _WRITE_USERS_CAS_LUA)
# run by EVALSHA (loaded on NOSCRIPT): redis-py's Script in a pipeline costs a SCRIPT EXISTS
# round trip per call
_READ_USERS_SHA, _WRITE_BATCH_SHA, _WRITE_USERS_CAS_SHA = (hashlib.sha1(s.encode()).hexdigest()
                                                          for s in _SCRIPTS)


def state_digest(fields: Mapping[Any, bytes]) -> str:
    """The digest ``_WRITE_USERS_CAS_LUA`` compares: SHA-1 over the fields sorted by name
    (hash field order is not stable in Redis), each as ``name \\n len : value``; ``""`` for no
    state. Field names are single ASCII letters (:func:`.keys.encode_user`, and ``x``)."""
    if not fields:
        return ""
    named = sorted(((k if isinstance(k, bytes) else k.encode()), v) for k, v in fields.items())
    return hashlib.sha1(b"".join(k + b"\n" + str(len(v)).encode() + b":" + v
                                 for k, v in named)).hexdigest()


def _failures() -> tuple[type[Exception], ...]:
    """What a Redis call raises when the store fails: redis-py's errors, and the cluster
    client's that are not ``RedisError``s (no reachable node, a slot no node serves)."""
    import redis

    return (redis.RedisError, redis.exceptions.RedisClusterException)


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


_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def check_url(url: str) -> None:
    from urllib.parse import parse_qsl, urlsplit

    try:
        parts = urlsplit(url)
        keys = [k for k, _ in parse_qsl(parts.query)]
    except ValueError as err:
        raise StoreError(f"invalid Redis URL {redact_url(url)}: {err}") from err
    if parts.scheme not in ("redis", "rediss", "unix", *_CLUSTER_SCHEMES):
        raise StoreError(f"Redis URL {redact_url(url)} must start with redis://, rediss:// (TLS), "
                         "unix://, or redis+cluster:// / rediss+cluster:// (Redis Cluster)")
    tls = [k for k in keys if k.startswith("ssl_")]
    if tls and parts.scheme not in ("rediss", "rediss+cluster"):
        raise StoreError(f"Redis URL {redact_url(url)} sets TLS options ({', '.join(tls)}) but is "
                         "not a rediss:// URL")
    if parts.scheme in _CLUSTER_SCHEMES:
        if parts.path not in ("", "/", "/0") or "db" in keys:
            raise StoreError(f"Redis Cluster URL {redact_url(url)} names a database; a cluster "
                             "has only database 0 (drop the /N path and db=)")
        for seed in parts.netloc.rpartition("@")[2].split(","):
            host, _, port = seed.rpartition(":")
            if not host or not port.isdigit():
                raise StoreError(f"Redis Cluster URL {redact_url(url)}: seed node {seed!r} is not "
                                 "host:port")


def _cluster_client(url: str, **options: Any) -> Any:
    """A ``RedisCluster`` for a checked ``redis+cluster://[user:password@]host:port[,host:port...]``
    URL: the first seed node goes in the URL redis-py parses (credentials, TLS options), the
    others are extra startup nodes (any one that answers is enough)."""
    from urllib.parse import urlsplit, urlunsplit

    from redis.cluster import ClusterNode, RedisCluster

    parts = urlsplit(url)
    auth, at, hosts = parts.netloc.rpartition("@")
    seeds = [(h, int(p)) for h, _, p in (seed.rpartition(":") for seed in hosts.split(","))]
    first = f"{auth}{at}{seeds[0][0]}:{seeds[0][1]}"
    plain = urlunsplit((_CLUSTER_SCHEMES[parts.scheme], first, "", parts.query, ""))
    return RedisCluster.from_url(plain, startup_nodes=[ClusterNode(h, p) for h, p in seeds[1:]],
                                 **options)


class RedisStore(OnlineStore):
    """The online store on a real Redis server (plain, password or ``rediss://`` TLS URLs) or a
    Redis Cluster (``redis+cluster://`` / ``rediss+cluster://``).

    Parameters
    ----------
    url:
        ``redis://[:password@]host:port/db`` or ``rediss://...``; for a Redis Cluster
        ``redis+cluster://[:password@]host:port[,host:port...]`` (any nodes of the cluster; the
        client discovers the rest), ``rediss+cluster://`` with TLS.
    namespace:
        Key namespace ``NS`` (see :mod:`.keys`).
    timeout_s:
        Socket and connect timeout of every call; the ranker sets it to its latency budget.

    The client is created on first use, so constructing a store never touches the network.

    Example
    -------
    >>> store = RedisStore("redis+cluster://10.0.0.5:7000,10.0.0.6:7000", "prod")
    >>> store.kind
    'redis-cluster'
    """

    kind = "redis"

    def __init__(self, url: str, namespace: str = "default", *, timeout_s: float = 5.0) -> None:
        check_url(url)
        self.url = url
        self.cluster = url.partition("://")[0] in _CLUSTER_SCHEMES
        if self.cluster:
            self.kind = "redis-cluster"
        self.keys = Keys(namespace)
        self.timeout_s = float(timeout_s)
        self._client: Any = None
        self._lock = threading.Lock()
        self._commit_script: Any = None
        self._schema1_checked = False  # an old namespace is reported once per store

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
                    options = {"socket_timeout": self.timeout_s,
                               "socket_connect_timeout": self.timeout_s,
                               "health_check_interval": 30}
                    self._client = (_cluster_client(self.url, **options) if self.cluster
                                    else redis.Redis.from_url(self.url, **options))
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
        try:
            raw = self.client.get(self.keys.current)
            if not raw and not self._schema1_checked:
                self._schema1_checked = True
                if self.client.exists(self.keys.schema1_current):
                    log.warning("namespace %r holds data of key schema 1 (%s) but nothing of "
                                "schema %d (%s): publish the bundle again (apex-rank publish); "
                                "the old keys expire by their TTLs", self.keys.namespace,
                                self.keys.schema1_current, KEY_SCHEMA, self.keys.current)
        except _failures() as err:
            raise self._fail(f"GET {self.keys.current}", err) from err
        return int(raw) if raw else None

    def next_version(self) -> int:
        try:
            return int(self.client.incr(self.keys.seq))
        except _failures() as err:
            raise self._fail(f"INCR {self.keys.seq}", err) from err

    def write_songs(self, version: int, ids: Sequence[str], records: Sequence[bytes],
                    embeddings: np.ndarray, ttl_s: int) -> None:

        emb = np.ascontiguousarray(embeddings, dtype="<f4")
        songs_key, emb_key = self.keys.songs(version), self.keys.emb(version)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(songs_key, mapping=dict(zip(ids, records, strict=True)))
            pipe.hset(emb_key, mapping={sid: emb[i].tobytes() for i, sid in enumerate(ids)})
            pipe.expire(songs_key, ttl_s)
            pipe.expire(emb_key, ttl_s)
            pipe.execute()
        except _failures() as err:
            raise self._fail(f"writing {len(ids)} songs to {songs_key}", err) from err

    def write_users(self, version: int, users: Sequence[tuple[str, UserState]], ttl_s: int) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for uid, rec in users:  # version numbers are never reused: the keys are new
                key = self.keys.user(version, uid)
                pipe.hset(key, mapping=encode_user(rec))
                pipe.expire(key, ttl_s)
            pipe.execute()
        except _failures() as err:
            raise self._fail(f"writing {len(users)} users of version {version}", err) from err

    def write_meta(self, version: int, meta: dict[str, Any], ttl_s: int) -> None:
        try:
            self.client.set(self.keys.meta(version), json.dumps(meta), ex=ttl_s)
        except _failures() as err:
            raise self._fail(f"SET {self.keys.meta(version)}", err) from err

    def read_meta(self, version: int) -> dict[str, Any] | None:
        try:
            raw = self.client.get(self.keys.meta(version))
        except _failures() as err:
            raise self._fail(f"GET {self.keys.meta(version)}", err) from err
        return json.loads(raw) if raw else None

    def version_present(self, version: int) -> tuple[int | None, bool]:
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.keys.current)
            pipe.exists(self.keys.meta(version), self.keys.songs(version))
            cur, n = pipe.execute()
        except _failures() as err:
            raise self._fail(f"EXISTS {self.keys.meta(version)}", err) from err
        return (int(cur) if cur else None), int(n) == 2

    def commit(self, version: int, expected: int | None) -> CommitResult:
        try:
            if self._commit_script is None:
                self._commit_script = self.client.register_script(_COMMIT_LUA)
            status, before, ev, cat = self._commit_script(
                keys=[self.keys.current, self.keys.meta(version), self.keys.events,
                      self.keys.catalogue],
                args=["" if expected is None else str(expected), str(version)])
        except _failures() as err:
            raise self._fail(f"commit of version {version}", err) from err
        before_v = int(before) if before else None
        if int(status) == -1:
            raise StoreError(f"version {version} has no manifest {self.keys.meta(version)}; "
                             "refusing to make an incomplete publish current")
        return CommitResult(int(status) == 1, before_v, as_text(ev), as_text(cat))

    def expire_version(self, version: int, ttl_s: int) -> int:
        n = 0
        try:
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=self.keys.version_prefix(version) + "*", count=2000):
                batch.append(key)
                if len(batch) >= 2000:
                    n += self._expire_batch(batch, ttl_s)
                    batch = []
            n += self._expire_batch(batch, ttl_s)
        except _failures() as err:
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
        key = self.keys.user(version, user_id)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.keys.current)
            pipe.hgetall(key)
            cur, raw = pipe.execute()
        except _failures() as err:
            raise self._fail(f"HGETALL {key}", err) from err
        return (int(cur) if cur else None), decode_user(user_id, raw, key)

    def read_songs(self, version: int, ids: Sequence[str]) -> list[tuple[bytes | None, bytes | None]]:
        if not ids:
            return []
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(self.keys.songs(version), list(ids))
            pipe.hmget(self.keys.emb(version), list(ids))
            recs, embs = pipe.execute()
        except _failures() as err:
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
        ``also(pipe)`` queues more writes into the same MULTI (before the script). On a Redis
        Cluster: :meth:`_write_batch_per_slot`."""
        if self.cluster:
            return self._write_batch_per_slot(version, user_ids, update, ttl_s, events, maxlen,
                                              require_current, what, also)
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
                            self._check_current(version, cur, what)
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
        except _failures() as err:
            raise self._fail(what, err) from err
        raise ContentionError(f"{what}: too many concurrent writers, nothing written")

    def _check_current(self, version: int, cur: Any, what: str) -> None:
        """Raise :class:`VersionMovedError` unless the pointer's value ``cur`` is ``version``."""
        if cur is None or int(cur) != version:
            raise VersionMovedError(f"{what}: version {version} is no longer current "
                                    f"({self.keys.current} = {as_text(cur) or 'unset'})")

    def _write_batch_per_slot(self, version: int, user_ids: Sequence[str],
                              update: Callable[[str, UserState | None], UserState], ttl_s: int,
                              events: Sequence[dict[str, str]], maxlen: int,
                              require_current: bool, what: str,
                              also: Callable[[Any], None] | None) -> tuple[list[str], dict[str, UserState]]:
        """:meth:`_write_batch` on a Redis Cluster, where a transaction holds one slot (see
        "What is atomic" in :mod:`.keys`): (1) read every user, one script per slot, pipelined
        per node; (2) compute every new state (an update that raises writes nothing); (3) in
        the namespace slot, one transaction: the version check, ``also``'s writes and the
        append of the events (a moved version writes nothing); (4) per slot, a compare-and-set
        script replaces the states computed from states that did not change since (1); the
        slots where another writer came first are read and computed again (jittered back-off,
        20 rounds). Round trips: about 4 per node that holds a user of the batch."""
        from redis.crc import key_slot

        users = list(dict.fromkeys(user_ids))
        label = f"{what} for {len(users)} user(s) of version {version}"
        keys = {u: self.keys.user(version, u) for u in users}
        by_slot: dict[int, list[str]] = {}
        for u in users:
            by_slot.setdefault(key_slot(keys[u].encode()), []).append(u)
        new: dict[str, UserState] = {}
        fields: dict[str, dict[str, bytes]] = {}
        was: dict[str, str] = {}  # the digest of the state each new one was computed from

        def compute(slots: list[int]) -> None:
            reads = self._scripts_per_slot(_READ_USERS_SHA, [(
                [keys[u] for u in by_slot[s]], []) for s in slots])
            for s, flats in zip(slots, reads, strict=True):
                for u, flat in zip(by_slot[s], flats, strict=True):
                    raw = dict(zip(flat[::2], flat[1::2], strict=True))
                    new[u] = update(u, decode_user(u, raw, keys[u]))
                    fields[u], was[u] = encode_user(new[u]), state_digest(raw)

        ids: list[str] = []
        try:
            compute(list(by_slot))
            if events or also is not None:
                def write(pipe: Any, _: list[Any]) -> None:
                    if also is not None:
                        also(pipe)
                    if events:
                        args: list[Any] = [ttl_s, maxlen, len(events)]
                        for e in events:
                            args.append(len(e))
                            for name, text in e.items():
                                args += (name, text)
                        # (redis-py's ClusterPipeline blocks its evalsha method, not the command)
                        pipe.execute_command("EVALSHA", _WRITE_BATCH_SHA, 1, self.keys.events, *args)

                res = self._transaction(version, [], None, write, require_current, label)
                ids = [as_text(x) for x in res[-1]] if events else []
            elif require_current:
                self._check_current(version, self.client.get(self.keys.current), label)
        except _failures() as err:
            raise self._fail(label, err) from err
        appended = (f"; its {len(ids)} event(s) are on {self.keys.events} ({ids[0]} .. {ids[-1]}) "
                    "without these states (the next publish replays them)") if ids else ""
        pending = list(by_slot)
        try:
            token = uuid.uuid4().hex  # marks this call's writes (see _WRITE_USERS_CAS_LUA)
            for attempt in range(20):
                calls = []
                for s in pending:
                    args: list[Any] = [ttl_s, token]
                    for u in by_slot[s]:
                        args += (was[u], len(fields[u]))
                        for name, raw in fields[u].items():
                            args += (name, raw)
                    calls.append(([keys[u] for u in by_slot[s]], args))
                done = self._scripts_per_slot(_WRITE_USERS_CAS_SHA, calls)
                pending = [s for s, ok in zip(pending, done, strict=True) if not int(ok)]
                if not pending:
                    return ids, dict(new)
                time.sleep(random.uniform(0.0, min(0.05, 0.001 * 2**attempt)))
                compute(pending)
        except _failures() as err:
            raise self._fail(label + appended, err) from err
        n = sum(len(by_slot[s]) for s in pending)
        msg = f"{label}: {n} user state(s) were changed by other writers in each of 20 rounds"
        if ids or also is not None or len(pending) < len(by_slot):
            # part of the batch is written: not a ContentionError, whose callers retry it whole
            raise StoreError(f"{msg}; the other states are written{appended}")
        raise ContentionError(f"{msg}, nothing written")

    def _scripts_per_slot(self, sha: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run script ``sha`` once per ``(keys, args)`` (the keys of one slot each) in one
        pipeline, which redis-py splits per node: one round trip per node. Loads the scripts
        on every master when one lacks them (first use, a failover, a restart) and runs again
        (a script that was not loaded did nothing)."""
        import redis

        for _ in range(3):
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                # the node named: else redis-py's cluster pipeline asks a server for the keys
                # of each EVALSHA (COMMAND GETKEYS), one round trip per script
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args,
                                     target_nodes=self.client.get_node_from_key(keys[0]))
            try:
                return list(pipe.execute())
            except redis.exceptions.NoScriptError:
                for script in _SCRIPTS:
                    self.client.script_load(script)
        return list(pipe.execute())

    def update_users(self, version: int, user_ids: Sequence[str],
                     update: Callable[[str, UserState | None], UserState], ttl_s: int, *,
                     require_current: bool) -> None:
        if user_ids:
            self._write_batch(version, user_ids, update, ttl_s, [], 0, require_current, "updating")

    def read_events(self, since_ms: int, until_ms: int | None = None, *,
                    after_id: str | None = None, until_id: str | None = None,
                    batch: int = 10000,
                    on_bad: Callable[[str, str], None] | None = None) -> Iterator[list[Event]]:

        start = f"({after_id}" if after_id else f"{int(since_ms)}-0"
        end = until_id or ("+" if until_ms is None else f"{int(until_ms)}-18446744073709551615")
        while True:
            try:
                rows = self.client.xrange(self.keys.events, min=start, max=end, count=batch)
            except _failures() as err:
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
        try:
            return sorted(m.decode() for m in self.client.smembers(self.keys.ingested(version)))
        except _failures() as err:
            raise self._fail(f"SMEMBERS {self.keys.ingested(version)}", err) from err

    def read_new_events(self, after_id: str, *, block_ms: int = 0,
                        count: int = 1000) -> tuple[list[Event], str]:

        try:
            res = self.client.xread({self.keys.events: after_id}, count=count, block=block_ms or None)
        except _failures() as err:
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
        key = self.keys.warm(version)
        try:
            if ids is None:
                return {as_text(k): v for k, v in self.client.hgetall(key).items()}
            if not ids:
                return {}
            return {s: v for s, v in zip(ids, self.client.hmget(key, list(ids)), strict=True)
                    if v is not None}
        except _failures() as err:
            raise self._fail(f"reading {key}", err) from err

    def read_warm_log(self, after_id: str) -> list[tuple[str, list[str], int]]:
        try:
            res = self.client.xread({self.keys.warm_log: after_id}, count=1000)
        except _failures() as err:
            raise self._fail(f"XREAD {self.keys.warm_log}", err) from err
        return [(as_text(eid), as_text(f[b"s"]).split(","), int(f[b"v"]))
                for _, rows in res or [] for eid, f in rows]

    def last_warm_id(self) -> str:
        return self._last_id(self.keys.warm_log)

    def last_event_id(self) -> str:
        return self._last_id(self.keys.events)

    def _last_id(self, key: str) -> str:
        try:
            rows = self.client.xrevrange(key, count=1)
        except _failures() as err:
            raise self._fail(f"XREVRANGE {key}", err) from err
        return as_text(rows[0][0]) if rows else "0-0"

    def read_catalogue(self, after_id: str, block_ms: int = 0) -> list[tuple[str, str, int]]:
        try:
            res = self.client.xread({self.keys.catalogue: after_id}, count=1000,
                                    block=block_ms or None)
        except _failures() as err:
            raise self._fail(f"XREAD {self.keys.catalogue}", err) from err
        out = []
        for _, rows in res or []:
            for eid, f in rows:
                out.append((eid.decode(), f[b"s"].decode(), int(f[b"v"])))
        return out

    def last_catalogue_id(self) -> str:
        try:
            rows = self.client.xrevrange(self.keys.catalogue, count=1)
        except _failures() as err:
            raise self._fail(f"XREVRANGE {self.keys.catalogue}", err) from err
        return rows[0][0].decode() if rows else "0-0"

    def write_worker_metrics(self, worker: str, snapshot: dict[str, Any]) -> None:
        try:
            sec, usec = self._clock()
            raw = json.dumps({**snapshot, "at": float(sec) + usec / 1e6}, separators=(",", ":"))
            self.client.hset(self.keys.metrics, worker, raw)
        except _failures() as err:
            raise self._fail(f"HSET {self.keys.metrics} {worker}", err) from err

    def read_worker_metrics(self) -> tuple[float, dict[str, bytes]]:
        try:
            if self.cluster:  # TIME has no key: a cluster pipeline cannot route it
                (sec, usec), raws = self._clock(), self.client.hgetall(self.keys.metrics)
            else:
                pipe = self.client.pipeline(transaction=False)
                pipe.time()
                pipe.hgetall(self.keys.metrics)
                (sec, usec), raws = pipe.execute()
        except _failures() as err:
            raise self._fail(f"HGETALL {self.keys.metrics}", err) from err
        return float(sec) + usec / 1e6, {as_text(k): v for k, v in raws.items()}

    def _clock(self) -> tuple[int, int]:
        """The store's ``TIME``; on a cluster the clock of the node holding the metrics hash, so
        every worker stamps and ages snapshots by one clock."""
        if self.cluster:
            return self.client.time(target_nodes=self.client.get_node_from_key(self.keys.metrics))
        return self.client.time()

    def drop_worker_metrics(self, workers: Sequence[str]) -> None:
        if not workers:
            return
        try:
            self.client.hdel(self.keys.metrics, *workers)
        except _failures() as err:
            raise self._fail(f"HDEL {self.keys.metrics}", err) from err

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
