"""Live warm-up: plays recorded online move CF factors between retrains.

What moves
----------
- A song the bundle has no CF factor for (cold in the bundle, or ingested since) gets one from
  the ALS item step over its listeners (:func:`~apex_rank.ranking.cf.solve_item_factor`): the
  listeners' factors, implicit's confidence ``c = alpha·w`` of each listener's summed event
  weights, the bundle's regularization and alpha, and the Gram matrix of the bundle's users
  plus each listener who is not one of them (every term the full step has for the song's own
  listeners; users without plays of the song who are not in the bundle are left out, so a
  song's factor depends on its listeners only).
- A user the bundle has no CF factor for (created by ``/events``) gets one from the ALS user
  step over their history: :meth:`~apex_rank.ranking.cf.CFModel.factor_from_history`, the
  function offline fold-in (``Recommender.state_from_history``) calls, so the same history
  gives the same factor. The step reads the bundle's item factors only; a history of nothing
  but new songs gives no factor yet.
- Nothing the bundle fitted moves: its songs and users keep their factors. The stream does not
  hold the training interactions they were fitted on, and a step over online plays alone would
  throw those away; the next retrain moves them.

The state of a version is a pure function of its bundle and the events since the bundle's
cutoff: factors are solved from summed weights, not nudged by each event, so replaying the same
events gives the same factors (a restarted consumer, two consumers, and the carry-over at
publish all write the same values).

Where it runs and where it goes
-------------------------------
:class:`WarmUpConsumer` follows the event stream (blocking reads) in a background thread, never
in a request. Per batch of events it solves the changed users and songs and writes them in one
transaction (:meth:`~.store.OnlineStore.write_warm`): warm records in ``v{V}:warm``, new users'
factors in their state's ``f`` field (which ``/recommend`` already reads), and an announcement
on the warm log, which every ranker's follower applies to its engine within
``follow_interval_s`` (see :mod:`.ranker`). The consumer follows the ``current`` pointer: on a
new version it rebuilds its state from that version's cutoff (``events_since_ms`` in the
manifest) with that version's bundle.

Carry-over: ``publish`` runs :func:`replay_warmup` over the events since the bundle's cutoff
into the staged version before its commit, as it replays the events themselves, so a new
version is served warm from its first request; after the commit the consumer takes over.

Example
-------
>>> consumer = WarmUpConsumer(store, cf_loader=bundle_cf_loader(engine=engine))  # doctest: +SKIP
>>> consumer.start()                                                              # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apex_rank.errors import StoreError, VersionMovedError
from apex_rank.ranking.cf import CFModel, solve_item_factor

from .bundles import locate_bundle
from .config import OnlineConfig
from .engine import RankingEngine
from .events import event_problem
from .keys import Event, encode_warm_song, stream_id_before
from .store import OnlineStore

log = logging.getLogger(__name__)

CFLoader = Callable[[int, dict[str, Any]], CFModel]


class WarmUp:
    """The warm-up state of one version over its bundle's :class:`CFModel` (pure, in memory).

    Attributes
    ----------
    song_factors: song id -> (f,) float32 factor of each warmed song.
    plays: song id -> events with a positive weight on each song the bundle has no factor for
        (its popularity once warm, as the bundle counts interactions).
    user_factors: user id -> (f,) float32 factor of each warmed user.

    Example
    -------
    >>> warm = WarmUp(recommender.cf)                      # doctest: +SKIP
    >>> songs, users = warm.add(events)                    # doctest: +SKIP
    """

    def __init__(self, cf: CFModel) -> None:
        self.cf = cf
        U = cf.user_factors.astype(np.float64)
        self._gram = U.T @ U
        self._listeners: dict[str, dict[str, float]] = {}  # new song -> user -> summed weight
        self._histories: dict[str, dict[str, float]] = {}  # new user -> song -> summed weight
        self.plays: dict[str, int] = {}
        self.song_factors: dict[str, np.ndarray] = {}
        self.user_factors: dict[str, np.ndarray] = {}

    def add(self, events: Iterable[Event]) -> tuple[list[str], list[str]]:
        """Apply ``events`` (skips, weight 0, change nothing) and re-solve what they touched:
        new users who played, then new songs that were played or whose listeners' factors
        moved. Returns (songs, users) whose factors were (re)solved, in first-touch order."""
        evs = [e for e in events if e.weight > 0]
        songs: dict[str, None] = {}
        users: dict[str, None] = {}
        for e, j in zip(evs, self.cf.song_index([e.song_id for e in evs]).tolist(), strict=True):
            if not self.cf.has_user(e.user_id):
                h = self._histories.setdefault(e.user_id, {})
                h[e.song_id] = h.get(e.song_id, 0.0) + e.weight
                users[e.user_id] = None
            if j < 0:
                ls = self._listeners.setdefault(e.song_id, {})
                ls[e.user_id] = ls.get(e.user_id, 0.0) + e.weight
                self.plays[e.song_id] = self.plays.get(e.song_id, 0) + 1
                songs[e.song_id] = None
        moved = []
        for u in users:
            h = self._histories[u]
            f = self.cf.factor_from_history(list(h), list(h.values()))
            if f is None:  # nothing but new songs so far
                continue
            self.user_factors[u] = f
            moved.append(u)
            songs.update((s, None) for s in h if s in self._listeners)
        solved = [s for s in songs if self._solve_song(s)]
        return solved, moved

    def _solve_song(self, song_id: str) -> bool:
        rows, weights, G = [], [], self._gram
        for u, w in self._listeners[song_id].items():
            if self.cf.has_user(u):
                rows.append(self.cf.user_factor(u))
            elif u in self.user_factors:
                x = self.user_factors[u].astype(np.float64)
                rows.append(x)
                G = G + np.outer(x, x)  # not in the bundle's Gram: add its base term
            else:
                continue
            weights.append(w)
        if not rows:
            return False
        self.song_factors[song_id] = solve_item_factor(
            np.stack(rows), np.arange(len(rows)), np.asarray(weights), alpha=self.cf.step_alpha,
            regularization=self.cf.config.regularization, gram=G)
        return True

    def records(self, song_ids: Sequence[str]) -> list[tuple[str, bytes]]:
        """Warm records (see :mod:`.keys`) of warmed songs."""
        return [(s, encode_warm_song(self.song_factors[s], self.plays[s])) for s in song_ids]


def write_warm(store: OnlineStore, version: int, warm: WarmUp, songs: Sequence[str],
               users: Sequence[str], *, ttl_s: int, batch: int, require_current: bool) -> None:
    """Write the given songs' and users' factors of ``warm`` to ``version`` in transactions of
    at most ``batch`` songs and ``batch`` users."""
    for lo in range(0, max(len(songs), len(users)), batch):
        store.write_warm(version, warm.records(songs[lo : lo + batch]),
                         {u: warm.user_factors[u] for u in users[lo : lo + batch]}, ttl_s,
                         require_current=require_current)


def replay_warmup(store: OnlineStore, version: int, cf: CFModel, after_id: str, *,
                  config: OnlineConfig, require_current: bool) -> tuple[int, int]:
    """Warm ``version`` up from the events after stream id ``after_id`` (the carry-over of
    ``publish``): solve them with a fresh :class:`WarmUp` over ``cf`` and write every warmed
    song and user. Events an older writer let through (:func:`~.events.event_problem`) are
    skipped. Returns (songs, users) written."""
    warm = WarmUp(cf)
    for batch in store.read_events(0, after_id=after_id):
        warm.add(e for e in batch if event_problem(e) is None)
    ttl = config.version_ttl_s if require_current else config.staging_ttl_s
    write_warm(store, version, warm, list(warm.song_factors), list(warm.user_factors), ttl_s=ttl,
               batch=config.batch_size, require_current=require_current)
    return len(warm.song_factors), len(warm.user_factors)


def bundle_cf_loader(*, engine: RankingEngine | None = None, bundle: str | Path | None = None,
                     bundle_root: str | Path | None = None) -> CFLoader:
    """A loader of a version's :class:`CFModel`: ``engine``'s when its fingerprint is the
    version's, else ``cf.npz`` of the local bundle folder :func:`~.bundles.locate_bundle` finds
    (``bundle``, a sub-folder of ``bundle_root``, or the publisher's folder)."""

    def load(version: int, meta: dict[str, Any]) -> CFModel:
        fp = str(meta.get("fingerprint"))
        if engine is not None and engine.fingerprint == fp:
            return engine.cf_model
        published = meta.get("bundle_dir")
        folder = locate_bundle(fp, bundle=bundle, bundle_root=bundle_root,
                               published_dir=None if published is None else str(published),
                               version=version)
        return CFModel.load(Path(folder) / "cf.npz")

    return load


class WarmUpConsumer:
    """The background consumer of the event stream that warms factors up (see the module doc).

    Parameters
    ----------
    store:
        The store to follow and write; its socket timeout must exceed ``block_ms``.
    cf_loader:
        (version, manifest) -> the version's :class:`CFModel` (see :func:`bundle_cf_loader`).
    config:
        TTLs, ``batch_size`` (users and songs per write) and ``retry_s`` (wait after a failure).
    block_ms:
        How long one read waits for new events.
    read_count:
        Most events read, solved and written per round.

    Example
    -------
    >>> with WarmUpConsumer(store, cf_loader=bundle_cf_loader(engine=engine)).start():  # doctest: +SKIP
    ...     record(store, "u1", "new-song")
    """

    def __init__(self, store: OnlineStore, *, cf_loader: CFLoader, config: OnlineConfig | None = None,
                 block_ms: int = 500, read_count: int = 1000) -> None:
        self.store = store
        self.config = config or OnlineConfig(namespace=store.keys.namespace)
        self._load_cf = cf_loader
        self.block_ms = int(block_ms)
        self.read_count = int(read_count)
        self.version: int | None = None
        self.warm: WarmUp | None = None
        self.stats = {"events": 0, "songs_written": 0, "users_written": 0, "rounds": 0, "errors": 0}
        self._after = "0-0"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _begin(self, version: int) -> None:
        """Start the state of ``version`` from its cutoff (or from now for a manifest without one)."""
        meta = self.store.read_meta(version)
        if meta is None:
            raise StoreError(f"version {version} has no manifest {self.store.keys.meta(version)}")
        since = meta.get("events_since_ms")
        if since is None:
            after = self.store.last_event_id()
            log.warning("version %d names no events_since_ms (published before warm-up): warming "
                        "from events after %s only", version, after)
        else:
            after = stream_id_before(int(since))
        self.warm = WarmUp(self._load_cf(version, meta))
        self.version, self._after = version, after
        log.info("warm-up follows version %d from event %s", version, after)

    def step(self, block_ms: int | None = None) -> int:
        """One round: follow the pointer, read new events (waiting up to ``block_ms``, default
        ``self.block_ms``, when there are none), solve what they touched, write it. Returns the
        number of events applied. Raises :class:`StoreError` when the store fails."""
        cur = self.store.current_version()
        if cur is None:
            self._stop.wait((self.block_ms if block_ms is None else block_ms) / 1000)
            return 0
        if cur != self.version or self.warm is None:
            self._begin(cur)
        assert self.warm is not None and self.version is not None  # set by _begin
        events, last = self.store.read_new_events(
            self._after, block_ms=self.block_ms if block_ms is None else block_ms, count=self.read_count)
        ok = [e for e in events if event_problem(e) is None]
        songs, users = self.warm.add(ok)
        try:
            write_warm(self.store, self.version, self.warm, songs, users,
                       ttl_s=self.config.version_ttl_s, batch=self.config.batch_size,
                       require_current=True)
        except VersionMovedError as err:  # a publish committed: start over on the new version
            log.info("warm-up: %s", err)
            self.version = None
            return 0
        self._after = last
        self.stats["rounds"] += 1
        self.stats["events"] += len(ok)
        self.stats["songs_written"] += len(songs)
        self.stats["users_written"] += len(users)
        return len(ok)

    def catch_up(self) -> int:
        """Run rounds without waiting until the stream is read to its end; returns events applied."""
        n = 0
        while True:
            before = (self.version, self._after)
            n += self.step(block_ms=0)
            if (self.version, self._after) == before:  # nothing new read, no version moved
                return n

    def start(self) -> WarmUpConsumer:
        """Run :meth:`step` in a daemon thread until :meth:`stop` (store failures are logged and
        retried after ``config.retry_s``)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="apexrank-warmup", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except StoreError as err:
                self.stats["errors"] += 1
                log.warning("warm-up consumer: %s", err)
                self._stop.wait(self.config.retry_s)
            except Exception:  # noqa: BLE001 - keep consuming; the error is logged with its trace
                self.stats["errors"] += 1
                log.exception("warm-up consumer failed; retrying")
                self._stop.wait(self.config.retry_s)

    def stop(self) -> None:
        """Stop the thread (within ``block_ms``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.block_ms / 1000 + 10.0)
            self._thread = None

    def __enter__(self) -> WarmUpConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
