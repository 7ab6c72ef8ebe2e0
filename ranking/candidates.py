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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from apex_rank.errors import ConfigError, SchemaError
from apex_rank.ranking.cf import exact_scores, top_k_items
from apex_rank.ranking.index import CandidateIndex
from apex_rank.ranking.state import SongTable, UserState, history_positions

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


@dataclass(frozen=True)
class Exclusions:
    """The items each of b rows must not get, as positions: a CSR (``indptr`` (b + 1,),
    ``indices`` sorted and unique within a row) over some item space, and ``sizes`` (b,), how
    many ids each row excludes in all, ids outside that item space included (the over-fetch
    rule of :func:`_two_pass` reads it, so a source answers alike whatever space it searches).
    ``id_sets``: the id sets themselves, when built from them (for a source that searches by id,
    see :meth:`CandidateSource.retrieve_positions`)."""

    indptr: np.ndarray
    indices: np.ndarray
    sizes: np.ndarray
    id_sets: Sequence[set[str]] | None = None

    def __len__(self) -> int:
        return len(self.sizes)

    @classmethod
    def from_cells(cls, rows: np.ndarray, items: np.ndarray, sizes: np.ndarray,
                   id_sets: Sequence[set[str]] | None = None) -> Exclusions:
        """From (row, item) cells in any order, repeats allowed."""
        b = len(sizes)
        rows, items = np.asarray(rows, dtype=np.int64), np.asarray(items, dtype=np.int64)
        order = np.lexsort((items, rows))
        rows, items = rows[order], items[order]
        if len(rows):
            first = np.r_[True, (np.diff(rows) != 0) | (np.diff(items) != 0)]
            rows, items = rows[first], items[first]
        indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=b))].astype(np.int64)
        return cls(indptr, items, np.asarray(sizes, dtype=np.int64), id_sets)

    @classmethod
    def from_ids(cls, excludes: Sequence[set[str]], positions: Callable[[list[str]], np.ndarray]) -> Exclusions:
        """From id sets, through ``positions`` (ids → item positions, -1 outside the item space)."""
        sizes = np.asarray([len(e) for e in excludes], dtype=np.int64)
        pos = positions([x for e in excludes for x in e])
        rows = np.repeat(np.arange(len(excludes), dtype=np.int64), sizes)
        return cls.from_cells(rows[pos >= 0], pos[pos >= 0], sizes, excludes)

    @classmethod
    def of_states(
        cls,
        states: Sequence[UserState],
        catalogue: SongTable,
        excludes: Sequence[set[str] | None] | None = None,
        *,
        history: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Exclusions:
        """Each state's history plus its ``excludes``, as catalogue positions; ``history`` is
        :func:`~apex_rank.ranking.state.history_positions` of the states when already known."""
        indptr, hist = history if history is not None else history_positions(states, catalogue)
        rows = [np.repeat(np.arange(len(states), dtype=np.int64), np.diff(indptr))]
        items = [hist]
        extra = [excludes[i] or set() for i in range(len(states))] if excludes is not None else []
        if any(extra):
            n_extra = [len(e) for e in extra]
            rows.append(np.repeat(np.arange(len(states), dtype=np.int64), n_extra))
            items.append(catalogue.index_of([x for e in extra for x in e]))
        sets = [set(st.history).union(extra[i]) if extra and extra[i] else set(st.history)
                for i, st in enumerate(states)]
        r, p = np.concatenate(rows), np.concatenate(items)
        return cls.from_cells(r[p >= 0], p[p >= 0], np.asarray([len(e) for e in sets], dtype=np.int64), sets)

    def take(self, rows: Sequence[int] | np.ndarray) -> Exclusions:
        """The exclusions of the given rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = np.diff(self.indptr)[rows]
        starts = self.indptr[rows]
        at = np.repeat(starts - np.r_[0, np.cumsum(lens)[:-1]], lens) + np.arange(int(lens.sum()))
        sets = None if self.id_sets is None else [self.id_sets[i] for i in rows.tolist()]
        return Exclusions(np.r_[0, np.cumsum(lens)].astype(np.int64), self.indices[at], self.sizes[rows], sets)

    def mapped(self, to_items: np.ndarray) -> Exclusions:
        """The same exclusions in another item space: position p becomes ``to_items[p]``
        (-1: not an item there, dropped); ``sizes`` are kept."""
        new = to_items[self.indices]
        return Exclusions.from_cells(self.cell_rows()[new >= 0], new[new >= 0], self.sizes, self.id_sets)

    def cell_rows(self) -> np.ndarray:
        """The row of each entry of ``indices``."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.indptr))


def _filter_rows(
    items: np.ndarray, scores: np.ndarray, excluded: Exclusions, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Drop excluded items and padding (-1) from each row, keep the first n (order preserved).

    Vectorised: one sorted membership test of every (row, item) against the excluded cells.
    """
    b, m = items.shape
    out_items = np.full((b, n), -1, dtype=np.int64)
    out_sc = np.full((b, n), -np.inf, dtype=np.float32)
    if b == 0 or n == 0 or m == 0:
        return out_items, out_sc
    keep = items >= 0
    if len(excluded.indices):
        width = int(max(items.max(), excluded.indices.max())) + 1
        cells = excluded.cell_rows() * width + excluded.indices  # sorted: rows ascending, items sorted within
        key = np.arange(b, dtype=np.int64)[:, None] * width + items
        at = np.minimum(np.searchsorted(cells, key), len(cells) - 1)
        keep &= cells[at] != key
    col = np.cumsum(keep, axis=1) - 1
    keep &= col < n
    r, c = np.nonzero(keep)
    out_items[r, col[r, c]] = items[r, c]
    out_sc[r, col[r, c]] = scores[r, c]
    return out_items, out_sc


FIRST_FETCH_EXTRA = 32


def _two_pass(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    excluded: Exclusions,
    n: int,
    cap: int,
    available: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-n non-excluded items per row with few searches.

    Pass 1 fetches ``n + FIRST_FETCH_EXTRA`` for every row. A row left with fewer than n results
    whose exclusions exceed that margin is searched again with ``n + min(cap, |excluded|)``
    (rounded up to a power of two, rows grouped by that size). Both sizes depend only on the row,
    so a batch equals single calls, and one heavy user does not make a whole batch fetch
    thousands of results. ``search(rows, k)`` returns ``(scores, items)`` for those rows.
    """
    b = len(excluded)
    D, hits = search(np.arange(b), min(available, n + FIRST_FETCH_EXTRA))
    items, sc = _filter_rows(hits, D, excluded, n)
    short = np.flatnonzero(((items >= 0).sum(axis=1) < n) & (excluded.sizes > FIRST_FETCH_EXTRA))
    if available <= n + FIRST_FETCH_EXTRA:
        short = short[:0]
    groups: dict[int, list[int]] = {}
    for i in short.tolist():
        need = n + min(cap, int(excluded.sizes[i]))
        groups.setdefault(1 << (need - 1).bit_length(), []).append(i)
    for fetch, group in groups.items():
        D, hits = search(np.asarray(group), min(available, fetch))
        fi, fs = _filter_rows(hits, D, excluded.take(group), n)
        items[group], sc[group] = fi, fs
    return items, sc


class CandidateSource:
    """The contract every candidate source implements (see module doc).

    A source implements either :meth:`retrieve_batch` (by id) or, the fast form,
    :attr:`item_ids` and :meth:`search_items` (its own item space, by position), from which
    the base class answers :meth:`retrieve_batch` in song ids and :meth:`retrieve_positions`
    in positions of a catalogue (a :class:`SongTable`), the form the ranking path carries until
    the final top-k. A source implementing only :meth:`retrieve_batch` is answered through it
    there (its ids looked up in the catalogue).
    """

    name: str = ""
    # caches, each keyed by what it was computed from: ids -> item positions, item positions ->
    # ids, and the catalogue maps of _catalogue_maps
    _item_pos: tuple[int, dict[str, int]] | None = None
    _lookup: np.ndarray | None = None
    _maps: tuple[SongTable, tuple[int, int], np.ndarray, np.ndarray] | None = None

    @property
    def item_ids(self) -> Sequence[str | None]:
        """The id of each item position :meth:`search_items` returns (None: no longer an item)."""
        raise NotImplementedError(f"{type(self).__name__} searches by id only (retrieve_batch)")

    def search_items(
        self, states: Sequence[UserState], n: int, excluded: Exclusions
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-n per state: ``(items (b, n) int64 positions in item_ids, scores (b, n) float32)``
        sorted best first, the ``excluded`` items (positions in item_ids) removed, ``-1`` /
        ``-inf`` padding."""
        raise NotImplementedError(f"{type(self).__name__} searches by id only (retrieve_batch)")

    def _searches_items(self) -> bool:
        return type(self).search_items is not CandidateSource.search_items

    def item_positions(self, ids: list[str]) -> np.ndarray:
        """Position in ``item_ids`` of each id, -1 where it is not an item."""
        key = len(self.item_ids)
        if self._item_pos is None or self._item_pos[0] != key:
            self._item_pos = (key, {s: i for i, s in enumerate(self.item_ids) if s is not None})
        pos = self._item_pos[1]
        return np.asarray([pos.get(s, -1) for s in ids], dtype=np.int64)

    def retrieve_batch(
        self, states: Sequence[UserState], n: int, excludes: Sequence[set[str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-n per state: ``(ids (b, n) object, scores (b, n) float32)`` sorted best first,
        excluded ids removed, ``""`` / ``-inf`` padding."""
        if not self._searches_items():
            raise NotImplementedError(f"{type(self).__name__} implements neither retrieve_batch nor search_items")
        items, sc = self.search_items(states, n, Exclusions.from_ids(excludes, self.item_positions))
        if self._lookup is None or len(self._lookup) != len(self.item_ids) + 1:
            self._lookup = np.asarray([s or "" for s in self.item_ids] + [""], dtype=object)
        return self._lookup[np.where(items >= 0, items, len(self._lookup) - 1)], sc

    def retrieve(self, state: UserState, n: int, exclude: set[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One user: ``(ids (n,), scores (n,))``."""
        ids, sc = self.retrieve_batch([state], n, [exclude or set()])
        return ids[0], sc[0]

    def retrieve_positions(
        self, states: Sequence[UserState], n: int, excluded: Exclusions, catalogue: SongTable
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`retrieve_batch` in catalogue positions: ``excluded`` and the returned
        ``(positions (b, n) int64, scores (b, n) float32)`` index ``catalogue.song_ids``
        (``-1`` / ``-inf`` padding). An item outside the catalogue is a :class:`SchemaError`."""
        if not self._searches_items():
            if excluded.id_sets is None:
                raise ConfigError(f"source {self.name!r} searches by id: its exclusions need their id sets")
            ids, sc = self.retrieve_batch(states, n, excluded.id_sets)
            found = ids != ""
            pos = np.full(ids.shape, -1, dtype=np.int64)
            pos[found] = catalogue.index_of(ids[found].tolist())
            if (pos[found] < 0).any():
                raise SchemaError(f"candidate song_id {ids[found][pos[found] < 0][0]!r} is not in the catalogue")
            return pos, sc
        to_cat, from_cat = self._catalogue_maps(catalogue)
        items, sc = self.search_items(states, n, excluded.mapped(from_cat))
        pos = to_cat[items]  # padding -1 reads the trailing -1
        lost = (items >= 0) & (pos < 0)
        if lost.any():
            raise SchemaError(f"candidate song_id {self.item_ids[int(items[lost][0])]!r} is not in the catalogue")
        return pos, sc

    def _catalogue_maps(self, catalogue: SongTable) -> tuple[np.ndarray, np.ndarray]:
        """(item position → catalogue position, with a trailing -1 for the padding item -1;
        catalogue position → item position), -1 where none; computed once per catalogue size
        and item count (both only grow)."""
        key = (len(catalogue), len(self.item_ids))
        cached = self._maps
        if cached is None or cached[0] is not catalogue or cached[1] != key:
            ids = self.item_ids
            known = [i for i, s in enumerate(ids) if s is not None]
            to_cat = np.full(len(ids) + 1, -1, dtype=np.int64)
            to_cat[known] = catalogue.index_of([ids[i] for i in known])
            from_cat = np.full(len(catalogue), -1, dtype=np.int64)
            ok = np.flatnonzero(to_cat >= 0)
            from_cat[to_cat[ok]] = ok
            cached = self._maps = (catalogue, key, to_cat, from_cat)
        return cached[2], cached[3]

    @staticmethod
    def _empty(b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((b, n), -1, dtype=np.int64), np.full((b, n), -np.inf, dtype=np.float32)


class FactorSource(CandidateSource):
    """``als``: exact u·V top-N over warm songs.

    ``factors`` is used as given when it is contiguous float32 (the CF model's item matrix is
    not copied)."""

    name = "als"

    def __init__(self, song_ids: Sequence[str], factors: np.ndarray) -> None:
        self.song_ids = list(song_ids)
        self.factors = np.ascontiguousarray(factors, dtype=np.float32)
        if self.factors.shape[0] != len(self.song_ids):
            raise ConfigError(f"{len(self.song_ids)} song ids for factors of shape {self.factors.shape}")
        self._max_norm = float(np.linalg.norm(self.factors, axis=1).max()) if len(self.factors) else 0.0

    @property
    def item_ids(self) -> Sequence[str | None]:
        return self.song_ids

    def search_items(
        self, states: Sequence[UserState], n: int, excluded: Exclusions
    ) -> tuple[np.ndarray, np.ndarray]:
        b = len(states)
        items, sc = self._empty(b, n)
        rows = [i for i, s in enumerate(states) if s.cf_factor is not None]
        if n == 0 or not rows or not self.song_ids:
            return items, sc
        import scipy.sparse as sp

        U = np.stack([states[i].cf_factor for i in rows]).astype(np.float32)
        if U.shape[1] != self.factors.shape[1]:
            raise ConfigError(f"user factor width {U.shape[1]} != item factor width {self.factors.shape[1]}")
        ex = excluded.take(rows)
        mask = sp.csr_matrix((np.ones(len(ex.indices), np.float32), ex.indices, ex.indptr),
                             shape=(len(rows), len(self.song_ids)))
        items[rows], sc[rows] = top_k_items(U, self.factors, n, exclude=mask, max_norm=self._max_norm)
        return items, sc


class IndexSource(CandidateSource):
    """``content`` / ``pseudo_cf``: FAISS search with the state's profile or CF factor."""

    def __init__(self, name: str, index: CandidateIndex, query: str, *, max_overfetch: int = 2000) -> None:
        if query not in ("profile", "cf_factor"):
            raise ConfigError(f"IndexSource query must be 'profile' or 'cf_factor', got {query!r}")
        self.name = name
        self.index = index
        self.query = query
        self.max_overfetch = max_overfetch

    @property
    def item_ids(self) -> Sequence[str | None]:
        return self.index.labels

    def item_positions(self, ids: list[str]) -> np.ndarray:
        return self.index.labels_of(ids)

    def search_items(
        self, states: Sequence[UserState], n: int, excluded: Exclusions
    ) -> tuple[np.ndarray, np.ndarray]:
        b = len(states)
        items, sc = self._empty(b, n)
        rows = [i for i, s in enumerate(states) if getattr(s, self.query) is not None]
        if n == 0 or not rows or len(self.index) == 0:
            return items, sc
        Q = self._queries([getattr(states[i], self.query) for i in rows])
        items[rows], sc[rows] = _two_pass(
            lambda sel, k: self.index.search_labels(Q[sel], k),
            excluded.take(rows),
            n,
            self.max_overfetch,
            len(self.index),
        )
        return items, sc

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

    The top-N is approximate: a song the index misses is simply not a candidate. What it finds
    is rescored as the exact source scores (float64 ``u·v``, ties by position), from
    ``RESCORE_EXTRA`` more hits than asked: FAISS's float32 scores ordered near-ties
    differently, so with every list scanned the ``als`` ranks, and through ``rank_als`` the
    reranked lists, differed from exact serving. History filtering and the batch-equals-single
    contract are those of :class:`IndexSource` (each query is searched on its own).
    """

    RESCORE_EXTRA = 8

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
        self.factors = factors  # for the exact rescoring (no copy)

    def search_items(
        self, states: Sequence[UserState], n: int, excluded: Exclusions
    ) -> tuple[np.ndarray, np.ndarray]:
        m = min(n + self.RESCORE_EXTRA, len(self.index)) if n else 0
        items, _ = super().search_items(states, m, excluded)
        out, sc = self._empty(len(states), n)
        rows = [i for i, s in enumerate(states) if s.cf_factor is not None]
        if not rows or m == 0:
            return out, sc
        H = items[rows]
        found = H >= 0
        U = self._queries([states[i].cf_factor for i in rows])[:, : self.factor_dim]
        ps = np.where(found, exact_scores(U, self.factors, np.where(found, H, 0)), -np.inf)
        order = np.lexsort((np.where(found, H, np.iinfo(np.int64).max), -ps), axis=1)[:, :n]
        out[rows, : order.shape[1]] = np.take_along_axis(H, order, axis=1)
        sc[rows, : order.shape[1]] = np.take_along_axis(ps, order, axis=1).astype(np.float32)
        return out, sc

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
        self.song_ids = np.asarray(list(song_ids), dtype=object).reshape(-1)[order]
        self.scores = np.asarray(scores, dtype=np.float32)[order]
        self.max_overfetch = max_overfetch

    @property
    def item_ids(self) -> Sequence[str | None]:
        return self.song_ids  # type: ignore[return-value]  # an object array of str

    def search_items(
        self, states: Sequence[UserState], n: int, excluded: Exclusions
    ) -> tuple[np.ndarray, np.ndarray]:
        b = len(states)
        if n == 0 or b == 0 or len(self.song_ids) == 0:
            return self._empty(b, n)

        def search(sel: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            return (np.broadcast_to(self.scores[:k], (len(sel), k)),
                    np.broadcast_to(np.arange(k, dtype=np.int64), (len(sel), k)))

        return _two_pass(search, excluded, n, self.max_overfetch, len(self.song_ids))


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


def _gather(
    sources: Sequence[CandidateSource],
    config: CandidateConfig,
    min_per_source: int,
    fetch: Callable[[CandidateSource, int], tuple[np.ndarray, np.ndarray]],
    pad: object,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Every source's hits as cells: ``(row, item, source index, 1-based rank)``; None when
    there are none. ``fetch(source, n)`` returns its (b, n) hits, ``pad`` where there are none."""
    rs, items, srcs, rks = [], [], [], []
    for src in sources:
        if src.name not in SOURCE_ORDER:
            raise ConfigError(f"candidate source {src.name!r} is not one of {SOURCE_ORDER}")
        n = max(config.limit(src.name), min_per_source if config.limit(src.name) > 0 else 0)
        if n == 0:
            continue
        hits, _ = fetch(src, n)
        r, c = np.nonzero(hits != pad)
        rs.append(r.astype(np.int64))
        items.append(hits[r, c])
        srcs.append(np.full(len(r), SOURCE_ORDER.index(src.name), dtype=np.int64))
        rks.append((c + 1).astype(np.int64))
    if not rs or sum(len(r) for r in rs) == 0:
        return None
    return np.concatenate(rs), np.concatenate(items), np.concatenate(srcs), np.concatenate(rks)


def lex_order(*keys: np.ndarray) -> np.ndarray:
    """``np.lexsort(keys)`` (the last key primary) for non-negative integer keys that together
    tell every element apart (equal keys come in no set order): one argsort of the keys packed
    into an int64 when their ranges fit in 63 bits (several times faster than a sort pass per
    key, and than a stable sort), ``np.lexsort`` otherwise."""
    bits = [int(k.max()).bit_length() if len(k) else 0 for k in keys]
    if sum(bits) > 63:
        return np.lexsort(keys)
    packed = np.zeros(len(keys[0]), dtype=np.int64)
    shift = 0
    for k, nb in zip(keys, bits):
        packed |= np.asarray(k, dtype=np.int64) << shift
        shift += nb
    return np.argsort(packed)


def _union(
    row: np.ndarray, item: np.ndarray, src_: np.ndarray, rank: np.ndarray, code: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One row per (row, item) of the cells, ordered by row, best source, best rank, ``code``
    (the item's place in song-id order): ``(rows, items, best, ranks)`` as
    :func:`candidate_arrays` returns them."""
    nsrc = len(SOURCE_ORDER)
    by = lex_order(rank, src_, code, row)  # each (row, code) group together, each source's best rank first
    row, code, src_, rank = row[by], code[by], src_[by], rank[by]
    new_group = np.r_[True, (np.diff(row) != 0) | (np.diff(code) != 0)]
    starts = np.flatnonzero(new_group)
    ginv = np.cumsum(new_group) - 1
    first_of_source = new_group | np.r_[True, np.diff(src_) != 0]  # a source's best rank of the song
    R = np.zeros((len(starts), nsrc), dtype=np.int32)
    R[ginv[first_of_source], src_[first_of_source]] = rank[first_of_source]
    best_cell = np.minimum.reduceat(rank * nsrc + src_, starts)  # (rank, source): ties go to the earlier source
    best, minrank = best_cell % nsrc, best_cell // nsrc
    grow, gcode, gitem = row[starts], code[starts], item[by[starts]]
    order = lex_order(gcode, minrank, best, grow)
    return grow[order], gitem[order], best[order].astype(np.int8), R[order]


def _no_candidates(item_dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (np.zeros(0, np.int64), np.zeros(0, dtype=item_dtype), np.zeros(0, np.int8),
            np.zeros((0, len(SOURCE_ORDER)), np.int32))


def candidate_arrays(
    states: Sequence[UserState],
    sources: Sequence[CandidateSource],
    config: CandidateConfig,
    *,
    excludes: Sequence[set[str] | None] | None = None,
    min_per_source: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The union of the sources' candidates per user as arrays, in song ids: what
    :func:`generate_candidates` wraps in a frame. :func:`candidate_positions` is the same
    union in catalogue positions (the serving path).

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
    cells = _gather(sources, config, min_per_source, lambda src, n: src.retrieve_batch(states, n, excl), "")
    if cells is None:
        return _no_candidates(object)
    row, sid, src_, rank = cells
    _, code = sorted_codes(sid)  # codes follow song-id order (the final tie-break)
    return _union(row, sid, src_, rank, code)


def candidate_positions(
    states: Sequence[UserState],
    sources: Sequence[CandidateSource],
    config: CandidateConfig,
    catalogue: SongTable,
    *,
    excluded: Exclusions | None = None,
    min_per_source: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`candidate_arrays` in positions of ``catalogue``: the same rows, with ``songs``
    (n,) int64 catalogue positions in place of song ids; no string is touched per candidate.

    ``excluded``: what each state may not get (:meth:`Exclusions.of_states`: its history and
    the caller's excludes; computed from the histories when None).
    """
    ex = excluded if excluded is not None else Exclusions.of_states(states, catalogue)
    cells = _gather(sources, config, min_per_source,
                    lambda src, n: src.retrieve_positions(states, n, ex, catalogue), -1)
    if cells is None:
        return _no_candidates(np.int64)
    row, pos, src_, rank = cells
    return _union(row, pos, src_, rank, catalogue.id_rank[pos])


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
