"""The online engine: one loaded bundle and the one ranking pipeline, for the online ranker.

:class:`RankingEngine` holds a published bundle's heavy state (FAISS index, CF item factors,
reranker, APEX predictor, song table), loaded explicitly from the bundle folder, and ranks for
a user state read from the store. The online layer never imports model code itself: it asks
the engine. The engine never imports a store module: user states come in and go out as
:class:`~apex_rank.ranking.state.UserState` values, the one state type the store decodes to.

The online path and the offline path are the same code: the stored
:class:`~apex_rank.ranking.state.UserState` (float32 bytes decode to the exact arrays that
were published) is handed to the Recommender's :class:`~apex_rank.ranking.pipeline.ServingPipeline`
(``Recommender.pipeline()``, the engine's candidate sources swapped in), whose ``rank`` runs
``rank_arrays`` (candidates → features → reranker → top-k), the function whose frame form
``Recommender.recommend`` returns. Hence
``OnlineRanker.rank(u) == Recommender.recommend(u)`` for an unchanged state, with one
exception by design: from ``FactorIndexConfig.min_songs`` warm songs (50k by default) the
engine answers the ``als`` source from an IVF index over the item factors
(:class:`~apex_rank.ranking.candidates.FactorIndexSource`, recall@100 0.97-0.99) instead of
scanning them all; the offline paths (``recommend``, ``recommend_batch``, evaluation) stay
exact. Everything else the pipeline reads comes from the live Recommender.

Warm-up (:mod:`.warmup`): songs whose factors were solved online since the bundle
(:meth:`RankingEngine.warm_songs`) become warm songs of the engine's song table, join the
``als`` source (:class:`WarmedFactorSource`: the bundle's source merged with an exact scan of
the small warmed set) and leave the cold-song sources. Until then, and without warmed songs,
online ranking equals offline ranking as above.

The Recommender mutates its song table and indexes when songs are added, so ranking and
adding are guarded by a readers-writer lock: many concurrent rankings, one exclusive add.

Concurrent requests are ranked together by :class:`~.batching.MicroBatcher` (see
:mod:`.batching`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from apex_rank.errors import SchemaError
from apex_rank.ranking.candidates import (
    CandidateSource,
    Exclusions,
    FactorIndexConfig,
    FactorIndexSource,
    FactorSource,
)
from apex_rank.ranking.cf import CFModel
from apex_rank.ranking.pipeline import Item, ranked_items
from apex_rank.ranking.recommender import Recommender, cold_shortfall, load_recommender
from apex_rank.ranking.state import SongTable, UserState

from .audio import AudioEmbedder, AudioIngestConfig
from .batching import MicroBatcher
from .bundles import bundle_fingerprint

log = logging.getLogger(__name__)


@dataclass
class SongBlock:
    """Song records of a bundle as arrays: ids (n,), priors (n, 7), popularity (n,),
    age_days (n,), is_cold (n,) bool, embeddings (n, d) float32."""

    ids: list[str]
    priors: np.ndarray
    popularity: np.ndarray
    age_days: np.ndarray
    is_cold: np.ndarray
    embeddings: np.ndarray


class FallbackList:
    """A precomputed best-first list of (song_id, score, "fallback"); ``top`` is pure Python.

    Built once per loaded version from the bundle's popularity-and-quality scores, so the
    degraded path needs neither the store nor the model.
    """

    def __init__(self, ids: list[str], scores: np.ndarray, size: int) -> None:
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:size]
        self.items: list[Item] = [(ids[i], float(scores[i]), "fallback") for i in order]

    def top(self, k: int, exclude: Collection[str]) -> list[Item]:
        out: list[Item] = []
        for item in self.items:
            if item[0] not in exclude:
                out.append(item)
                if len(out) >= k:
                    break
        return out


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


class WarmedFactorSource(CandidateSource):
    """``als`` over the bundle's warm songs and the songs warmed online since (:mod:`.warmup`):
    the bundle's source (exact, or the IVF index) merged with an exact scan of the warmed
    songs' factors, a small set. A row keeps its n best of both by score (float64 dot products,
    one row at a time, so a batch equals single calls), ties to the bundle's songs. Its item
    space is the bundle source's items, then the warmed songs."""

    name = "als"

    def __init__(self, base: CandidateSource, song_ids: Sequence[str], factors: np.ndarray) -> None:
        self.base = base
        self.song_ids = list(song_ids)
        self.factors = np.ascontiguousarray(factors, dtype=np.float64)
        self._n_base = len(base.item_ids)
        self._ids: list[str | None] = [*base.item_ids, *self.song_ids]

    @property
    def item_ids(self) -> Sequence[str | None]:
        return self._ids

    def _merged(self, states: Sequence[UserState], n: int, items: np.ndarray, sc: np.ndarray,
                warm_at: np.ndarray, gone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The base's answer ``(items, sc)`` merged with the warmed songs (at ``warm_at`` in the
        same item space; ``gone`` (b, m) marks the excluded ones)."""
        for i, st in enumerate(states):
            if st.cf_factor is None or n == 0:
                continue
            keep = ~gone[i]
            have = items[i] >= 0
            cand = np.concatenate([items[i][have], warm_at[keep]])
            score = np.concatenate([sc[i][have], (self.factors[keep] @ np.asarray(st.cf_factor, np.float64))
                                    .astype(np.float32)])
            top = np.argsort(-score, kind="stable")[:n]
            items[i], sc[i] = -1, -np.inf
            items[i, : len(top)], sc[i, : len(top)] = cand[top], score[top]
        return items, sc

    def search_items(self, states: Sequence[UserState], n: int,
                     excluded: Exclusions) -> tuple[np.ndarray, np.ndarray]:
        r, p, L = excluded.cell_rows(), excluded.indices, self._n_base
        inb = p < L
        items, sc = self.base.search_items(
            states, n, Exclusions.from_cells(r[inb], p[inb], excluded.sizes, excluded.id_sets))
        gone = np.zeros((len(states), len(self.song_ids)), dtype=bool)
        gone[r[~inb], p[~inb] - L] = True
        return self._merged(states, n, items, sc, L + np.arange(len(self.song_ids)), gone)

    def retrieve_positions(self, states: Sequence[UserState], n: int, excluded: Exclusions,
                           catalogue: SongTable) -> tuple[np.ndarray, np.ndarray]:
        items, sc = self.base.retrieve_positions(states, n, excluded, catalogue)
        at = catalogue.index_of(self.song_ids)
        where = {int(c): j for j, c in enumerate(at.tolist())}
        gone = np.zeros((len(states), len(self.song_ids)), dtype=bool)
        for row, c in zip(excluded.cell_rows().tolist(), excluded.indices.tolist(), strict=True):
            if c in where:
                gone[row, where[c]] = True
        return self._merged(states, n, items, sc, at, gone)


class _WithoutSongs(CandidateSource):
    """A source that never returns ``song_ids`` (the warmed songs, from the cold-song sources)."""

    def __init__(self, base: CandidateSource, song_ids: list[str]) -> None:
        self.base = base
        self.name = base.name
        self.song_ids = song_ids

    @property
    def item_ids(self) -> Sequence[str | None]:
        return self.base.item_ids

    def item_positions(self, ids: list[str]) -> np.ndarray:
        return self.base.item_positions(ids)

    @staticmethod
    def _also(excluded: Exclusions, items: np.ndarray) -> Exclusions:
        """``excluded`` plus ``items`` (positions) in every row."""
        items = items[items >= 0]
        b = len(excluded)
        rows = np.concatenate([excluded.cell_rows(), np.repeat(np.arange(b, dtype=np.int64), len(items))])
        cells = np.concatenate([excluded.indices, np.tile(items, b)])
        return Exclusions.from_cells(rows, cells, excluded.sizes + len(items))

    def search_items(self, states: Sequence[UserState], n: int,
                     excluded: Exclusions) -> tuple[np.ndarray, np.ndarray]:
        return self.base.search_items(states, n, self._also(excluded, self.base.item_positions(self.song_ids)))

    def retrieve_positions(self, states: Sequence[UserState], n: int, excluded: Exclusions,
                           catalogue: SongTable) -> tuple[np.ndarray, np.ndarray]:
        return self.base.retrieve_positions(states, n, self._also(excluded, catalogue.index_of(self.song_ids)),
                                            catalogue)


class _EngineSources:
    """The candidate sources the engine ranks with: the Recommender's, with the engine's ``als``
    source (the bundle's warm songs, exactly or from the IVF index, plus the warmed songs) and
    the warmed songs left out of the cold-song sources (``pseudo_cf``, ``fresh``: a warmed song
    is a warm song). Read from the live Recommender at each access, so songs added later (and
    the ``fresh`` source rebuilt for them) are seen at once."""

    def __init__(self, recommender: Recommender, als: CandidateSource) -> None:
        self._rec = recommender
        self._bundle_als = als
        self._als: CandidateSource = als
        self._warmed: list[str] = []
        # (the Recommender's source list it was built from, the list served): sources are built
        # once per change, not per request (each caches its catalogue maps)
        self._built: tuple[list[CandidateSource], list[CandidateSource]] | None = None

    def set_warmed(self, song_ids: list[str], factors: np.ndarray) -> None:
        self._warmed = list(song_ids)
        self._als = WarmedFactorSource(self._bundle_als, song_ids, factors) if song_ids else self._bundle_als
        self._built = None

    @property
    def sources(self) -> list[CandidateSource]:
        built = self._built
        if built is not None and built[0] is self._rec.sources:
            return built[1]
        out: list[CandidateSource] = []
        for s in self._rec.sources:
            if s.name == "als":
                out.append(self._als)
            elif self._warmed and s.name in ("pseudo_cf", "fresh"):
                out.append(_WithoutSongs(s, self._warmed))
            else:
                out.append(s)
        self._built = (self._rec.sources, out)
        return out


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


class RankingEngine:
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
    audio:
        Limits of :meth:`embed_audio` (default :class:`~.audio.AudioIngestConfig`).
    """

    def __init__(self, recommender: Recommender, bundle_dir: str | Path, *,
                 fallback_size: int = 1000, max_batch: int = 16,
                 als_index: FactorIndexConfig | None = None,
                 audio: AudioIngestConfig | None = None) -> None:
        self.recommender = recommender
        als = approximate_als(recommender, als_index)
        exact = next(s for s in recommender.sources if isinstance(s, FactorSource))
        self._approximate = als is not None
        self._sources = _EngineSources(recommender, exact if als is None else als)
        t0 = recommender.songs
        self._bundle_warm = np.asarray(t0.warm, dtype=bool).copy()  # ingested songs come after
        self._popularity_scale = t0.popularity_scale
        self._warmed: dict[str, int] = {}  # warmed song id -> song-table index
        self.bundle_dir = str(Path(bundle_dir).resolve())
        self.fingerprint = bundle_fingerprint(bundle_dir)
        self._audio = AudioEmbedder(self.bundle_dir, recommender.apex.encoder, self.embedding_dim,
                                    audio or AudioIngestConfig(), recommender.apex.segmenting)
        self._lock = _RWLock()
        t = recommender.songs
        self._fallback = FallbackList(list(t.song_ids), np.asarray(t.quality, dtype=np.float64),
                                      fallback_size)
        self._batcher: MicroBatcher[list[Item]] = MicroBatcher(self._rank_states, max_batch)
        self.clock: Callable[[], float] = time.time  # when a request is made (epoch seconds)

    @classmethod
    def load(cls, bundle_dir: str | Path, *, device: str = "cpu", fallback_size: int = 1000,
             max_batch: int = 16, als_index: FactorIndexConfig | None = None,
             audio: AudioIngestConfig | None = None) -> RankingEngine:
        """Load the bundle folder (FAISS index, CF, reranker, APEX predictor) in this process."""
        return cls(load_recommender(bundle_dir, device=device), bundle_dir,
                   fallback_size=fallback_size, max_batch=max_batch, als_index=als_index, audio=audio)

    @property
    def approximate_als(self) -> bool:
        """Whether the ``als`` source is answered from the IVF index (see the module doc)."""
        return self._approximate

    def close(self) -> None:
        """Stop the audio workers, if any were started (requests are ranked by the calling
        threads themselves)."""
        self._audio.close()

    def embed_audio(self, path: str | Path) -> np.ndarray:
        """(d,) float32 embedding of an audio file with the bundle's own encoder, computed in a
        worker process with the limits of ``audio`` (see :class:`~.audio.AudioEmbedder`).

        Raises
        ------
        RequestError
            The file is refused (too large or long, undecodable, too slow, a crashed decoder:
            the message names the file), or the bundle's encoder cannot be rebuilt here (the
            message names the bundle and the encoder).
        """
        return self._audio.embed(path)

    def _rank_states(self, states: list[UserState], k: int, excludes: list[frozenset[str]],
                     cold_share: float | None = None) -> dict[str, list[Item]]:
        self._lock.acquire_read()
        try:
            ex = [set(e) for e in excludes]
            at = self.clock()  # a request is made now: users back after a long gap (see Reranker.trusted_states)
            pipeline = dataclasses.replace(self.recommender.pipeline(), sources=self._sources.sources)
            items = ranked_items(pipeline.rank(states, k, excludes=ex, cold_share=cold_share, at=at), len(states))
        finally:
            self._lock.release_read()
        return {s.user_id: it for s, it in zip(states, items, strict=True)}

    @property
    def embedding_dim(self) -> int:
        """Width of the bundle's content embeddings (what an ingested song must give)."""
        return int(self.recommender.songs.embeddings.shape[1])

    @property
    def half_life_days(self) -> float:
        """The profile half-life the bundle's user states were built with (events extend them
        with the same, see :class:`~.events.EventUpdate`)."""
        return float(self.recommender.config.half_life_days)

    @property
    def data_until_s(self) -> float:
        """End of the bundle's training interactions (unix seconds): what was recorded online
        after it is carried onto a newly published version."""
        return float(self.recommender.songs.now_s)

    def rank_user(self, user_id: str, state: UserState | None, k: int,
                  exclude: Collection[str], cold_share: float | None = None) -> list[Item]:
        """Top-``k`` for a user state (``None``: unknown user, cold-user path); ``cold_share`` as in
        ``Recommender.recommend`` (None: the scores decide). Concurrent callers are ranked
        together (:mod:`.batching`)."""
        st = state if state is not None else UserState(user_id, None, None)
        return self._batcher.rank(st, k, frozenset(exclude), cold_share)

    def fallback(self, k: int, exclude: Collection[str]) -> list[Item]:
        """Top-``k`` of the popularity-and-quality list (no store needed)."""
        return self._fallback.top(k, exclude)

    def cold_shortfall(self, song_ids: Collection[str], k: int, cold_share: float | None) -> int:
        """New-song slots ``cold_share`` asked for that the list could not fill."""
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
                # the table's reindex counted warmed songs' online plays into the mean count of
                # warm songs that log_popularity is relative to: keep the bundle's
                self.recommender.songs.popularity_scale = self._popularity_scale
        finally:
            self._lock.release_write()

    @property
    def cf_model(self) -> CFModel:
        """The bundle's CF model (the factors the warm-up steps run against)."""
        return self.recommender.cf

    def warm_songs(self, song_ids: list[str], factors: np.ndarray, plays: np.ndarray, *,
                   replace: bool = False) -> int:
        """Warmed songs become warm songs of the song table: ``cf_factors`` holds their factor
        (so ``als_score`` and ``recent_cf_sim`` read it), ``warm`` is set (``is_cold`` 0, and
        ``cold_share`` no longer counts them as new), ``popularity`` is their online play count
        (``log_popularity`` as for a bundle song with that many plays). That is what the next
        retrain will make of them, and what the reranker learned warm songs look like; left cold,
        a song with a real factor would still be scored as if it had none. They join the ``als``
        source and leave ``pseudo_cf`` and ``fresh`` (see :class:`_EngineSources`). The published
        song records (:meth:`song_block`) keep the bundle's view."""
        t = self.recommender.songs
        F = np.asarray(factors, dtype=np.float32)
        if F.shape != (len(song_ids), t.cf_factors.shape[1]):
            raise SchemaError(f"warmed factors of {len(song_ids)} songs have shape {F.shape}; the "
                              f"bundle's CF factors have width {t.cf_factors.shape[1]}")
        P = np.asarray(plays, dtype=np.float32).reshape(len(song_ids))
        self._lock.acquire_write()
        try:
            if replace:
                named = set(song_ids)
                for sid in [s for s in self._warmed if s not in named]:
                    i = self._warmed.pop(sid)
                    t.cf_factors[i], t.warm[i], t.popularity[i] = 0.0, False, 0.0
            n = 0
            for sid, i, f, p in zip(song_ids, t.index_of(song_ids).tolist(), F, P, strict=True):
                if i < 0 or (i < len(self._bundle_warm) and self._bundle_warm[i]):
                    continue
                t.cf_factors[i], t.warm[i], t.popularity[i] = f, True, p
                self._warmed[sid] = i
                n += 1
            pos = np.asarray(list(self._warmed.values()), dtype=np.int64)
            self._sources.set_warmed(list(self._warmed), t.cf_factors[pos])
        finally:
            self._lock.release_write()
        return n

    def predict_priors(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, d) embeddings -> (n, 7) APEX priors, NaN for the tasks the predictor was not
        trained on; priors that are not finite where it was trained are a SchemaError."""
        apex = self.recommender.apex
        P = np.asarray(apex.predict(np.asarray(embeddings, np.float32)), dtype=np.float32)
        bad = apex.bad_prior_rows(P)
        if bad.any():
            raise SchemaError(f"the APEX priors predicted from embedding row {int(np.flatnonzero(bad)[0])} are "
                              f"{P[bad][0].tolist()}: not finite where the predictor was trained "
                              f"({', '.join(apex.tasks)})")
        return P

    def song_block(self) -> SongBlock:
        """The song records to publish (the bundle's view: warmed factors live in ``v{V}:warm``)."""
        t = self.recommender.songs
        age = (t.now_s - np.asarray(t.created_s, dtype=np.float64)) / 86400.0
        warm = np.array(t.warm, dtype=bool)
        pop = np.array(t.popularity, dtype=np.float32)
        pos = np.asarray(list(self._warmed.values()), dtype=np.int64)
        warm[pos], pop[pos] = False, 0.0  # the bundle's view: warmed factors live in v{V}:warm
        return SongBlock(ids=list(t.song_ids), priors=np.asarray(t.priors, np.float32),
                         popularity=pop,
                         age_days=np.nan_to_num(age, nan=-1.0).astype(np.float32),
                         is_cold=~warm,
                         embeddings=np.asarray(t.embeddings, np.float32))

    def user_states(self) -> Iterator[tuple[str, UserState]]:
        """Every user of the bundle with its state (what a publish writes)."""
        rec = self.recommender
        for uid in rec.user_ids:
            yield uid, rec.user_state(uid)

    def n_users(self) -> int:
        """Users with a stored state in the bundle."""
        return len(self.recommender.user_ids)
