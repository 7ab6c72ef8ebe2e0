"""``RecommenderEngine``: the offline ``Recommender`` behind the online ranker.

The online path and the offline path are the same code: a :class:`~apex_rank.ranking.state.
UserState` is rebuilt from the stored user record (CF factor, content profile, history,
activity; float32 bytes decode to the exact arrays that were published) and handed to
``Recommender.rank_items``, which runs ``rank_arrays`` (candidates → features → reranker →
top-k), the function whose frame form ``Recommender.recommend`` returns. Hence
``OnlineRanker.rank(u) == Recommender.recommend(u)`` for an unchanged state, with one
exception by design: from ``FactorIndexConfig.min_songs`` warm songs (50k by default) the
engine answers the ``als`` source from an IVF index over the item factors
(:class:`~apex_rank.ranking.candidates.FactorIndexSource`, recall@100 0.97-0.99) instead of
scanning them all; the offline paths (``recommend``, ``recommend_batch``, evaluation) stay
exact. Everything else ``rank_items`` reads comes from the live Recommender.

The Recommender mutates its song table and indexes when songs are added, so ranking and
adding are guarded by a readers-writer lock: many concurrent rankings, one exclusive add.

Micro-batching without a worker thread: a request arriving while no other is being ranked
ranks itself in its own thread (no handoff: at concurrency 1 a thread switch cost ~1.4 ms of
a ~5 ms request). Requests arriving meanwhile wait; the ranking thread ("leader") takes up to
``max_batch`` waiting requests with the same ``k`` into one ``rank_items`` call until its own
request is answered, then steps down and a waiting request takes over. Part of the cost is
fixed per call (many small numpy and FAISS calls), so a batch of 8 costs well under 8 single
calls; results are identical because every candidate, feature and score is computed per row
(a batch equals the concatenation of single-user results). Nobody waits for a batch to fill.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl

from apex_rank.errors import SchemaError
from apex_rank.ranking.candidates import CandidateSource, FactorIndexConfig, FactorIndexSource, FactorSource
from apex_rank.ranking.recommender import Recommender, cold_shortfall, load_recommender
from apex_rank.ranking.state import UserState

from .bundles import bundle_fingerprint
from .engine import FallbackList, Item, SongBlock
from .store import UserRecord

log = logging.getLogger(__name__)


class _RWLock:
    """Many readers or one writer (writers wait for readers in flight to finish)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


def state_from_record(user_id: str, rec: UserRecord | None) -> UserState:
    """The :class:`UserState` a stored record stands for (``None``: the empty, unknown state)."""
    if rec is None:
        return UserState(user_id, None, None, (), 0)
    return UserState(user_id, rec.factor, rec.profile, tuple(rec.history), int(rec.activity), rec.last_seen_s)


def record_from_state(state: UserState) -> UserRecord:
    """The stored form of a :class:`UserState` (float32 vectors, history as a list)."""
    f = None if state.cf_factor is None else np.asarray(state.cf_factor, dtype=np.float32)
    p = None if state.profile is None else np.asarray(state.profile, dtype=np.float32)
    return UserRecord(f, p, list(state.history), float(state.activity), float(state.last_seen_s))


class _WithApproximateAls:
    """The Recommender as ``Recommender.rank_items`` reads it, with its exact ``als`` source
    swapped for an approximate one; every other attribute is read from the live Recommender
    at each access, so songs added later (and the ``fresh`` source rebuilt for them) are seen
    at once. The swap holds only while the exact source covers the songs the index was built
    on (adding songs adds cold ones, so it always does; a changed warm set falls back to it)."""

    def __init__(self, recommender: Recommender, als: FactorIndexSource) -> None:
        self._rec = recommender
        self._als = als

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rec, name)

    @property
    def sources(self) -> list[CandidateSource]:
        return [self._als if isinstance(s, FactorSource) and len(s.song_ids) == len(self._als.index) else s
                for s in self._rec.sources]


def approximate_als(recommender: Recommender,
                    config: FactorIndexConfig | None = None) -> FactorIndexSource | None:
    """The IVF ``als`` source over the Recommender's warm songs when they are at least
    ``config.min_songs``; else None (the exact source serves)."""
    cfg = config or FactorIndexConfig()
    exact = next((s for s in recommender.sources if isinstance(s, FactorSource)), None)
    if exact is None or len(exact.song_ids) < cfg.min_songs:
        return None
    import time

    t0 = time.perf_counter()
    src = FactorIndexSource(exact.song_ids, exact.factors, cfg,
                            max_overfetch=recommender.config.candidates.max_overfetch)
    log.info("als source: IVF index over %d warm songs (%s, nprobe %d) built in %.1f s",
             len(exact.song_ids), src.index.factory, cfg.nprobe, time.perf_counter() - t0)
    return src


@dataclass
class _Request:
    state: UserState
    k: int
    exclude: frozenset[str]
    cold_share: float | None
    future: Future[list[Item]]


class RecommenderEngine:
    """A loaded Recommender bundle serving the online ranker (see the module doc).

    Parameters
    ----------
    recommender:
        The loaded bundle.
    bundle_dir:
        Folder it was loaded from (named in the published manifest).
    fallback_size:
        Length of the degraded-mode list (the Recommender's popularity-and-quality score).
    max_batch:
        Most concurrent requests ranked in one call (1: every request alone).
    als_index:
        From how many warm songs, and how, the ``als`` source is answered approximately
        (default :class:`FactorIndexConfig`: from 50k songs).
    """

    def __init__(self, recommender: Recommender, bundle_dir: str | Path, *,
                 fallback_size: int = 1000, max_batch: int = 16,
                 als_index: FactorIndexConfig | None = None) -> None:
        self.recommender = recommender
        als = approximate_als(recommender, als_index)
        self._ranker = recommender if als is None else cast(Recommender, _WithApproximateAls(recommender, als))
        self.bundle_dir = str(Path(bundle_dir).resolve())
        self.fingerprint = bundle_fingerprint(bundle_dir)
        self._lock = _RWLock()
        t = recommender.songs
        self._fallback = FallbackList(list(t.song_ids), np.asarray(t.quality, dtype=np.float64),
                                      fallback_size)
        self.max_batch = int(max_batch)
        self._pending: list[_Request] = []
        self._cond = threading.Condition()
        self._leading = False  # a request thread is ranking the pending requests

    @classmethod
    def load(cls, bundle_dir: str | Path, *, device: str = "cpu", fallback_size: int = 1000,
             max_batch: int = 16, als_index: FactorIndexConfig | None = None) -> RecommenderEngine:
        """Load the bundle folder (FAISS index, CF, reranker, APEX predictor) in this process."""
        return cls(load_recommender(bundle_dir, device=device), bundle_dir,
                   fallback_size=fallback_size, max_batch=max_batch, als_index=als_index)

    @property
    def approximate_als(self) -> bool:
        """Whether the ``als`` source is answered from the IVF index (see the module doc)."""
        return self._ranker is not self.recommender

    def close(self) -> None:
        """Nothing to release: requests are ranked by the calling threads themselves."""

    def _rank_states(self, states: list[UserState], k: int, excludes: list[frozenset[str]],
                     cold_share: float | None = None) -> dict[str, list[Item]]:
        self._lock.acquire_read()
        try:
            ex = [set(e) for e in excludes]
            if self._ranker is self.recommender:
                items = self.recommender.rank_items(states, k, ex, cold_share)
            else:  # the Recommender's own method, reading the swapped source list
                items = Recommender.rank_items(self._ranker, states, k, ex, cold_share)
        finally:
            self._lock.release_read()
        return {s.user_id: it for s, it in zip(states, items, strict=True)}

    def _take_batch(self) -> list[_Request]:
        """Up to ``max_batch`` pending requests with the first one's ``k`` and ``cold_share``, a
        user id at most once (results are keyed by user id); removed from the pending list. Hold
        ``_cond``."""
        k0, c0 = self._pending[0].k, self._pending[0].cold_share
        batch: list[_Request] = []
        rest: list[_Request] = []
        seen: set[str] = set()
        for r in self._pending:
            if r.k == k0 and r.cold_share == c0 and r.state.user_id not in seen and len(batch) < self.max_batch:
                batch.append(r)
                seen.add(r.state.user_id)
            else:
                rest.append(r)
        self._pending = rest
        return batch

    @property
    def embedding_dim(self) -> int:
        return int(self.recommender.songs.embeddings.shape[1])

    @property
    def data_until_s(self) -> float:
        return float(self.recommender.songs.now_s)

    def rank_user(self, user_id: str, state: UserRecord | None, k: int,
                  exclude: Collection[str], cold_share: float | None = None) -> list[Item]:
        """Rank one user; concurrent callers are ranked together (see the module doc)."""
        st = state_from_record(user_id, state)
        excl = frozenset(exclude)
        if self.max_batch <= 1:
            return self._rank_states([st], k, [excl], cold_share)[user_id]
        me = _Request(st, k, excl, cold_share, Future())
        with self._cond:
            self._pending.append(me)
            while not me.future.done() and self._leading:
                self._cond.wait()  # the leader ranks us, or steps down and one of us leads
            if me.future.done():
                return me.future.result()
            self._leading = True
        try:
            while not me.future.done():  # lead until our own request is answered
                with self._cond:
                    batch = self._take_batch()
                try:
                    res = self._rank_states([r.state for r in batch], batch[0].k,
                                            [r.exclude for r in batch], batch[0].cold_share)
                    for r in batch:
                        r.future.set_result(res[r.state.user_id])
                except BaseException as err:  # noqa: BLE001 - handed to every caller of the batch
                    for r in batch:
                        r.future.set_exception(err)
                with self._cond:
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()
        return me.future.result()

    def fallback(self, k: int, exclude: Collection[str]) -> list[Item]:
        return self._fallback.top(k, exclude)

    def cold_shortfall(self, song_ids: Collection[str], k: int, cold_share: float | None) -> int:
        return cold_shortfall(self.recommender.songs, list(song_ids), k, cold_share)

    def has_song(self, song_id: str) -> bool:
        return bool(self.recommender.songs.index_of([song_id])[0] >= 0)

    def add_song(self, song_id: str, embedding: np.ndarray, priors: np.ndarray) -> None:
        """Add a song by its (raw) embedding with its stored APEX priors (not recomputed)."""
        frame = pl.DataFrame({"song_id": [song_id],
                              "embedding": [np.asarray(embedding, np.float32).tolist()]},
                             schema={"song_id": pl.String, "embedding": pl.List(pl.Float32)})
        self._lock.acquire_write()
        try:
            if not self.has_song(song_id):
                self.recommender.add_songs(frame, priors=np.asarray(priors, np.float32)[None, :])
        finally:
            self._lock.release_write()

    def predict_priors(self, embeddings: np.ndarray) -> np.ndarray:
        apex = self.recommender.apex
        P = np.asarray(apex.predict(np.asarray(embeddings, np.float32)), dtype=np.float32)
        bad = apex.bad_prior_rows(P)
        if bad.any():
            raise SchemaError(f"the APEX priors predicted from embedding row {int(np.flatnonzero(bad)[0])} are "
                              f"{P[bad][0].tolist()}: not finite where the predictor was trained "
                              f"({', '.join(apex.tasks)})")
        return P

    def song_block(self) -> SongBlock:
        t = self.recommender.songs
        age = (t.now_s - np.asarray(t.created_s, dtype=np.float64)) / 86400.0
        return SongBlock(ids=list(t.song_ids), priors=np.asarray(t.priors, np.float32),
                         popularity=np.asarray(t.popularity, np.float32),
                         age_days=np.nan_to_num(age, nan=-1.0).astype(np.float32),
                         is_cold=~np.asarray(t.warm, bool),
                         embeddings=np.asarray(t.embeddings, np.float32))

    def user_records(self) -> Iterator[tuple[str, UserRecord]]:
        rec = self.recommender
        for uid in rec.user_ids:
            yield uid, record_from_state(rec.user_state(uid))

    def n_users(self) -> int:
        return len(self.recommender.user_ids)
