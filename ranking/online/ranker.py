"""``OnlineRanker``: rank for a user in milliseconds from the published version in the store.

Per request: one pipelined round trip reads the ``current`` pointer and the user's state under
the version this process serves; the engine (FAISS, the offline feature-frame builder,
LightGBM, all in-process) ranks it. Song records need no per-request read: they are static
per version and live in the engine loaded from the version's bundle; songs ingested later
arrive through the catalogue stream, which a background follower applies within
``follow_interval_s``.

Warm-up (see :mod:`.warmup`): factors the warm-up consumer solves for new songs are announced
on the warm log; the follower reads them from ``v{V}:warm`` into the engine within
``follow_interval_s``, and a version is loaded with all of its warmed songs. New users' factors
need nothing: they are in the user state each request reads.

Versions: the follower (and every request, through the pointer read) notices a moved pointer;
the new version's engine is loaded in the background and swapped in as one reference
assignment, while requests keep being served by the old version (its keys live on for the
grace period). A response is therefore computed from exactly one version, which it names.

Failures: when the round trip fails or exceeds ``budget_ms`` the answer comes from the
precomputed popularity-and-quality list, marked ``degraded`` (never an exception); the
ranker retries Redis after ``retry_s``. An unknown user gets the engine's cold-user path.
Redis can also answer and yet have lost the data (a restart without persistence, eviction):
then every user would look unknown. A missing ``current`` pointer comes with the request's
read for free; every ``data_check_s`` a pipelined check (:meth:`OnlineRanker.check_data`)
confirms that the served version still has its manifest and song records. While either is
gone the answers are the fallback list, marked ``degraded``, until the version is back or
another one is published.

Bundles (see :mod:`.bundles`): a version's manifest names the fingerprint of the bundle it was
published from. A host serving it loads the local folder with that fingerprint (``bundle``,
a sub-folder of ``bundle_root``, or the publisher's path when neither is given) and refuses
any other: at start the refusal is an error; a version published later whose bundle this host
does not hold is not switched to. The old version keeps serving, its answers marked
``degraded`` with the reason (and ``/health`` degraded), and the lookup is retried every
``retry_s`` (copy the bundle in and the host switches).

Example
-------
>>> ranker = OnlineRanker.connect("redis://127.0.0.1:6379/0", namespace="prod")  # doctest: +SKIP
>>> ranker.rank("u42", k=20).items[0].song_id                                   # doctest: +SKIP
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apex_rank.errors import ConfigError, RequestError, StoreError
from apex_rank.ranking.candidates import FactorIndexConfig
from apex_rank.ranking.reranker import check_cold_share

from .audio import AudioIngestConfig
from .bundles import BundleMismatchError, locate_bundle
from .config import OnlineConfig
from .engine import RankingEngine
from .keys import check_id, decode_song_record, decode_vector, decode_warm_song
from .redis_store import RedisStore
from .store import OnlineStore

log = logging.getLogger(__name__)

EngineLoader = Callable[[str], RankingEngine]


@dataclass(frozen=True)
class RankedItem:
    """One recommended song."""

    song_id: str
    score: float
    source: str


@dataclass(frozen=True)
class Ranking:
    """The answer of :meth:`OnlineRanker.rank`.

    ``model_version`` is the published version that produced it (``"fallback"`` when no
    version could be read); ``degraded`` is true when the store was unavailable and the items
    come from the popularity-and-quality list, or when this host lacks the current version's
    bundle and the items come from the older version it still serves (``reason`` says which);
    ``cold_user`` when the user had no state.
    """

    user_id: str
    model_version: str
    degraded: bool
    items: list[RankedItem]
    cold_user: bool = False
    reason: str | None = None
    cold_shortfall: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "user_id": self.user_id,
            "model_version": self.model_version,
            "degraded": self.degraded,
            "items": [{"song_id": i.song_id, "score": i.score, "source": i.source}
                      for i in self.items],
        }
        if self.cold_shortfall is not None:
            out["cold_shortfall"] = self.cold_shortfall
        return out


@dataclass
class _Active:
    version: int | None
    engine: RankingEngine
    meta: dict[str, Any] = field(default_factory=dict)


def check_k(k: object, max_k: int) -> int:
    """``k`` as an int in ``[1, max_k]``, else :class:`RequestError`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise RequestError(f"k must be an integer, got {k!r}")
    if not 1 <= int(k) <= max_k:
        raise RequestError(f"k must be between 1 and {max_k}, got {k}")
    return int(k)


def default_loader(bundle_dir: str) -> RankingEngine:
    """Load the engine of a bundle folder."""
    return RankingEngine.load(bundle_dir)


def engine_loader(fallback_size: int, max_batch: int = 16,
                  als_index: FactorIndexConfig | None = None,
                  audio: AudioIngestConfig | None = None) -> EngineLoader:
    """A loader building :class:`RankingEngine` with the given fallback length,
    micro-batch bound, approximate ``als`` source and audio ingest settings."""

    def load(bundle_dir: str) -> RankingEngine:
        return RankingEngine.load(bundle_dir, fallback_size=fallback_size, max_batch=max_batch,
                                  als_index=als_index, audio=audio)

    return load


class OnlineRanker:
    """Serve rankings from the store's current version (see the module doc).

    Parameters
    ----------
    store:
        The store requests read from; for Redis its socket timeout is the latency budget.
    config:
        :class:`OnlineConfig`.
    loader:
        Bundle folder -> engine (default: the offline ``Recommender``'s engine).
    bundle_dir:
        The bundle folder this host serves: loaded at start (served degraded when the store is
        unreachable), and the only folder a version is loaded from; a version published from
        another bundle (another fingerprint) is refused (see the module doc).
    bundle_root:
        A folder of bundles, one per sub-folder: a version is loaded from the sub-folder whose
        fingerprint it names. With neither, the publisher's ``bundle_dir`` is loaded.
    engine:
        An already loaded engine for ``bundle_dir`` (skips loading it again).
    follow_store:
        Store used by the background follower (blocking reads need a longer timeout than the
        request budget); ``None``: no follower thread.
    """

    def __init__(self, store: OnlineStore, *, config: OnlineConfig | None = None,
                 loader: EngineLoader | None = None, bundle_dir: str | None = None,
                 engine: RankingEngine | None = None,
                 follow_store: OnlineStore | None = None, bundle_root: str | None = None) -> None:
        self.config = config or OnlineConfig()
        self.store = store
        self._loader = loader or engine_loader(self.config.fallback_size, self.config.max_batch,
                                               self.config.als_index, self.config.audio)
        self._down_until = 0.0
        self._switch_lock = threading.Lock()
        self._switching: int | None = None
        self._stop = threading.Event()
        self._catalogue_id = "0-0"
        self._warm_id = "0-0"
        self.stats: dict[str, int] = {"requests": 0, "degraded": 0, "cold_users": 0, "switches": 0}
        self._missing: str | None = None  # why the served version's keys look gone (check_data)
        self._bundle, self._bundle_root = bundle_dir, bundle_root
        self._refused: tuple[int, str] | None = None  # (version, why) not switched to
        self._retry_refused = 0.0
        self._next_check = 0.0
        self._thread: threading.Thread | None = None
        if follow_store is not None:
            # Read the catalogue position before loading the version: a song ingested in between
            # is then seen twice (harmless), never missed.
            try:
                self._catalogue_id = follow_store.last_catalogue_id()
                self._warm_id = follow_store.last_warm_id()
            except StoreError as err:
                log.warning("catalogue not readable yet: %s", err)
        self._active = self._initial(bundle_dir, engine)
        self._settle_heap()
        if follow_store is not None:
            self._follow_store = follow_store
            self._thread = threading.Thread(target=self._follow, name="apexrank-follow", daemon=True)
            self._thread.start()

    @classmethod
    def connect(cls, url: str, *, namespace: str | None = None, config: OnlineConfig | None = None,
                bundle_dir: str | None = None, loader: EngineLoader | None = None,
                engine: RankingEngine | None = None, follow: bool = True,
                bundle_root: str | None = None) -> OnlineRanker:
        """A ranker over Redis at ``url`` with a follower thread (the usual way to build one)."""
        cfg = config or OnlineConfig()
        ns = namespace or cfg.namespace
        store = RedisStore(url, ns, timeout_s=cfg.budget_ms / 1000.0)
        follow_store = (RedisStore(url, ns, timeout_s=cfg.follow_interval_s + 5.0)
                        if follow else None)
        return cls(store, config=cfg, loader=loader, bundle_dir=bundle_dir, engine=engine,
                   follow_store=follow_store, bundle_root=bundle_root)

    # -- versions ---------------------------------------------------------------------------

    def _make_active(self, version: int | None, engine: RankingEngine,
                     meta: dict[str, Any]) -> _Active:
        return _Active(version, engine, meta)

    def _load_version(self, version: int, store: OnlineStore,
                      engine: RankingEngine | None = None) -> _Active:
        meta = store.read_meta(version)
        if meta is None:
            raise StoreError(f"version {version} has no manifest {store.keys.meta(version)}")
        fp = str(meta.get("fingerprint"))
        if engine is None or engine.fingerprint != fp:
            published = meta.get("bundle_dir")
            folder = locate_bundle(fp, bundle=self._bundle, bundle_root=self._bundle_root,
                                   published_dir=None if published is None else str(published),
                                   version=version)
            engine = self._loader(folder)
        if engine.fingerprint != fp:  # the folder changed while it was loaded
            raise BundleMismatchError(f"bundle {engine.bundle_dir} has fingerprint "
                                      f"{engine.fingerprint}, version {version} serves fingerprint {fp}")
        self._apply_ingested(engine, version, store.ingested_ids(version), store)
        self._apply_warm(engine, version, None, store)
        return self._make_active(version, engine, meta)

    def _initial(self, bundle_dir: str | None, engine: RankingEngine | None) -> _Active:
        if engine is None and bundle_dir is not None:
            engine = self._loader(bundle_dir)
        try:
            cur = self.store.current_version()
            if cur is None:
                raise StoreError(f"nothing is published under {self.store.keys.current}")
            return self._load_version(cur, self.store, engine)
        except StoreError as err:
            if engine is None:
                raise
            log.warning("serving bundle %s degraded: %s", engine.bundle_dir, err)
            self._down_until = time.monotonic() + self.config.retry_s
            return self._make_active(None, engine, {})

    def refresh(self) -> int | None:
        """Check the pointer now and switch (synchronously) if it moved; returns the version."""
        cur = self.store.current_version()
        if cur is not None and cur != self._active.version:
            self._switch(cur, self.store)
        return self._active.version

    def _switch(self, version: int, store: OnlineStore) -> None:
        with self._switch_lock:
            if self._active.version == version:
                return
            if (self._refused is not None and self._refused[0] == version
                    and time.monotonic() < self._retry_refused):
                return
            self._switching = version
            try:
                new = self._load_version(version, store)
            except BundleMismatchError as err:
                self._refuse(version, str(err))
                return
            finally:
                self._switching = None
            self._refused = None
            old = self._active
            self._active = new  # one reference assignment: a request sees old or new, never both
            self.stats["switches"] += 1
            if old.engine is not new.engine:
                old.engine.close()  # requests still on it finish normally
            log.info("switched from version %s to %d", old.version, version)
            del old
            self._settle_heap()

    def _refuse(self, version: int, why: str) -> None:
        """Keep serving the old version: this host lacks ``version``'s bundle (see the module doc)."""
        self._retry_refused = time.monotonic() + self.config.retry_s
        if self._refused != (version, why):
            log.error("not switching to version %d, still serving version %s (degraded): %s",
                      version, self._active.version, why)
        self._refused = (version, why)

    @property
    def bundle_refused(self) -> str | None:
        """Why the current version's bundle was refused (this host serves an older one), or ``None``."""
        return None if self._refused is None else self._refused[1]

    def _settle_heap(self) -> None:
        """See ``OnlineConfig.freeze_gc``: unfreeze (so a replaced engine's cycles are found),
        collect once, freeze what is left. One pause per load instead of random ones later."""
        if self.config.freeze_gc:
            t0 = time.perf_counter()
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            log.info("gc: froze %d objects in %.0f ms", gc.get_freeze_count(),
                     1000 * (time.perf_counter() - t0))

    def _request_switch(self, version: int) -> None:
        """A request saw a moved pointer. With a follower thread, it switches (in the
        background, within ``follow_interval_s``) and this request stays on the old version;
        without one, switch now."""
        if self._thread is not None or self._switching is not None:
            return
        try:
            self._switch(version, self.store)
        except StoreError as err:
            log.error("cannot switch to version %d: %s", version, err)

    def check_data(self, store: OnlineStore | None = None) -> str | None:
        """Check now that the version this process serves still has its keys (one round trip,
        :meth:`OnlineStore.version_present`); returns why not (kept, see the module doc), or
        ``None``.

        Raises
        ------
        StoreError
            The store did not answer (the previous answer is kept).
        """
        self._next_check = time.monotonic() + self.config.data_check_s
        active = self._active
        if active.version is not None:
            cur, present = (store or self.store).version_present(active.version)
            self._note_data(active.version, cur, present)
        return self._missing

    def _note_data(self, version: int, cur: int | None, present: bool) -> None:
        if cur is None:
            missing = f"nothing is published any more while version {version} is served"
        elif cur == version and not present:
            missing = f"version {version} is current but its manifest or song records are missing"
        else:
            missing = None  # present, or a newer version to switch to
        if cur == version:
            self._refused = None  # the pointer is back on the version served here
        if missing != self._missing:
            if missing is not None:
                log.error("%s (did the store lose its data?); answering degraded until a version "
                          "is published again", missing)
            else:
                log.warning("the keys of version %s are readable again", version)
        self._missing = missing

    @property
    def data_missing(self) -> str | None:
        """Why the served version's keys look gone at the last check, or ``None``."""
        return self._missing

    @property
    def version(self) -> int | None:
        """The version this process serves (``None`` while degraded since start)."""
        return self._active.version

    @property
    def engine(self) -> RankingEngine:
        return self._active.engine

    # -- songs ------------------------------------------------------------------------------

    @staticmethod
    def _apply_ingested(engine: RankingEngine, version: int, ids: list[str],
                        store: OnlineStore) -> int:
        new = [s for s in ids if not engine.has_song(s)]
        if not new:
            return 0
        n = 0
        for sid, (rec, emb) in zip(new, store.read_songs(version, new), strict=True):
            if rec is None or emb is None:
                continue
            where = f"{store.keys.songs(version)}[{sid}]"
            engine.add_song(sid, decode_vector(emb, where),
                            np.asarray(decode_song_record(rec, where)["priors"], np.float32))
            n += 1
        return n

    @staticmethod
    def _apply_warm(engine: RankingEngine, version: int, ids: list[str] | None,
                    store: OnlineStore) -> int:
        """Give the engine the warmed factors of ``ids`` (None: all of ``version``'s, replacing
        what it had) from ``v{V}:warm``; a song the engine lacks yet is loaded first."""
        raw = store.read_warm(version, ids)
        missing = [s for s in raw if not engine.has_song(s)]
        if missing:  # the catalogue announcement is still on its way: read the song now
            OnlineRanker._apply_ingested(engine, version, missing, store)
        if not raw and ids is not None:
            return 0
        recs = [decode_warm_song(r, f"{store.keys.warm(version)}[{s}]") for s, r in raw.items()]
        width = engine.cf_model.item_factors.shape[1]
        F = np.stack([f for f, _ in recs]) if recs else np.zeros((0, width), np.float32)
        return engine.warm_songs(list(raw), F, np.asarray([p for _, p in recs], np.float32),
                                 replace=ids is None)

    def follow_once(self, store: OnlineStore | None = None, block_ms: int = 0) -> None:
        """One round of the follower: apply songs ingested and factors warmed since the last
        round (catalogue stream, waiting up to ``block_ms`` for an entry, then the warm log),
        switch if the pointer moved, check the data every ``data_check_s``. The follower thread
        loops on it; a ranker without one may call it."""
        store = store or self.store
        rows = store.read_catalogue(self._catalogue_id, block_ms=block_ms)
        active = self._active
        for eid, sid, ver in rows:
            self._catalogue_id = eid
            if ver == active.version:
                self._apply_ingested(active.engine, ver, [sid], store)
        warmed: dict[str, None] = {}
        for eid, sids, ver in store.read_warm_log(self._warm_id):
            self._warm_id = eid
            if ver == active.version:
                warmed.update(dict.fromkeys(sids))
        if warmed and active.version is not None:
            self._apply_warm(active.engine, active.version, list(warmed), store)
        cur = store.current_version()
        if cur is not None and cur != self._active.version:
            self._switch(cur, store)
        if time.monotonic() >= self._next_check:
            self.check_data(store)

    def _follow(self) -> None:
        store = self._follow_store
        wait_ms = int(self.config.follow_interval_s * 1000)
        while not self._stop.is_set():
            try:
                self.follow_once(store, wait_ms)
            except StoreError as err:
                log.warning("catalogue follower: %s", err)
                self._stop.wait(self.config.retry_s)
            except Exception:  # noqa: BLE001 - keep following; the error is logged with its trace
                log.exception("catalogue follower failed; retrying")
                self._stop.wait(self.config.retry_s)

    # -- ranking ----------------------------------------------------------------------------

    def _fallback(self, active: _Active, user_id: str, k: int, exclude: Collection[str],
                  reason: str) -> Ranking:
        self.stats["degraded"] += 1
        items = [RankedItem(s, sc, src) for s, sc, src in active.engine.fallback(k, exclude)]
        ver = "fallback" if active.version is None else str(active.version)
        return Ranking(user_id, ver, True, items, reason=reason)

    def rank(self, user_id: str, k: int = 20, exclude: Collection[str] | None = None,
             cold_share: float | None = None) -> Ranking:
        """Top-``k`` songs for ``user_id``, never raising on store failures.

        Parameters
        ----------
        user_id:
            A valid id (see :func:`.keys.check_id`); unknown users get the cold-user path.
        k:
            1..``config.max_k``.
        exclude:
            Song ids not to return (in addition to the user's history).
        cold_share:
            Exposure control for new songs, as in ``Recommender.recommend`` (None: the scores
            decide); the answer's ``cold_shortfall`` counts the slots it could not fill.

        Raises
        ------
        RequestError
            Malformed ``user_id``, ``k`` or ``exclude``.
        """
        check_id(user_id, "user_id")
        k = check_k(k, self.config.max_k)
        excl = frozenset(check_id(s, "excluded song id") for s in (exclude or ()))
        try:
            check_cold_share(cold_share)
        except ConfigError as err:
            raise RequestError(str(err)) from None
        self.stats["requests"] += 1
        active = self._active
        now = time.monotonic()
        if active.version is None or now < self._down_until:
            if active.version is None and now >= self._down_until and self._thread is None:
                try:
                    self.refresh()
                    active = self._active
                except StoreError:
                    self._down_until = now + self.config.retry_s
            if active.version is None or now < self._down_until:
                return self._fallback(active, user_id, k, excl, "store unavailable")
        try:
            cur, rec = self.store.read_user(active.version, user_id)
        except StoreError as err:
            self._down_until = now + self.config.retry_s
            log.warning("store read failed, answering degraded for %.1f s: %s",
                        self.config.retry_s, err)
            return self._fallback(active, user_id, k, excl, str(err))
        if cur is None:
            self._note_data(active.version, None, False)  # the pointer came with the user: free
        elif self._thread is None and now >= self._next_check:
            try:  # no follower to check in the background: one round trip per data_check_s
                self.check_data()
            except StoreError as err:
                log.warning("data check failed: %s", err)
        if self._missing is not None and (cur is None or cur == active.version):
            return self._fallback(active, user_id, k, excl, self._missing)
        if cur is not None and cur != active.version:
            self._request_switch(cur)
        if rec is None:
            self.stats["cold_users"] += 1
        refused = self._refused
        stale = refused is not None and cur == refused[0]  # this host lacks the current bundle
        if stale:
            self.stats["degraded"] += 1
        items = active.engine.rank_user(user_id, rec, k, excl, cold_share)
        short = None if cold_share is None else active.engine.cold_shortfall([s for s, _, _ in items], k, cold_share)
        return Ranking(user_id, str(active.version), stale,
                       [RankedItem(s, sc, src) for s, sc, src in items], cold_user=rec is None,
                       reason=refused[1] if stale and refused is not None else None,
                       cold_shortfall=short)

    def close(self) -> None:
        """Stop the follower thread, close the engine and the store connections."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.follow_interval_s + 6.0)
        self._active.engine.close()  # its audio workers, if any
        self.store.close()
        if self._thread is not None:
            self._follow_store.close()

    def __enter__(self) -> OnlineRanker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
