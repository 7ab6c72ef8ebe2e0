"""The online store in this process's memory: :class:`InProcessStore` (the contract is :mod:`.store`).

For the demo and tests without a Redis server: the same data in dictionaries, under one lock,
with the same semantics (compare-and-set commit, all-or-nothing batches, stream ids
``ms-seq``); TTLs are recorded but not enforced, nothing is shared between processes.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from apex_rank.errors import StoreError, VersionMovedError
from apex_rank.ranking.state import UserState

from .keys import Event, Keys, decode_events, encode_vector, stream_key
from .store import CommitResult, OnlineStore, with_factor


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
        self._users: dict[int, dict[str, UserState]] = {}
        self._events: list[tuple[str, dict[str, str]]] = []
        self._catalogue: list[tuple[str, str, int]] = []
        self._warm: dict[int, dict[str, bytes]] = {}
        self._warm_log: list[tuple[str, list[str], int]] = []
        self._last_ms, self._last_seq = 0, 0
        self._metrics: dict[str, bytes] = {}
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

    def write_users(self, version: int, users: Sequence[tuple[str, UserState]], ttl_s: int) -> None:
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

    def read_user(self, version: int, user_id: str) -> tuple[int | None, UserState | None]:
        with self._lock:
            return self._current, self._users.get(version, {}).get(user_id)

    def read_songs(self, version: int, ids: Sequence[str]) -> list[tuple[bytes | None, bytes | None]]:
        with self._lock:
            s, e = self._songs.get(version, {}), self._emb.get(version, {})
            return [(s.get(i), e.get(i)) for i in ids]

    def record_events(self, version: int, events: Sequence[dict[str, str]], user_ids: Sequence[str],
                      update: Callable[[str, UserState | None], UserState], ttl_s: int,
                      maxlen: int) -> tuple[list[str], dict[str, UserState]]:
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
                     update: Callable[[str, UserState | None], UserState], ttl_s: int, *,
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
            yield decode_events(rows[i : i + batch], on_bad)

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
        return decode_events(rows, None), (rows[-1][0] if rows else after_id)

    def write_warm(self, version: int, songs: Sequence[tuple[str, bytes]],
                   users: Mapping[str, np.ndarray], ttl_s: int, *, require_current: bool) -> None:
        if not songs and not users:
            return
        with self._cv:
            if require_current:
                self._check_current(version, "writing warmed factors")
            self._warm.setdefault(version, {}).update(songs)
            states = self._users.setdefault(version, {})
            update = with_factor(users)
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

    def write_worker_metrics(self, worker: str, snapshot: dict[str, Any]) -> None:
        raw = json.dumps({**snapshot, "at": time.time()}, separators=(",", ":")).encode()
        with self._lock:
            self._metrics[worker] = raw

    def read_worker_metrics(self) -> tuple[float, dict[str, bytes]]:
        with self._lock:
            return time.time(), dict(self._metrics)

    def drop_worker_metrics(self, workers: Sequence[str]) -> None:
        with self._lock:
            for w in workers:
                self._metrics.pop(w, None)

