"""The ``Recommender`` facade: build from tables, recommend, add songs, save/load a bundle.

Each lifecycle has its own module; this one only joins them:

- :mod:`.build`: :func:`~apex_rank.ranking.build.build_parts` builds the parts from tables;
- :mod:`.pipeline`: :class:`~apex_rank.ranking.pipeline.ServingPipeline` ranks (candidates →
  features → reranker → top-k, with the one fallback);
- :mod:`.bundle`: the parts (:class:`~apex_rank.ranking.bundle.RecommenderParts`) saved to a
  folder and read back;
- :mod:`.config`: :class:`RecommenderConfig` and its nested configs.

Example
-------
>>> # from apex_rank.synthetic import make_world
>>> # w = make_world()
>>> # rec = Recommender.build(w.songs, w.embeddings, w.interactions)
>>> # rec.recommend("u00001", k=10)       # song_id, score, source, rank, is_cold, 7 priors
>>> # rec.save("bundle"); load_recommender("bundle").recommend("u00001", k=10)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from apex_rank.errors import SchemaError, UnknownIdError
from apex_rank.predictor import ApexPredictor
from apex_rank.ranking.build import build_parts, to_seconds
from apex_rank.ranking.bundle import KIND, RecommenderParts, read_bundle, save_bundle
from apex_rank.ranking.config import ApexFitConfig, IndexConfig, RecommenderConfig
from apex_rank.ranking.index import l2_normalize
from apex_rank.ranking.pipeline import (
    MAX_K,
    RESULT_SCHEMA,
    RankedArrays,
    ServingPipeline,
    check_k,
    cold_shortfall,
    make_sources,
    rank_arrays,
    ranked_frame,
    song_columns,
    warn_cold_shortfall,
)
from apex_rank.ranking.state import SongTable, UserState, fold_in, quality_score, user_state_from_history
from apex_rank.schemas import check_id_column, embedding_matrix, validate_songs
from apex_rank.tasks import APEX_TASKS

__all__ = [  # what services import from here (the names moved to .config, .pipeline and .bundle included)
    "KIND", "MAX_K", "RESULT_SCHEMA", "ApexFitConfig", "IndexConfig", "RankedArrays", "Recommender",
    "RecommenderConfig", "check_k", "cold_shortfall", "load_recommender", "rank_arrays",
]

log = logging.getLogger(__name__)


class Recommender:
    """Hybrid cold-start recommender (see module doc).

    Attributes
    ----------
    config: the :class:`RecommenderConfig`.
    songs: the :class:`SongTable` (catalogue, embeddings, factors, priors, popularity).
    cf: the fitted serving :class:`CFModel` (evaluation baselines use ``cf.recommend``/``cf.score``).
    reranker: the LightGBM :class:`Reranker`. apex: the :class:`ApexPredictor`.
    sources: the candidate sources (``als``, ``content``, ``pseudo_cf``, ``fresh``).
    report: build facts (row counts, unknown ids, timings, reranker validation NDCG).

    Example
    -------
    >>> # rec = Recommender.build(songs, embeddings, interactions)
    >>> # rec.recommend("u1", k=10).columns
    >>> # ['song_id', 'score', 'source', 'rank', 'is_cold', 'score_streams', ...]
    """

    def __init__(self, parts: RecommenderParts) -> None:
        self.config = parts.config
        self.songs = parts.songs
        self._users = parts.users
        self.cf = parts.cf
        self.content_map = parts.content_map
        self.content_index = parts.content_index
        self.pseudo_index = parts.pseudo_index
        self.reranker = parts.reranker
        self.apex = parts.apex
        self.report = parts.report
        self._make_sources()

    @classmethod
    def build(cls, songs: pl.DataFrame, embeddings: pl.DataFrame, interactions: pl.DataFrame,
              config: RecommenderConfig | None = None, apex: ApexPredictor | None = None) -> Recommender:
        """Build every component from tables (:func:`~apex_rank.ranking.build.build_parts`).

        Interactions naming songs outside the catalogue are dropped, counted in
        ``report["unknown_song_rows"]`` and logged as a warning. Negative/NaN/inf weights are a
        :class:`SchemaError`.
        """
        return cls(build_parts(songs, embeddings, interactions, config, apex))

    @property
    def parts(self) -> RecommenderParts:
        """The parts this recommender serves from (what :meth:`save` writes)."""
        return RecommenderParts(self.config, self.songs, self._users, self.cf, self.content_map, self.content_index,
                                self.pseudo_index, self.reranker, self.apex, self.report)

    def _make_sources(self) -> None:
        self.sources, self.fallback_source = make_sources(self.songs, self.cf, self.content_index, self.pseudo_index,
                                                          self.config.candidates)

    # ------------------------------------------------------------------ per-user state
    @property
    def min_cold_share(self) -> float:
        """Minimum share of new songs in a list served without ``cold_share``: the floor
        ``build`` chose on its validation slice (``report["exposure"]``, see
        ``build._choose_cold_floor``) times this catalogue's fraction of new songs over the
        training side's (capped at the floor itself)."""
        e = self.report.get("exposure") or {}
        floor, frac = float(e.get("min_cold_share") or 0.0), float(e.get("train_cold_fraction") or 0.0)
        if floor <= 0 or frac <= 0:
            return 0.0
        return floor * min(1.0, self.songs.cold_fraction / frac)

    @property
    def user_ids(self) -> list[str]:
        """Users with a stored state."""
        return list(self._users.user_ids)

    def has_user(self, user_id: str) -> bool:
        return user_id in self._users.pos

    def user_state(self, user_id: str) -> UserState:
        """The stored state of a user; an unknown user gets an empty state (→ fallback)."""
        return self._users.state(user_id, self.songs, self.cf)

    def state_from_history(self, user_id: str, song_ids: Sequence[str], *, ts: Sequence[float] | None = None,
                           weights: Sequence[float] | None = None) -> UserState:
        """A state for a user unseen at build time, from their history: the events folded in time
        order (``apply_event``, the update online events apply) and the CF factor of the ALS user
        step over the summed weights (``fold_in``; see :mod:`~apex_rank.ranking.state`).

        History entries naming songs outside the catalogue are ignored and counted in a warning.
        """
        unknown = [s for s, i in zip(song_ids, self.songs.index_of(song_ids)) if i < 0]
        if unknown:
            log.warning("history of user %r names %d song ids outside the catalogue (e.g. %r); ignored",
                        user_id, len(unknown), unknown[0])
        return fold_in(user_state_from_history(user_id, song_ids, ts=ts, weights=weights, song_table=self.songs,
                                               cf_factor=None, half_life_days=self.config.half_life_days), self.cf)

    # ------------------------------------------------------------------ recommending
    def recommend(self, user_id: str, k: int = 20, exclude: Iterable[str] | None = None, *,
                  cold_share: float | None = None, at: float | None = None) -> pl.DataFrame:
        """Top-k songs for one user (columns ``RESULT_SCHEMA``); unknown users get the fallback.

        Fewer than k rows come back when fewer songs are rankable (k larger than the catalogue,
        or a history covering it: an empty frame).

        ``cold_share`` (exposure control for new songs): a number in [0, 1] gives
        ``round(cold_share · k)`` slots to the user's best-scored new songs, kept in score order
        among the rest (:func:`~apex_rank.ranking.reranker.select_top_k`); too few new
        candidates: warm songs fill the slots and the shortfall is logged (``is_cold`` counts
        what was served). None, the default, lets the model decide: its scores, with at least
        the share of new songs ``build`` found costless on its validation slice
        (:attr:`min_cold_share`).

        ``at`` (epoch seconds): when the list is asked for. None, the default, continues the
        user's history (their next plays follow the latest one, as in a leave-latest-out test).
        A request more than the build's ``report["max_gap_s"]`` after the user's latest play is
        ranked in the ALS order, the reranker's trees only breaking its ties (new-song floor
        kept): the trees learned from labels that followed the fit part within that gap, and
        their corrections do not carry over to users who come back later
        (:func:`~apex_rank.ranking.build._max_gap`).
        """
        out = self.recommend_states([self.user_state(user_id)], k, excludes=[set(exclude) if exclude else set()],
                                    cold_share=cold_share, at=at)
        out.drop_in_place("user_id")  # eager: a lazy drop costs a query per request
        return out

    def recommend_batch(self, user_ids: Sequence[str], k: int = 20, *, cold_share: float | None = None,
                        at: float | None = None) -> pl.DataFrame:
        """Long frame (``user_id`` + ``RESULT_SCHEMA``), users in input order; a user id repeated in
        the batch is answered once (the repeat is logged). Equals per-user ``recommend``
        (``cold_share`` and ``at`` as there)."""
        seen: dict[str, None] = dict.fromkeys(user_ids)
        if len(seen) < len(user_ids):
            log.info("recommend_batch: %d duplicate user ids answered once", len(user_ids) - len(seen))
        return self.recommend_states([self.user_state(u) for u in seen], k, cold_share=cold_share, at=at)

    def recommend_states(self, states: Sequence[UserState], k: int = 20, *, excludes: Sequence[set[str]] | None = None,
                         progress: bool = False, cold_share: float | None = None,
                         at: float | None = None) -> pl.DataFrame:
        """Rank for explicit states (:meth:`ServingPipeline.rank`) as a frame: ``user_id`` +
        ``RESULT_SCHEMA``, states in the order given; a shortfall of new songs is logged."""
        r = self.pipeline().rank(states, k, excludes=excludes, cold_share=cold_share, progress=progress, at=at)
        warn_cold_shortfall(r, self.songs, k, cold_share, sum(not s.is_unknown for s in states))
        return ranked_frame(r, states, self.songs)

    def pipeline(self) -> ServingPipeline:
        """The serving pipeline over this Recommender's parts as they are now (songs added
        since are seen). The online engine ranks with it, its own candidate sources swapped in."""
        return ServingPipeline(self.sources, self.songs, self.reranker, self.config.candidates, self.fallback_source,
                               self.config.batch_users, self.min_cold_share)

    def similar_songs(self, song_id: str, k: int = 20) -> pl.DataFrame:
        """Content neighbours of a catalogue song (itself excluded): song_id, score, rank, is_cold, priors."""
        check_k(k)
        i = int(self.songs.index_of([song_id])[0])
        if i < 0:
            raise UnknownIdError(f"song_id {song_id!r} is not in the catalogue")
        D, hits = self.content_index.search(self.songs.embeddings[i], k + 1)
        keep = [(s, float(d)) for s, d in zip(hits[0], D[0]) if s and s != song_id][:k]
        ids = [s for s, _ in keep]
        return pl.DataFrame({
            "song_id": pl.Series(ids, dtype=pl.String),
            "score": np.asarray([d for _, d in keep], dtype=np.float64),
            "rank": np.arange(1, len(keep) + 1, dtype=np.int32),
            **song_columns(self.songs, self.songs.index_of(ids)),
        })

    # ------------------------------------------------------------------ catalogue changes
    def add_songs(self, embeddings: pl.DataFrame, songs: pl.DataFrame | None = None, *,
                  priors: np.ndarray | None = None) -> int:
        """Add new (cold) songs: APEX priors, pseudo factors and index entries are computed now, so
        they are rankable at once. Ids already in the catalogue are a :class:`SchemaError`.
        Returns the number of songs added.

        ``priors`` ((n, 7) in ``APEX_TASKS`` order, rows in the order of ``embeddings``) are
        priors the APEX predictor already computed for these songs (the online store keeps them
        in the song record); given, the predictor is not run again. The columns of the tasks the
        predictor was trained for must be finite and the others NaN, as its ``predict`` returns
        them; anything else is a :class:`SchemaError`.
        """
        ids, E_raw = embedding_matrix(embeddings, expected_width=self.songs.embeddings.shape[1])
        check_id_column(embeddings, "song_id", "embeddings")
        dup = [s for s, i in zip(ids, self.songs.index_of(ids)) if i >= 0]
        if dup:
            raise SchemaError(f"song_id {dup[0]!r} is already in the catalogue ({len(dup)} duplicates)")
        created = np.full(len(ids), np.nan)
        if songs is not None:
            validate_songs(songs)
            if "created_at" in songs.columns:
                m = dict(zip(songs["song_id"].to_list(), to_seconds(songs["created_at"])))
                created = np.asarray([m.get(s, np.nan) for s in ids], dtype=np.float64)
        priors = self.apex.predict(E_raw) if priors is None else self._check_priors(priors, ids)
        E = l2_normalize(E_raw)
        t = self.songs
        pop = np.zeros(len(ids), dtype=np.float32)
        new = SongTable(song_ids=ids, embeddings=E, cf_factors=np.zeros((len(ids), t.cf_factors.shape[1]), np.float32),
                        warm=np.zeros(len(ids), bool), pseudo_factors=self.content_map.predict(E), priors=priors,
                        popularity=pop, created_s=created,
                        quality=quality_score(priors, pop, t.prior_mean, t.prior_std),
                        now_s=t.now_s, prior_mean=t.prior_mean, prior_std=t.prior_std)
        t.append(new)
        self.content_index.add(ids, E)
        self.pseudo_index.add(ids, new.pseudo_factors)
        self._make_sources()
        log.info("added %d songs (catalogue now %d)", len(ids), len(t))
        return len(ids)

    def _check_priors(self, priors: np.ndarray, ids: list[str]) -> np.ndarray:
        """Given priors as ``predict`` would return them for ``ids``, as float32 (n, 7)."""
        P = np.array(priors, dtype=np.float32)  # a copy: the caller's array is not kept
        if P.shape != (len(ids), len(APEX_TASKS)):
            raise SchemaError(f"priors must be ({len(ids)}, {len(APEX_TASKS)}) for {len(ids)} songs; "
                              f"got shape {P.shape}")
        bad = self.apex.bad_prior_rows(P)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SchemaError(f"priors of song {ids[i]!r} are {P[i].tolist()}: the tasks the APEX "
                              f"predictor was trained for ({', '.join(self.apex.tasks)}) must be "
                              f"finite and the others NaN ({int(bad.sum())} bad rows)")
        return P

    # ------------------------------------------------------------------ evaluation helpers
    @property
    def popularity(self) -> pl.DataFrame:
        """``song_id``, ``count``: interactions per song in the serving CF data."""
        return pl.DataFrame({"song_id": pl.Series(self.songs.song_ids, dtype=pl.String),
                             "count": self.songs.popularity})

    @property
    def priors(self) -> pl.DataFrame:
        """``song_id`` + the seven APEX priors."""
        return self.songs.priors_frame()

    @property
    def content_embeddings(self) -> tuple[list[str], np.ndarray]:
        """``(song_ids, E)`` with E the (n, d) L2-normalised content embeddings."""
        return list(self.songs.song_ids), self.songs.embeddings

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> Path:
        """Write the bundle folder atomically (:func:`~apex_rank.ranking.bundle.save_bundle`); returns it."""
        return save_bundle(folder, self.parts)


def load_recommender(folder: str | Path, device: str = "auto") -> Recommender:
    """Load a bundle written by :meth:`Recommender.save` (:func:`~apex_rank.ranking.bundle.read_bundle`).

    Raises :class:`~apex_rank.errors.ArtifactError` for a newer schema, a missing file or an
    unreadable component, naming the file.
    """
    return Recommender(read_bundle(folder, device))
