"""The one serving pipeline: user states → candidates → features → reranker → top-k.

Every list the plugin serves, offline (``Recommender.recommend``, ``recommend_batch``,
``recommend_states``, the evaluation) or online (the engine behind ``/recommend``), is ranked
by :meth:`ServingPipeline.rank`:

- the one ``k`` check (:func:`check_k`) and ``cold_share`` check;
- states with something to rank from go through :func:`rank_arrays` (candidates → features →
  reranker scores → top-k, pure arrays), ``batch_users`` states at a time;
- states without (an unknown user, an empty history) get the one fallback: the
  popularity-and-quality list (source ``fallback``);
- the answer is one :class:`RankedArrays`, states in the order given.

Two adapters turn it into what callers need: :func:`ranked_frame` (``user_id`` +
:data:`RESULT_SCHEMA` columns, the Python API's frame) and :func:`ranked_items` (per state a
list of ``(song_id, score, source)``, what the online engine serves). Nothing else ranks.

Example
-------
>>> # pipe = ServingPipeline(sources, songs, reranker, CandidateConfig(), fallback)
>>> # r = pipe.rank([state], k=10)
>>> # ranked_frame(r, [state], songs)      # user_id, song_id, score, source, rank, is_cold, priors
>>> # ranked_items(r, 1)[0][0]               # ('s00042', 1.73, 'als')
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from apex_rank.errors import ConfigError
from apex_rank.ranking.candidates import (
    SOURCE_ORDER,
    CandidateConfig,
    CandidateSource,
    Exclusions,
    FactorSource,
    IndexSource,
    RankedListSource,
    candidate_positions,
    sorted_codes,
)
from apex_rank.ranking.cf import CFModel
from apex_rank.ranking.index import CandidateIndex
from apex_rank.ranking.rerank_features import feature_array
from apex_rank.ranking.reranker import Reranker, check_cold_share, select_top_k, user_draws
from apex_rank.ranking.state import SongTable, UserState, history_positions
from apex_rank.tasks import APEX_TASKS

log = logging.getLogger(__name__)

RESULT_SCHEMA: dict[str, Any] = {
    "song_id": pl.String,
    "score": pl.Float64,
    "source": pl.String,
    "rank": pl.Int32,
    "is_cold": pl.Boolean,
    **{t: pl.Float32 for t in APEX_TASKS},
}
FALLBACK = "fallback"
SOURCE_NAMES = (*SOURCE_ORDER, FALLBACK)  # RankedArrays.source indexes this
MAX_K = 1000  # longest list the Python API and CLI rank (the HTTP service caps at its max_k, 500)

Item = tuple[str, float, str]  # (song_id, score, source): one served song, as the online engine serves it


def check_k(k: object) -> None:
    """``k`` must be an int in [1, MAX_K]: a huge k makes every source fetch k candidates per user
    (``recommend -k 1000000000`` once grew to 22 GB before the kernel killed it)."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ConfigError(f"k must be an integer in [1, {MAX_K}], got {k!r}")


class RankedArrays(NamedTuple):
    """Top-k of a batch as arrays, one row per recommended song, best first within a state:
    ``user`` (position of the state in the states ranked), ``song_id`` (object), ``song``
    (song-table index), ``score`` (float64), ``source`` (index into :data:`SOURCE_NAMES`),
    ``rank`` (1-based int32). :func:`rank_arrays` orders states by user id,
    :meth:`ServingPipeline.rank` as given."""

    user: np.ndarray
    song_id: np.ndarray
    song: np.ndarray
    score: np.ndarray
    source: np.ndarray
    rank: np.ndarray

    @classmethod
    def empty(cls) -> RankedArrays:
        e = np.zeros(0, np.int64)
        return cls(e, np.zeros(0, object), e, np.zeros(0), np.zeros(0, np.int8), np.zeros(0, np.int32))


def make_sources(
    songs: SongTable,
    cf: CFModel,
    content_index: CandidateIndex,
    pseudo_index: CandidateIndex,
    config: CandidateConfig,
    rankable: np.ndarray | None = None,
) -> tuple[list[CandidateSource], RankedListSource]:
    """The candidate sources (``als``, ``content``, ``pseudo_cf``, ``fresh``) and the fallback
    list (``popular``, by the popularity-and-quality score) over a song table.

    ``rankable`` ((n,) bool, build's training side only): the songs that may be new-song
    candidates (None: all)."""
    cold = np.flatnonzero(~songs.warm & (True if rankable is None else rankable))
    mo = config.max_overfetch
    sources: list[CandidateSource] = [
        FactorSource(cf.song_ids, cf.item_factors),  # the CF model's matrix, not a copy
        IndexSource("content", content_index, "profile", max_overfetch=mo),
        IndexSource("pseudo_cf", pseudo_index, "cf_factor", max_overfetch=mo),
        RankedListSource("fresh", [songs.song_ids[i] for i in cold], songs.quality[cold], max_overfetch=mo),
    ]
    return sources, RankedListSource("popular", songs.song_ids, songs.quality, max_overfetch=mo)


def rank_arrays(
    states: Sequence[UserState],
    k: int,
    sources: Sequence[CandidateSource],
    song_table: SongTable,
    reranker: Reranker,
    candidate_config: CandidateConfig,
    *,
    excludes: Sequence[set[str]] | None = None,
    cold_share: float | None = None,
    min_cold_share: float = 0.0,
    at: float | None = None,
) -> RankedArrays:
    """The pure per-user path: candidates → features → reranker scores → top-k per user.

    ``cold_share`` (exposure control, see :func:`select_top_k`): exactly that share of new
    songs; None: the scores decide, with at least ``min_cold_share`` new songs. ``at``: when the
    lists are asked for (``Reranker.trusted_states``; None continues each user's history).

    Runs on arrays of catalogue positions (:func:`~apex_rank.ranking.candidates.candidate_positions`,
    :func:`~apex_rank.ranking.rerank_features.feature_array`, ``Reranker.score_matrix``): the union and
    features ``generate_candidates`` / ``build_feature_frame`` compute, without frames; the
    histories are looked up once for the batch and ids are read only for the top-k. Ties within
    a user go to the smaller song id; users come in user-id order. No checks and no fallback:
    :meth:`ServingPipeline.rank` adds them.
    """
    hist = history_positions(states, song_table)
    excluded = Exclusions.of_states(states, song_table, excludes, history=hist)
    rows, s, best, R = candidate_positions(states, sources, candidate_config, song_table, excluded=excluded,
                                           min_per_source=k)
    if len(rows) == 0:
        return RankedArrays.empty()
    upos = {st.user_id: i for i, st in enumerate(states)}  # a repeated user id reads its last state
    last = np.asarray([upos[st.user_id] for st in states], dtype=np.int64)
    X = feature_array(states, last[rows], s, np.where(R > 0, R, np.nan).astype(np.float32), song_table, history=hist)
    trusted = reranker.trusted_states(np.asarray([st.last_seen_s for st in states], dtype=np.float64), at)
    scores = reranker.score_matrix(X, None if trusted is None else trusted[last[rows]])
    # users by user id, then score descending, ties by song id
    _, urank = sorted_codes(np.asarray([st.user_id for st in states], dtype=object))
    cold = ~song_table.warm[s]
    order = np.flatnonzero(_contenders(rows, scores, cold, k, len(states)))
    user_key = urank[rows[order]]
    order = order[np.lexsort((song_table.id_rank[s[order]], -scores[order], user_key))]
    if cold_share is None:
        keep, rank = select_top_k(urank[rows[order]], cold[order], k, min_cold_share, floor=True,
                                  draws=user_draws([st.user_id for st in states])[rows[order]],
                                  by_score=None if trusted is None else ~trusted[last[rows[order]]])
    else:
        keep, rank = select_top_k(urank[rows[order]], cold[order], k, cold_share)
    keep = order[keep]
    return RankedArrays(rows[keep], song_table.id_array[s[keep]], s[keep], scores[keep].astype(np.float64), best[keep],
                        rank)


def _contenders(rows: np.ndarray, scores: np.ndarray, cold: np.ndarray, k: int, b: int) -> np.ndarray:
    """(n,) bool: the candidates that can make their state's top k, each state's k best new and
    k best warm songs by score (and any tied with the k-th). :func:`select_top_k` only ever
    takes a user's best new and best warm songs, at most k of each, so sorting these alone
    gives its answer, at every ``cold_share``. ``rows`` (the state of each candidate) ascending."""
    keep = np.zeros(len(rows), dtype=bool)
    for part in (np.flatnonzero(cold), np.flatnonzero(~cold)):
        r = rows[part]
        counts = np.bincount(r, minlength=b)
        if len(part) == 0 or counts.max() <= k:
            keep[part] = True
            continue
        M = np.full((b, int(counts.max())), -np.inf)
        M[r, np.arange(len(r)) - (np.cumsum(counts) - counts)[r]] = scores[part]
        kth = -np.partition(-M, k - 1, axis=1)[:, k - 1]  # -inf for a state with fewer than k
        keep[part] = scores[part] >= kth[r]
    return keep


@dataclass(frozen=True)
class ServingPipeline:
    """What ranking reads: the candidate sources, the song table, the reranker and the fallback
    list, with the batch size and the new-song floor (``Recommender.min_cold_share``).

    The ``Recommender`` makes one per call from its current parts (songs added since, or the
    online engine's own ``als`` source, are seen at once); it holds no state of its own.
    """

    sources: Sequence[CandidateSource]
    songs: SongTable
    reranker: Reranker
    candidates: CandidateConfig
    fallback: CandidateSource
    batch_users: int = 1000
    min_cold_share: float = 0.0

    def rank(
        self,
        states: Sequence[UserState],
        k: int,
        *,
        excludes: Sequence[set[str]] | None = None,
        cold_share: float | None = None,
        progress: bool = False,
        at: float | None = None,
    ) -> RankedArrays:
        """Top-``k`` for each state, best first, states in the order given (see the module doc).

        ``excludes``: per state, song ids not to serve (its history is never served).
        ``cold_share``: None lets the scores decide with at least ``min_cold_share`` new songs; a
        number in [0, 1] gives ``round(cold_share · k)`` slots to new songs
        (:func:`~apex_rank.ranking.reranker.select_top_k`). A user id given twice among the
        states with something to rank is a :class:`ConfigError` (each would read the other's
        candidates). ``at``: when the lists are asked for (:func:`rank_arrays`).
        """
        check_k(k)
        check_cold_share(cold_share)
        ex = list(excludes) if excludes is not None else [set() for _ in states]
        known = [i for i, s in enumerate(states) if not s.is_unknown]
        unknown = [i for i, s in enumerate(states) if s.is_unknown]
        if len({states[i].user_id for i in known}) < len(known):
            raise ConfigError("a user id appears twice among the states to rank")
        chunks: Iterable[int] = range(0, len(known), self.batch_users)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="recommend", unit="chunk")
        parts = []
        for start in chunks:
            idx = np.asarray(known[start : start + self.batch_users], dtype=np.int64)
            r = rank_arrays([states[i] for i in idx], k, self.sources, self.songs, self.reranker, self.candidates,
                            excludes=[ex[i] for i in idx], cold_share=cold_share,
                            min_cold_share=self.min_cold_share, at=at)
            parts.append(r._replace(user=idx[r.user]))
        if unknown:
            parts.append(self._fallback(states, unknown, k, ex))
        if len(parts) == 1 and len(states) == 1:
            return parts[0]  # one user: already in rank order
        if not parts:
            return RankedArrays.empty()
        r = RankedArrays(*(np.concatenate(col) for col in zip(*parts)))
        order = np.lexsort((r.rank, r.user))
        return RankedArrays(*(col[order] for col in r))

    def _fallback(self, states: Sequence[UserState], which: list[int], k: int,
                  excludes: Sequence[set[str]]) -> RankedArrays:
        """The popularity-and-quality list (source ``fallback``) for ``states[i]``, i in ``which``."""
        sel = [states[i] for i in which]
        hits, D = self.fallback.retrieve_batch(sel, k, [excludes[i] | set(states[i].history) for i in which])
        r, c = np.nonzero(hits != "")
        song_id = hits[r, c]
        return RankedArrays(np.asarray(which, dtype=np.int64)[r], song_id, self.songs.index_of(song_id.tolist()),
                            D[r, c].astype(np.float64), np.full(len(r), SOURCE_NAMES.index(FALLBACK), np.int8),
                            (c + 1).astype(np.int32))


def song_columns(songs: SongTable, song: np.ndarray) -> dict[str, pl.Series]:
    """``is_cold`` and the seven priors (null where NaN) of the songs at table index ``song``."""
    cols = {"is_cold": pl.Series("is_cold", ~songs.warm[song], dtype=pl.Boolean)}
    for j, t in enumerate(APEX_TASKS):
        cols[t] = pl.Series(t, songs.priors[song, j], dtype=pl.Float32, nan_to_null=True)
    return cols


def ranked_frame(r: RankedArrays, states: Sequence[UserState], songs: SongTable) -> pl.DataFrame:
    """``r`` as a frame: ``user_id`` + :data:`RESULT_SCHEMA` columns, rows in ``r``'s order."""
    if len(r.user) == 0:
        return pl.DataFrame(schema={"user_id": pl.String, **RESULT_SCHEMA})
    uids = np.asarray([st.user_id for st in states], dtype=object)
    names = np.asarray(SOURCE_NAMES, dtype=object)
    return pl.DataFrame({
        "user_id": pl.Series(uids[r.user].tolist(), dtype=pl.String),
        "song_id": pl.Series(r.song_id.tolist(), dtype=pl.String),
        "score": pl.Series(r.score, dtype=pl.Float64),
        "source": pl.Series(names[r.source].tolist(), dtype=pl.String),
        "rank": pl.Series(r.rank, dtype=pl.Int32),
        **song_columns(songs, r.song),
    })


def ranked_items(r: RankedArrays, n_states: int) -> list[list[Item]]:
    """``r`` as, per state, its list of ``(song_id, score, source)``, best first."""
    out: list[list[Item]] = [[] for _ in range(n_states)]
    for u, sid, sc, src in zip(r.user.tolist(), r.song_id.tolist(), r.score.tolist(), r.source.tolist(), strict=True):
        out[u].append((sid, sc, SOURCE_NAMES[src]))
    return out


def cold_shortfall(song_table: SongTable, song_ids: Sequence[str], k: int, cold_share: float | None) -> int:
    """New-song slots asked for by ``cold_share`` that a served list could not fill."""
    if cold_share is None:
        return 0
    idx = song_table.index_of(song_ids)
    served = int((~song_table.warm[idx[idx >= 0]]).sum())
    return max(0, round(cold_share * k) - served)


def warn_cold_shortfall(r: RankedArrays, songs: SongTable, k: int, cold_share: float | None, n_ranked: int) -> None:
    """Log how many users got fewer new songs than ``cold_share`` asked for (their lists are
    filled with warm songs); fallback lists do not count."""
    if cold_share is None or n_ranked == 0:
        return
    ranked = r.source != SOURCE_NAMES.index(FALLBACK)
    users = np.unique(r.user[ranked])
    cold = np.bincount(r.user[ranked & ~songs.warm[r.song]], minlength=len(r.user) and int(r.user.max()) + 1)
    short = np.maximum(0, round(cold_share * k) - cold[users])
    if short.any():
        log.warning("cold_share=%.2f: %d of %d users got fewer new songs than asked (%d slots short, "
                    "too few new candidates; warm songs fill them)", cold_share, int((short > 0).sum()),
                    n_ranked, int(short.sum()))
