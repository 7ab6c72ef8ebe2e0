"""The online store contract: :class:`OnlineStore` and the types its methods share.

:class:`OnlineStore` is the one contract of a store; its two implementations pass the same
tests (``tests/integration/test_online_store.py``):

- :class:`~.redis_store.RedisStore`, the production store (pipelined reads and writes, a TTL on
  every versioned key, a lazily created client, an atomic compare-and-set of the ``current``
  pointer in a Lua script);
- :class:`~.memory_store.InProcessStore`, the same data in dictionaries for the demo when no
  Redis is reachable.

The key layout and every codec (user hash fields, song records, stream ids, stream rows) are
written down in :mod:`.keys`. :func:`open_store` picks an implementation from a URL; it lives
here, next to the contract it returns, so callers import one module whichever store they get
(the implementations are imported when it is called: neither is needed to use the contract).

Example
-------
>>> store = open_store(None, "demo", fallback=True)
>>> store.kind, store.current_version()
('in-process', None)
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np

from apex_rank.errors import StoreError
from apex_rank.ranking.state import UserState

from .keys import Event, Keys

log = logging.getLogger(__name__)

__all__ = ["CommitResult", "Event", "OnlineStore", "open_store", "with_factor"]


class CommitResult(NamedTuple):
    """What :meth:`OnlineStore.commit` did: whether the pointer moved, its value before, and the
    event and catalogue stream ids at the moment it moved (``""`` when it did not)."""

    moved: bool
    before: int | None
    events_mark: str
    catalogue_mark: str


def with_factor(factors: Mapping[str, np.ndarray]) -> Callable[[str, UserState | None], UserState]:
    """The pure user update of :meth:`OnlineStore.write_warm`: the state with its CF factor set
    (a user without a state gets one holding only the factor)."""

    def update(uid: str, old: UserState | None) -> UserState:
        return replace(old or UserState(uid, None, None, profile_mass=0.0),
                       cf_factor=np.asarray(factors[uid], dtype=np.float32))

    return update


class OnlineStore(ABC):
    """Contract of an online store. Versions are integers; ``None`` means none published.

    Writers (:mod:`.publisher`) stage a version, then :meth:`commit` moves ``current`` with a
    compare-and-set; readers (:mod:`.ranker`) read the pointer and one user's state in one
    round trip with :meth:`read_user`; :mod:`.events` appends a batch of events and updates the
    users' states in one transaction with :meth:`record_events`.
    """

    keys: Keys
    kind: str = "abstract"  # "redis" or "in-process", for messages and /health

    @abstractmethod
    def ping(self) -> bool:
        """True when the store answers."""

    @abstractmethod
    def current_version(self) -> int | None:
        ...

    @abstractmethod
    def next_version(self) -> int:
        """A version number no other publisher will get."""

    @abstractmethod
    def write_songs(self, version: int, ids: Sequence[str], records: Sequence[bytes],
                    embeddings: np.ndarray, ttl_s: int) -> None:
        """Write one batch of song records and embeddings ((n, d) float32) under ``version``."""

    @abstractmethod
    def write_users(self, version: int, users: Sequence[tuple[str, UserState]], ttl_s: int) -> None:
        """Write one batch of user states under ``version``."""

    @abstractmethod
    def write_meta(self, version: int, meta: dict[str, Any], ttl_s: int) -> None:
        """Write the manifest of ``version``; call it last (it marks a complete publish)."""

    @abstractmethod
    def read_meta(self, version: int) -> dict[str, Any] | None:
        ...

    def version_present(self, version: int) -> tuple[int | None, bool]:
        """The ``current`` pointer and whether ``version`` still has its manifest and song
        records (both gone after a Redis restart that lost its data). Redis: one round trip."""
        return self.current_version(), self.read_meta(version) is not None

    @abstractmethod
    def commit(self, version: int, expected: int | None) -> CommitResult:
        """Atomically point ``current`` at ``version`` if it still equals ``expected``.

        Raises :class:`StoreError` when the manifest of ``version`` is missing (an incomplete
        publish is never made current).
        """

    @abstractmethod
    def expire_version(self, version: int, ttl_s: int) -> int:
        """Set the TTL of every key of ``version``; returns how many keys were touched."""

    @abstractmethod
    def read_user(self, version: int, user_id: str) -> tuple[int | None, UserState | None]:
        """One round trip: the ``current`` pointer and ``user_id``'s state under ``version``."""

    @abstractmethod
    def read_songs(self, version: int, ids: Sequence[str]) -> list[tuple[bytes | None, bytes | None]]:
        """(record, embedding) raw bytes per id (``None`` where unknown), one round trip."""

    @abstractmethod
    def record_events(self, version: int, events: Sequence[dict[str, str]], user_ids: Sequence[str],
                      update: Callable[[str, UserState | None], UserState], ttl_s: int,
                      maxlen: int) -> tuple[list[str], dict[str, UserState]]:
        """Append ``events`` to the stream, in order, and replace the state of each user in
        ``user_ids`` under ``version`` by ``update(user_id, old)``, all or nothing and only while
        ``version`` is current (else :class:`VersionMovedError`, nothing written).

        A bounded number of round trips whatever the batch size (Redis: WATCH, one read of the
        pointer and the users, MULTI/EXEC of one script doing every write). ``update`` must be
        pure: a transaction retried after a concurrent write calls it again. An exception it
        raises leaves nothing written. Returns the stream ids (one per event) and the new states
        by user id.
        """

    def record_event(self, version: int, event: dict[str, str], user_id: str,
                     update: Callable[[UserState | None], UserState], ttl_s: int,
                     maxlen: int) -> tuple[str, UserState]:
        """One event through :meth:`record_events`: returns its stream id and the new state."""
        ids, new = self.record_events(version, [event], [user_id], lambda _u, old: update(old),
                                      ttl_s, maxlen)
        return ids[0], new[user_id]

    @abstractmethod
    def update_users(self, version: int, user_ids: Sequence[str],
                     update: Callable[[str, UserState | None], UserState], ttl_s: int, *,
                     require_current: bool) -> None:
        """Replace each user's state under ``version`` by ``update(user_id, old)`` in one
        transaction (retried if a concurrent writer touched one of them); with
        ``require_current``, only while ``version`` is current (else :class:`VersionMovedError`)."""

    @abstractmethod
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

    @abstractmethod
    def add_song(self, version: int, song_id: str, record: bytes, embedding: np.ndarray,
                 ttl_s: int, *, require_current: bool = True) -> str:
        """Add one ingested song to ``version`` and announce it on the catalogue stream, as one
        transaction; with ``require_current``, only while ``version`` is current (else
        :class:`VersionMovedError`). Returns the catalogue stream id."""

    @abstractmethod
    def ingested_ids(self, version: int) -> list[str]:
        ...

    @abstractmethod
    def read_new_events(self, after_id: str, *, block_ms: int = 0,
                        count: int = 1000) -> tuple[list[Event], str]:
        """Up to ``count`` events after stream id ``after_id``, waiting up to ``block_ms`` for one
        when there are none (0: do not wait), and the last stream id read (rows that are not
        events are skipped, as in :meth:`read_events`, but read past). The warm-up consumer
        follows the event stream with it."""

    @abstractmethod
    def last_event_id(self) -> str:
        """The id of the latest event on the stream (``"0-0"``: none)."""

    @abstractmethod
    def write_warm(self, version: int, songs: Sequence[tuple[str, bytes]],
                   users: Mapping[str, np.ndarray], ttl_s: int, *, require_current: bool) -> None:
        """Store what the warm-up consumer solved, as one transaction: warm records (see
        :mod:`.keys`) of ``songs`` in ``v{V}:warm``, the CF factor (field ``f``) of each user in
        ``users`` (the rest of their state is kept; a user without a state gets one holding
        only the factor), and one announcement of the songs on the warm log. With
        ``require_current``, only while ``version`` is current (else
        :class:`VersionMovedError`, nothing written)."""

    @abstractmethod
    def read_warm(self, version: int, ids: Sequence[str] | None = None) -> dict[str, bytes]:
        """Warm records of ``version`` by song id: those of ``ids`` that exist, or all (None)."""

    @abstractmethod
    def read_warm_log(self, after_id: str) -> list[tuple[str, list[str], int]]:
        """Warm-log announcements after ``after_id``: (stream id, song ids, version)."""

    @abstractmethod
    def last_warm_id(self) -> str:
        """The id of the latest warm-log announcement (``"0-0"``: none)."""

    @abstractmethod
    def read_catalogue(self, after_id: str, block_ms: int = 0) -> list[tuple[str, str, int]]:
        """Catalogue announcements after ``after_id``: (stream id, song id, version)."""

    @abstractmethod
    def last_catalogue_id(self) -> str:
        ...

    @abstractmethod
    def write_worker_metrics(self, worker: str, snapshot: dict[str, Any]) -> None:
        """Store ``worker``'s metrics snapshot in the shared metrics hash, stamped with the
        store's clock (field ``at``, unix seconds) so every worker ages snapshots alike."""

    @abstractmethod
    def read_worker_metrics(self) -> tuple[float, dict[str, bytes]]:
        """The store's clock (unix seconds) and every worker's raw snapshot, one round trip."""

    @abstractmethod
    def drop_worker_metrics(self, workers: Sequence[str]) -> None:
        """Remove the snapshots of ``workers`` (a stopped or dead worker's)."""

    def close(self) -> None:  # noqa: B027 - a store without connections has nothing to release
        """Release connections (no-op for the in-process store)."""


def open_store(url: str | None, namespace: str = "default", *, timeout_s: float = 5.0,
               fallback: bool = False) -> OnlineStore:
    """A :class:`RedisStore` for ``url``; with ``fallback=True`` an :class:`InProcessStore`
    when ``url`` is ``None`` or not reachable (logged), else a :class:`StoreError`."""
    from .memory_store import InProcessStore
    from .redis_store import RedisStore, redact_url

    if url:
        store = RedisStore(url, namespace, timeout_s=timeout_s)
        if store.ping():
            return store
        if not fallback:
            raise StoreError(f"no Redis server reachable at {redact_url(url)}")
        log.warning("no Redis at %s; using an in-process store", redact_url(url))
    return InProcessStore(namespace)
