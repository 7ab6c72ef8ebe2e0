"""Candidate generation: four sources, per-source limits, history filter, de-dup, source ranks.

Every source implements one contract, :class:`CandidateSource`: ``retrieve_batch(states, n,
excludes)`` returns ``(ids (b, n) object, scores (b, n) float32)`` sorted best first, with the
excluded ids (history + caller excludes) already removed and ``""`` / ``-inf`` padding when
fewer than n remain. ``retrieve`` is the one-user form and equals row 0 of the batch form.

Sources (DESIGN.md, "Cold start"):

- ``als``: exact top-N of u·V over warm songs (needs a CF factor). Online, above
  ``FactorIndexConfig.min_songs`` warm songs, :class:`FactorIndexSource` answers it
  approximately from an IVF index instead (the online engine swaps it in); batch ranking and
  evaluation stay exact.
- ``content``: FAISS neighbours of the user's content profile over all songs.
- ``pseudo_cf``: FAISS inner product of the CF factor with cold songs' pseudo factors V̂.
- ``fresh``: cold songs ordered by their popularity-and-quality prior score (not personal).
- ``popular`` (fallback only): all songs by the same score, for users with no state.

:func:`generate_candidates` unions the sources per user into one long frame: ``user_id``,
``song_id``, ``source`` (the source that ranked it best, ties in the order above) and one
``rank_<source>`` column (1-based, null where the source did not return the song).

Example
-------
>>> # sources = recommender.sources; state = recommender.user_state("u00001")
>>> # generate_candidates([state], sources, CandidateConfig()).columns[:3]
>>> # ['user_id', 'song_id', 'source']
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from apex_rank.errors import ConfigError
from apex_rank.ranking.cf import top_k_by_factors
from apex_rank.ranking.index import CandidateIndex
from apex_rank.ranking.state import UserState

SOURCE_ORDER = ("als", "content", "pseudo_cf", "fresh")
RANK_COLUMNS = tuple(f"rank_{s}" for s in SOURCE_ORDER)


@dataclass(frozen=True)
class CandidateConfig:
    """Per-source candidate limits (0 disables a source) and the over-fetch cap.

    Attributes
    ----------
    als, content, pseudo_cf, fresh: how many candidates each source contributes per user.
    max_overfetch: at most this many extra results are fetched from FAISS sources to make up for
        filtered history; users with longer histories may get fewer than the limit.
    """

    als: int = 100
    content: int = 100
    pseudo_cf: int = 100
    fresh: int = 50
    max_overfetch: int = 2000

    def __post_init__(self) -> None:
        for name in ("als", "content", "pseudo_cf", "fresh", "max_overfetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"candidates.{name} must be >= 0, got {getattr(self, name)}")

    def limit(self, source: str) -> int:
        return int(getattr(self, source))


@dataclass(frozen=True)
class FactorIndexConfig:
    """The approximate ``als`` source of online serving (:class:`FactorIndexSource`).

    Attributes
    ----------
    min_songs:
        Catalogues with fewer warm songs are searched exactly (:class:`FactorSource`), so small
        catalogues rank online exactly as offline.
    nlist:
        IVF lists; 0 picks about 4·√n (a multiple of 16), at least 39 songs per list.
    nprobe:
        Lists scanned per query. At 100k songs (1264 lists, 5 % scanned) recall@100 against
        the exact top-100 was 0.99 on factor-like data and 0.97-0.99 on ALS factors of the
        ``bench.ranking`` world, whose later plays it found as often as the exact source
        (``python -m bench.als_topk``); at 1M songs (4000 lists) 0.997 at 0.3 ms a query.
        Building the index (k-means over every vector) took 3 s at 100k songs and 2 min at 1M
        on 2 cores.
    """

    min_songs: int = 50_000
    nlist: int = 0
    nprobe: int = 64

    def __post_init__(self) -> None:
        for name in ("min_songs", "nprobe"):
            if getattr(self, name) < 1:
                raise ConfigError(f"als_index.{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist < 0:
            raise ConfigError(f"als_index.nlist must be >= 0 (0: chosen from the size), got {self.nlist}")

    def lists_for(self, n_songs: int) -> int:
        """IVF lists for ``n_songs`` vectors (``nlist``, or the size rule when it is 0)."""
        if self.nlist:
            return min(self.nlist, max(1, n_songs))
        return max(1, min(n_songs // 39, max(16, int(4 * np.sqrt(n_songs)) // 16 * 16)))


def _filter_rows(
    ids: np.ndarray, scores: np.ndarray, excludes: Sequence[set[str]], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Drop excluded ids and padding from each row, keep the first n (order preserved).

    One set lookup per fetched id (b·m in all), no per-call frame building: a single user's
    request costs microseconds.
    """
    b, m = ids.shape
    out_ids = np.full((b, n), "", dtype=object)
    out_sc = np.full((b, n), -np.inf, dtype=np.float32)
    if b == 0 or n == 0 or m == 0:
        return out_ids, out_sc
    for i in range(b):
        ex = excludes[i]
        keep = [j for j, x in enumerate(ids[i].tolist()) if x and x not in ex][:n]
        if keep:
            out_ids[i, : len(keep)] = ids[i, keep]
            out_sc[i, : len(keep)] = scores[i, keep]
    return out_ids, out_sc


FIRST_FETCH_EXTRA = 32


def _two_pass(
    search: Callable[[list[int], int], tuple[np.ndarray, np.ndarray]],
    excludes: Sequence[set[str]],
    n: int,
    cap: int,
    available: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-n non-excluded results per row with few searches.

    Pass 1 fetches ``n + FIRST_FETCH_EXTRA`` for every row. A row left with fewer than n results
    whose exclusions exceed that margin is searched again with ``n + min(cap, |excluded|)``
    (rounded up to a power of two, rows grouped by that size). Both sizes depend only on the row,
    so a batch equals single calls, and one heavy user does not make a whole batch fetch
    thousands of results. ``search(rows, k)`` returns ``(scores, ids)`` for those rows.
    """
    b = len(excludes)
    rows = list(range(b))
    D, hits = search(rows, min(available, n + FIRST_FETCH_EXTRA))
    ids, sc = _filter_rows(hits, D, excludes, n)
    short = [
        i
        for i in rows
        if (ids[i] != "").sum() < n and len(excludes[i]) > FIRST_FETCH_EXTRA and available > n + FIRST_FETCH_EXTRA
    ]
    groups: dict[int, list[int]] = {}
    for i in short:
        need = n + min(cap, len(excludes[i]))
        groups.setdefault(1 << (need - 1).bit_length(), []).append(i)
    for fetch, group in groups.items():
        D, hits = search(group, min(available, fetch))
        fi, fs = _filter_rows(hits, D, [excludes[i] for i in group], n)
        ids[group], sc[group] = fi, fs
    return ids, sc


class CandidateSource(abc.ABC):
    """The contract every candidate source implements (see module doc)."""

    name: str = ""

    @abc.abstractmethod
    def retrieve_batch(
        self, states: Sequence[UserState], n: int, excludes: Sequence[set[str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-n per state: ``(ids (b, n) object, scores (b, n) float32)``, excluded ids removed."""

    def retrieve(self, state: UserState, n: int, exclude: set[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One user: ``(ids (n,), scores (n,))``."""
        ids, sc = self.retrieve_batch([state], n, [exclude or set()])
        return ids[0], sc[0]

    @staticmethod
    def _empty(b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((b, n), "", dtype=object), np.full((b, n), -np.inf, dtype=np.float32)


class FactorSource(CandidateSource):
    """``als``: exact u·V top-N over warm songs."""

    name = "als"

    def __init__(self, song_ids: Sequence[str], factors: np.ndarray) -> None:
        self.song_ids = list(song_ids)
        self.factors = np.ascontiguousarray(factors, dtype=np.float32)
        self._pos = {s: i for i, s in enumerate(self.song_ids)}
        self._lookup = np.asarray(self.song_ids + [""], dtype=object)
        self._max_norm = float(np.linalg.norm(self.factors, axis=1).max()) if len(self.factors) else 0.0

    def retrieve_batch(
        self, states: Sequence[UserState], n: int, excludes: Sequence[set[str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        b = len(states)
        ids, sc = self._empty(b, n)
        rows = [i for i, s in enumerate(states) if s.cf_factor is not None]
        if n == 0 or not rows or not self.song_ids:
            return ids, sc
        import scipy.sparse as sp

        U = np.stack([states[i].cf_factor for i in rows]).astype(np.float32)
        if U.shape[1] != self.factors.shape[1]:
            raise ConfigError(f"user factor width {U.shape[1]} != item factor width {self.factors.shape[1]}")
        cols: list[int] = []
        indptr = [0]
        for i in rows:
            cols.extend(j for j in (self._pos.get(s, -1) for s in excludes[i]) if j >= 0)
            indptr.append(len(cols))
        mask = sp.csr_matrix(
            (np.ones(len(cols), np.float32), np.asarray(cols, np.int64), np.asarray(indptr)),
            shape=(len(rows), len(self.song_ids)),
        )
        hits, D = top_k_by_factors(U, self.factors, self.song_ids, n, exclude=mask, lookup=self._lookup,
                                   max_norm=self._max_norm)
        ids[rows], sc[rows] = hits, D
        return ids, sc


class IndexSource(CandidateSource):
    """``content`` / ``pseudo_cf``: FAISS search with the state's profile or CF factor."""

    def __init__(self, name: str, index: CandidateIndex, query: str, *, max_overfetch: int = 2000) -> None:
        if query not in ("profile", "cf_factor"):
            raise ConfigError(f"IndexSource query must be 'profile' or 'cf_factor', got {query!r}")
        self.name = name
        self.index = index
        self.query = query
        self.max_overfetch = max_overfetch

    def retrieve_batch(
        self, states: Sequence[UserState], n: int, excludes: Sequence[set[str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        b = len(states)
        ids, sc = self._empty(b, n)
        rows = [i for i, s in enumerate(states) if getattr(s, self.query) is not None]
        if n == 0 or not rows or len(self.index) == 0:
            return ids, sc
        Q = self._queries([getattr(states[i], self.query) for i in rows])
        fi, fs = _two_pass(
            lambda sel, k: self.index.search(Q[sel], k),
            [excludes[i] for i in rows],
            n,
            self.max_overfetch,
            len(self.index),
        )
        ids[rows], sc[rows] = fi, fs
        return ids, sc

    def _queries(self, vectors: list[np.ndarray]) -> np.ndarray:
        """The (b, d) float32 query matrix for the index from the states' vectors."""
        return np.stack(vectors).astype(np.float32)


class FactorIndexSource(IndexSource):
    """``als`` approximately: an IVF inner-product index over the warm songs' factors.

    Maximum inner product is not a nearest-neighbour problem (long item vectors win for every
    user), and IVF clusters of the raw factors are lopsided. So each item vector v gets one more
    coordinate, √(M² − ‖v‖²) with M the largest norm, and each query a 0 there: the scores are
    still exactly u·v, while all item vectors now have norm M, so inner-product order is
    distance order and the clusters are balanced (Bachrach et al., RecSys 2014). On ALS factors
    of 88k songs this raised recall@100 at 32 of 1024 lists scanned from 0.78 to 0.97 and made
    a query 2x faster.

    Scores are the float32 inner products FAISS computes (the exact source rescores in float64),
    and the top-N is approximate: a song the index misses is simply not a candidate. History
    filtering and the batch-equals-single contract are those of :class:`IndexSource` (each
    query is searched on its own).
    """

    def __init__(
        self,
        song_ids: Sequence[str],
        factors: np.ndarray,
        config: FactorIndexConfig | None = None,
        *,
        max_overfetch: int = 2000,
        device: str = "cpu",
    ) -> None:
        cfg = config or FactorIndexConfig()
        V = np.asarray(factors, dtype=np.float64)
        if V.ndim != 2 or V.shape[0] != len(song_ids):
            raise ConfigError(f"{len(song_ids)} song ids for factors of shape {V.shape}")
        sq = (V * V).sum(axis=1)
        top = float(sq.max(initial=0.0))
        aug = np.hstack([V, np.sqrt(np.maximum(top - sq, 0.0))[:, None]]).astype(np.float32)
        index = CandidateIndex(V.shape[1] + 1, f"IVF{cfg.lists_for(len(song_ids))},Flat", normalize=False,
                               nprobe=cfg.nprobe, device=device)
        index.add(list(song_ids), aug)
        super().__init__("als", index, "cf_factor", max_overfetch=max_overfetch)
        self.factor_dim = V.shape[1]

    def _queries(self, vectors: list[np.ndarray]) -> np.ndarray:
        Q = np.stack(vectors).astype(np.float32)
        if Q.shape[1] != self.factor_dim:
            raise ConfigError(f"user factor width {Q.shape[1]} != item factor width {self.factor_dim}")
        return np.hstack([Q, np.zeros((Q.shape[0], 1), np.float32)])


class RankedListSource(CandidateSource):
    """``fresh`` / ``popular``: one global ordering, history filtered per user."""

    def __init__(self, name: str, song_ids: Sequence[str], scores: np.ndarray, *, max_overfetch: int = 2000) -> None:
        order = np.lexsort((np.arange(len(song_ids)), -np.asarray(scores, dtype=np.float64)))
        self.name = name
        self.song_ids = np.asarray(list(song_ids), dtype=object)[order]
        self.scores = np.asarray(scores, dtype=np.float32)[order]
        self.max_overfetch = max_overfetch

    def retrieve_batch(
        self, states: Sequence[UserState], n: int, excludes: Sequence[set[str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        b = len(states)
        if n == 0 or b == 0 or len(self.song_ids) == 0:
            return self._empty(b, n)

        def search(sel: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
            return np.broadcast_to(self.scores[:k], (len(sel), k)), np.broadcast_to(self.song_ids[:k], (len(sel), k))

        return _two_pass(search, excludes, n, self.max_overfetch, len(self.song_ids))


_NULL_RANK = np.iinfo(np.int32).max


def sorted_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for object (string) arrays, without sorting all values.

    Factorises with a dict (linear) and sorts only the distinct values, so a batch of many users
    with overlapping candidates costs one pass plus a sort of the distinct ids.

    Returns
    -------
    (distinct values in sorted order, (n,) int64 code of each value in that order).
    """
    vals = values.tolist()
    index: dict[object, int] = dict.fromkeys(vals, 0)
    uniq = np.empty(len(index), dtype=object)
    uniq[:] = list(index)
    for i, x in enumerate(index):
        index[x] = i
    inv = np.fromiter(map(index.__getitem__, vals), dtype=np.int64, count=len(vals))
    order = np.argsort(uniq, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[inv]


def candidate_arrays(
    states: Sequence[UserState],
    sources: Sequence[CandidateSource],
    config: CandidateConfig,
    *,
    excludes: Sequence[set[str] | None] | None = None,
    min_per_source: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The union of the sources' candidates per user as arrays: the one implementation behind
    :func:`generate_candidates` (which wraps it in a frame) and the small-batch serving path.

    Parameters are those of :func:`generate_candidates`.

    Returns
    -------
    rows:
        (n,) int64 position of the row's state in ``states``.
    song_ids:
        (n,) object song ids.
    best:
        (n,) int8 index into ``SOURCE_ORDER`` of the source that ranked the song best (ties to the
        earlier source).
    ranks:
        (n, len(SOURCE_ORDER)) int32 1-based source ranks, 0 where the source did not return it.

    Rows are ordered by state, best source, best rank, song id (as ``generate_candidates``).
    """
    excl: list[set[str]] = []
    for i, s in enumerate(states):
        e = set(s.history)
        if excludes is not None and excludes[i]:
            e |= set(excludes[i])  # type: ignore[arg-type]
        excl.append(e)
    rs, ids, srcs, rks = [], [], [], []
    for src in sources:
        if src.name not in SOURCE_ORDER:
            raise ConfigError(f"candidate source {src.name!r} is not one of {SOURCE_ORDER}")
        n = max(config.limit(src.name), min_per_source if config.limit(src.name) > 0 else 0)
        if n == 0:
            continue
        hits, _ = src.retrieve_batch(states, n, excl)
        r, c = np.nonzero(hits != "")
        rs.append(r.astype(np.int64))
        ids.append(hits[r, c])
        srcs.append(np.full(len(r), SOURCE_ORDER.index(src.name), dtype=np.int64))
        rks.append((c + 1).astype(np.int64))
    nsrc = len(SOURCE_ORDER)
    if not rs or sum(len(r) for r in rs) == 0:
        return (
            np.zeros(0, np.int64),
            np.zeros(0, dtype=object),
            np.zeros(0, np.int8),
            np.zeros((0, nsrc), np.int32),
        )
    row, sid = np.concatenate(rs), np.concatenate(ids)
    src_, rank = np.concatenate(srcs), np.concatenate(rks)
    uniq, code = sorted_codes(sid)  # codes follow song-id order (the final tie-break)
    group, ginv = np.unique(row * len(uniq) + code, return_inverse=True)
    R = np.full((len(group), nsrc), _NULL_RANK, dtype=np.int64)
    np.minimum.at(R, (ginv, src_), rank)
    key = np.full(len(group), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(key, ginv, rank * nsrc + src_)  # (rank, source) packed: ties go to the earlier source
    best, minrank = key % nsrc, key // nsrc
    grow, gcode = group // len(uniq), group % len(uniq)
    order = np.lexsort((gcode, minrank, best, grow))
    R = np.where(R == _NULL_RANK, 0, R)[order].astype(np.int32)
    return grow[order], uniq[gcode[order]], best[order].astype(np.int8), R


def generate_candidates(
    states: Sequence[UserState],
    sources: Sequence[CandidateSource],
    config: CandidateConfig,
    *,
    excludes: Sequence[set[str] | None] | None = None,
    min_per_source: int = 0,
) -> pl.DataFrame:
    """Union of the sources' candidates per user (see module doc).

    Parameters
    ----------
    states:
        Users to generate for (row order is kept in the output).
    sources:
        Named sources; names must be among ``SOURCE_ORDER``.
    config:
        Per-source limits.
    excludes:
        Extra ids to drop per user, on top of each state's history.
    min_per_source:
        Raise every source's limit to at least this (so that k larger than the limits still fills).
    """
    rows, ids, best, R = candidate_arrays(states, sources, config, excludes=excludes, min_per_source=min_per_source)
    schema = {"user_id": pl.String, "song_id": pl.String, "source": pl.String, **{c: pl.Int32 for c in RANK_COLUMNS}}
    if len(rows) == 0:
        return pl.DataFrame(schema=schema)
    uids = np.asarray([s.user_id for s in states], dtype=object)
    names = np.asarray(SOURCE_ORDER, dtype=object)
    cols: dict[str, pl.Series] = {
        "user_id": pl.Series(uids[rows].tolist(), dtype=pl.String),
        "song_id": pl.Series(ids.tolist(), dtype=pl.String),
        "source": pl.Series(names[best].tolist(), dtype=pl.String),
    }
    for j, c in enumerate(RANK_COLUMNS):
        cols[c] = pl.Series(c, np.where(R[:, j] > 0, R[:, j], np.nan), dtype=pl.Float64, nan_to_null=True).cast(
            pl.Int32
        )
    return pl.DataFrame(cols)
