"""Collaborative filtering with implicit (ALS or BPR) behind one interface: :class:`CFModel`.

Interactions (polars, string ids) become a users × songs CSR matrix of summed weights with
sorted id maps; implicit fits user factors U (n_users, f) and item factors V (n_songs, f) on it,
inside :func:`~apex_rank.threads.blas_single_threaded` (implicit runs its own OpenMP loop and
asks for single-threaded BLAS). Users unseen at fit time get a factor from their history by the
ALS user step (one regularised least-squares solve against the fixed V), which is what
implicit's ``recalculate_user`` computes; the same solve serves BPR as an approximation. The
item step (:func:`solve_item_factor`, a song's factor from its listeners against the fixed U)
is the same solve with the roles swapped; online warm-up runs both between retrains.

Scores are inner products u·v. Songs without interactions are not in the model (cold): their
scores are NaN and they are never recommended by it.

Example
-------
>>> import polars as pl
>>> inter = pl.DataFrame({"user_id": ["u1", "u1", "u2"], "song_id": ["a", "b", "a"], "weight": [1.0, 1.0, 1.0]})
>>> cf = CFModel(CFConfig(factors=4, iterations=2)).fit(inter)
>>> ids, scores = cf.recommend("u2", k=3)
>>> ids.tolist()[:1]
['b']
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from apex_rank.config import from_dict, to_dict
from apex_rank.errors import ArtifactError, ConfigError, NotFittedError, SchemaError, UnknownIdError
from apex_rank.npfiles import read_arrays, save_arrays
from apex_rank.threads import blas_single_threaded, thread_count

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CFConfig:
    """Settings of :class:`CFModel`.

    Attributes
    ----------
    model: ``als`` (implicit AlternatingLeastSquares) or ``bpr`` (BayesianPersonalizedRanking).
    factors: latent width f. regularization: L2 penalty. alpha: ALS confidence scale (c = alpha·w).
    iterations: ALS sweeps / BPR epochs. learning_rate: BPR step size. seed: random_state.
    """

    model: Literal["als", "bpr"] = "als"
    factors: int = 64
    regularization: float = 0.05
    alpha: float = 10.0
    iterations: int = 15
    learning_rate: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in ("als", "bpr"):
            raise ConfigError(f"cf.model must be 'als' or 'bpr', got {self.model!r}")
        if self.factors < 1 or self.iterations < 1:
            raise ConfigError(f"cf.factors and cf.iterations must be >= 1, got {self.factors}, {self.iterations}")
        if self.regularization < 0 or self.alpha <= 0 or self.learning_rate <= 0:
            raise ConfigError("cf.regularization must be >= 0, cf.alpha and cf.learning_rate > 0")


# The ALS settings ``Recommender.build`` chooses among on its own validation slice, and the
# offline evaluation tunes its ALS baseline over: one grid, so both search the same space.
ALS_GRID: tuple[dict[str, float | int], ...] = tuple(
    {"factors": f, "regularization": r, "alpha": a, "iterations": 15}
    for f in (32, 64)
    for r, a in ((5.0, 2.0), (20.0, 2.0), (50.0, 5.0))
)


def interactions_to_csr(
    interactions: pl.DataFrame,
    *,
    user_ids: Sequence[str] | None = None,
    song_ids: Sequence[str] | None = None,
) -> tuple[sp.csr_matrix, list[str], list[str]]:
    """Sum ``weight`` per (user, song) into a users × songs float32 CSR matrix.

    Id maps default to the sorted unique ids of the table. Rows naming ids outside given maps
    are an error (callers filter and report them first).
    """
    for col in ("user_id", "song_id"):
        if col not in interactions.columns:
            raise SchemaError(f"interactions table: required column {col!r} is missing")
    w = interactions["weight"] if "weight" in interactions.columns else pl.Series([1.0] * interactions.height)
    df = pl.DataFrame({"u": interactions["user_id"], "s": interactions["song_id"], "w": w.cast(pl.Float64)})
    users = sorted(df["u"].unique().to_list()) if user_ids is None else list(user_ids)
    songs = sorted(df["s"].unique().to_list()) if song_ids is None else list(song_ids)
    umap = pl.DataFrame({"u": users, "ui": np.arange(len(users), dtype=np.int64)})
    smap = pl.DataFrame({"s": songs, "si": np.arange(len(songs), dtype=np.int64)})
    j = df.join(umap, on="u", how="left").join(smap, on="s", how="left")
    bad = j.filter(pl.col("ui").is_null() | pl.col("si").is_null())
    if bad.height:
        raise UnknownIdError(
            f"interaction (user_id {bad['u'][0]!r}, song_id {bad['s'][0]!r}) is outside the id maps ({bad.height} rows)"
        )
    agg = j.group_by(["ui", "si"]).agg(pl.col("w").sum())
    M = sp.csr_matrix(
        (agg["w"].to_numpy().astype(np.float32), (agg["ui"].to_numpy(), agg["si"].to_numpy())),
        shape=(len(users), len(songs)),
        dtype=np.float32,
    )
    M.sum_duplicates()
    M.sort_indices()
    return M, users, songs


def _als_half_step(
    fixed: np.ndarray,
    idx: np.ndarray,
    weights: np.ndarray,
    *,
    alpha: float,
    regularization: float,
    gram: np.ndarray | None,
) -> np.ndarray:
    """One side of an ALS sweep for one row: argmin_x Σ_j c_j (p_j − x·y_j)² + λ‖x‖² over every
    row y_j of ``fixed`` (p_j = 1, c_j = alpha·w_j for the rows in ``idx``; p_j = 0, c_j = 1 for
    the others), as implicit's CPU solver computes it: (YᵀY + λI + Y_hᵀ (C_h − I) Y_h) x = Y_hᵀ C_h 1.

    ``gram`` is YᵀY (computed when None). Returns a float32 (f,) vector; empty ``idx``: zeros.
    """
    Y = fixed.astype(np.float64, copy=False)
    f = Y.shape[1]
    if len(idx) == 0:
        return np.zeros(f, dtype=np.float32)
    G = Y.T @ Y if gram is None else gram
    Yh = Y[idx]
    c = alpha * np.asarray(weights, dtype=np.float64)
    A = G + regularization * np.eye(f) + (Yh * (c - 1.0)[:, None]).T @ Yh
    b = (Yh * c[:, None]).sum(axis=0)
    return np.linalg.solve(A, b).astype(np.float32)


def solve_user_factor(
    item_factors: np.ndarray,
    item_idx: np.ndarray,
    weights: np.ndarray,
    *,
    alpha: float,
    regularization: float,
    gram: np.ndarray | None = None,
) -> np.ndarray:
    """The ALS user step: argmin_u Σ_i c_i (p_i − u·v_i)² + λ‖u‖² with c = alpha·w on the history.

    ``item_factors`` (n_items, f), ``item_idx`` the history's rows in it (each once),
    ``weights`` their summed weights, ``gram`` VᵀV when the caller keeps it. Offline fold-in
    (:meth:`CFModel.factor_from_history`) and the online warm-up of a new user both call it.
    Returns a float32 (f,) vector; an empty history gives zeros.
    """
    return _als_half_step(item_factors, item_idx, weights, alpha=alpha, regularization=regularization, gram=gram)


def solve_item_factor(
    user_factors: np.ndarray,
    user_idx: np.ndarray,
    weights: np.ndarray,
    *,
    alpha: float,
    regularization: float,
    gram: np.ndarray | None = None,
) -> np.ndarray:
    """The ALS item step, the mirror of :func:`solve_user_factor`: a song's factor from its
    listeners, argmin_v Σ_u c_u (p_u − u·v)² + λ‖v‖² with c = alpha·w on the listeners.

    ``user_factors`` (n_users, f) the users the step runs over, ``user_idx`` the song's
    listeners among them (each once), ``weights`` their summed weights, ``gram`` UᵀU over all
    of ``user_factors`` (or a caller's larger user set; see :mod:`~.online.warmup`). The online
    warm-up of a new song calls it. Returns a float32 (f,) vector; no listeners gives zeros.
    """
    return _als_half_step(user_factors, user_idx, weights, alpha=alpha, regularization=regularization, gram=gram)


class CFModel:
    """Implicit-feedback CF (ALS or BPR) over string ids (see module doc)."""

    def __init__(self, config: CFConfig | None = None) -> None:
        self.config = config or CFConfig()
        self.user_ids: list[str] = []
        self.song_ids: list[str] = []
        self.user_factors = np.zeros((0, 0), dtype=np.float32)
        self.item_factors = np.zeros((0, 0), dtype=np.float32)
        self.user_items = sp.csr_matrix((0, 0), dtype=np.float32)
        self._upos: dict[str, int] = {}
        self._spos: dict[str, int] = {}
        self._gram: np.ndarray | None = None
        self.fit_seconds = 0.0

    @property
    def fitted(self) -> bool:
        return self.item_factors.shape[0] > 0

    def _check(self) -> None:
        if not self.fitted:
            raise NotFittedError("CFModel is not fitted; call fit() or load()")

    # ------------------------------------------------------------------ fitting
    def fit(self, interactions: pl.DataFrame, *, show_progress: bool = False) -> CFModel:
        """Fit on an interactions table (user_id, song_id, weight); returns self."""
        import time

        M, users, songs = interactions_to_csr(interactions)
        if M.nnz == 0:
            raise SchemaError("interactions table has no rows to fit CF on")
        cfg = self.config
        t0 = time.perf_counter()
        import implicit.cpu.als  # noqa: F401  load implicit's BLAS before limiting the pools
        import implicit.cpu.bpr  # noqa: F401

        with blas_single_threaded():  # implicit checks the BLAS pool when the model is constructed
            model = make_implicit_model(cfg)
            model.fit(M, show_progress=show_progress)
        self.fit_seconds = time.perf_counter() - t0
        self._set(users, songs, np.asarray(model.user_factors), np.asarray(model.item_factors), M)
        log.info(
            "%s fitted: %d users x %d songs, %d nnz, %.2fs", cfg.model, len(users), len(songs), M.nnz, self.fit_seconds
        )
        return self

    def _set(self, users: list[str], songs: list[str], U: np.ndarray, V: np.ndarray, M: sp.csr_matrix) -> None:
        self.user_ids, self.song_ids = list(users), list(songs)
        self.user_factors = np.ascontiguousarray(U, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(V, dtype=np.float32)
        self.user_items = M.tocsr().astype(np.float32)
        self._upos = {u: i for i, u in enumerate(self.user_ids)}
        self._spos = {s: i for i, s in enumerate(self.song_ids)}
        self._gram = self.item_factors.astype(np.float64).T @ self.item_factors.astype(np.float64)

    @property
    def step_alpha(self) -> float:
        """The confidence scale of the ALS steps run on this model's factors (fold-in, warm-up):
        ``config.alpha`` for ALS, 1 for BPR (whose factors the steps only approximate)."""
        return self.config.alpha if self.config.model == "als" else 1.0

    # ------------------------------------------------------------------ lookups
    def has_user(self, user_id: str) -> bool:
        return user_id in self._upos

    def song_index(self, song_ids: Sequence[str]) -> np.ndarray:
        """Dense item index per song id, -1 for songs outside the model (cold)."""
        return np.asarray([self._spos.get(s, -1) for s in song_ids], dtype=np.int64)

    def user_factor(self, user_id: str) -> np.ndarray:
        """The fitted factor (f,) of a user seen at fit time."""
        self._check()
        i = self._upos.get(user_id)
        if i is None:
            raise UnknownIdError(f"user_id {user_id!r} was not seen when the CF model was fitted")
        return self.user_factors[i].copy()

    def factor_from_history(self, song_ids: Sequence[str], weights: Sequence[float] | None = None) -> np.ndarray | None:
        """A user factor from a history (songs outside the model are ignored); None if none is known."""
        self._check()
        idx = self.song_index(song_ids)
        w = np.ones(len(idx)) if weights is None else np.asarray(weights, dtype=np.float64)
        keep = idx >= 0
        if not keep.any():
            return None
        # sum weights per song, as the CSR used at fit time does
        uniq, inv = np.unique(idx[keep], return_inverse=True)
        wsum = np.bincount(inv, weights=w[keep])
        return solve_user_factor(
            self.item_factors,
            uniq,
            wsum,
            alpha=self.step_alpha,
            regularization=self.config.regularization,
            gram=self._gram,
        )

    # ------------------------------------------------------------------ scoring
    def score(self, user_id: str, song_ids: Sequence[str]) -> np.ndarray:
        """u·v for each song (float32, NaN for songs outside the model)."""
        u = self.user_factor(user_id)
        idx = self.song_index(song_ids)
        out = np.full(len(idx), np.nan, dtype=np.float32)
        ok = idx >= 0
        out[ok] = (self.item_factors[idx[ok]] * u[None, :]).sum(axis=1)
        return out

    def recommend(self, user_id: str, k: int = 20, *, filter_history: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k songs for a fitted user: ``(ids (k,) object, scores (k,) float32)``, padded ``""``/-inf."""
        hits, D = self.recommend_batch([user_id], k, filter_history=filter_history)
        return hits[0], D[0]

    def recommend_batch(
        self, user_ids: Sequence[str], k: int = 20, *, filter_history: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for each user: ``(ids (n, k) object, scores (n, k) float32)``; unknown users raise."""
        self._check()
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        rows = []
        for u in user_ids:
            if u not in self._upos:
                raise UnknownIdError(f"user_id {u!r} was not seen when the CF model was fitted")
            rows.append(self._upos[u])
        U = self.user_factors[np.asarray(rows, dtype=np.int64)]
        hist = self.user_items[rows] if filter_history else None
        return top_k_by_factors(U, self.item_factors, self.song_ids, k, exclude=hist)

    # ------------------------------------------------------------------ persistence
    FACTOR_ARRAYS = ("user_factors", "item_factors")

    def save(self, path: str | Path, *, factors_apart: bool = False) -> Path:
        """Write one ``.npz`` (allow_pickle=False) holding factors, id maps, CSR and config;
        returns its path.

        ``factors_apart``: the user and item factors go to plain ``.npy`` files beside it
        (:func:`~apex_rank.npfiles.save_arrays`), which :meth:`load` can memory-map."""
        self._check()
        M = self.user_items
        arrays = {
            "user_ids": np.asarray(self.user_ids, dtype=str),
            "song_ids": np.asarray(self.song_ids, dtype=str),
            "user_factors": self.user_factors,
            "item_factors": self.item_factors,
            "indptr": M.indptr,
            "indices": M.indices,
            "data": M.data,
            "config": np.asarray(json.dumps(to_dict(self.config))),
        }
        return save_arrays(path, arrays, apart=self.FACTOR_ARRAYS if factors_apart else ())[0]

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = False) -> CFModel:
        """Read a model written by :meth:`save`; factors saved apart are memory-mapped
        copy-on-write when ``mmap`` (pages shared between processes until one writes)."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"CF model file {path} is missing")
        z = read_arrays(path, apart=cls.FACTOR_ARRAYS, mmap=mmap)
        try:
            cfg = from_dict(CFConfig, json.loads(str(z["config"])))
            users = z["user_ids"].tolist()
            songs = z["song_ids"].tolist()
            M = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=(len(users), len(songs)))
            obj = cls(cfg)
            obj._set(users, songs, z["user_factors"], z["item_factors"], M)
        except (KeyError, ValueError) as err:
            raise ArtifactError(f"CF model file {path} cannot be read: {err}") from err
        return obj


def make_implicit_model(cfg: CFConfig):
    """The bare implicit CPU model for ``cfg`` (also used by the benchmark's baseline fit)."""
    if cfg.model == "als":
        from implicit.cpu.als import AlternatingLeastSquares

        return AlternatingLeastSquares(
            factors=cfg.factors,
            regularization=cfg.regularization,
            alpha=cfg.alpha,
            iterations=cfg.iterations,
            random_state=cfg.seed,
            num_threads=thread_count(),
        )
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    return BayesianPersonalizedRanking(
        factors=cfg.factors,
        learning_rate=cfg.learning_rate,
        regularization=cfg.regularization,
        iterations=cfg.iterations,
        random_state=cfg.seed,
        num_threads=thread_count(),
    )


# Scores are computed in blocks of rows × (ITEM_BLOCK_SCORES / rows) items (2 MB of float32, in
# a core's cache) and searched while they are hot; the (rows, n_items) matrix is never held, so
# memory stays bounded at any catalogue size. Blocks of 16 MB made a 1000-user batch over 100k
# songs 1.3x slower, and equal at 10k songs (bench.batch, 2 loaded cores).
ITEM_BLOCK_SCORES = 1 << 19
# A row's candidate threshold is the SAMPLE_RANK-th best of a strided sample of its scores, the
# stride chosen so that about max(SAMPLE_OVERSHOOT × k, SAMPLE_MIN_TARGET) scores pass it.
SAMPLE_OVERSHOOT = 4
SAMPLE_MIN_TARGET = 256
SAMPLE_RANK = 8
SAMPLE_BUDGET = 1 << 24  # sampled scores held per pass (rows × sample columns)


def exact_scores(U: np.ndarray, V: np.ndarray, part: np.ndarray, block: int = 1 << 18) -> np.ndarray:
    """float64 ``U[r]·V[part[r, j]]`` for every (r, j): an elementwise product summed along the
    factor axis, the same arithmetic for a row whatever the batch (rows in blocks of about
    ``block`` products, so the (rows, m, f) float64 intermediates, 2 MB each, stay in cache:
    blocks of 2M products took twice as long)."""
    m, f = part.shape[1], V.shape[1]
    step = max(1, block // max(1, m * f))
    out = np.empty(part.shape, dtype=np.float64)
    for lo in range(0, part.shape[0], step):
        u = U[lo : lo + step, None, :].astype(np.float64)
        out[lo : lo + step] = (u * V[part[lo : lo + step]].astype(np.float64)).sum(axis=2)
    return out


def _round_down(x: np.ndarray) -> np.ndarray:
    """float64 thresholds as float32, rounded towards -inf (a float32 compare then keeps every
    score at or above the float64 value)."""
    out = x.astype(np.float32)
    return np.where(out > x, np.nextafter(out, np.float32(-np.inf)), out)


def _row_positions(rows: np.ndarray, b: int) -> np.ndarray:
    """Position of each cell within its row, for cells sorted by row."""
    counts = np.bincount(rows, minlength=b)
    return np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)


def _padded(
    rows: np.ndarray, pos: np.ndarray, cols: np.ndarray, vals: np.ndarray, b: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cells ``(row, position in row)`` as ``(items (b, w) int64, scores (b, w) float32)``,
    padded with item 0 / -inf."""
    w = max(1, int(pos.max(initial=-1)) + 1)
    H = np.zeros((b, w), dtype=np.int64)
    P = np.full((b, w), -np.inf, dtype=np.float32)
    H[rows, pos] = cols
    P[rows, pos] = vals
    return H, P


def _candidates(
    U: np.ndarray, V: np.ndarray, kk: int, tol: np.ndarray, excluded: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's candidates: every non-excluded item whose float32 score is within ``tol[r]``
    of the row's kk-th best, and a few more.

    A row's threshold t is the ``SAMPLE_RANK``-th best of a strided sample of its scores; the
    items kept are those scoring ≥ t − tol, found block by block of items (one BLAS product
    per block, searched while it is in cache). When at least kk kept items score ≥ t, the kk-th
    best is ≥ t, so every item within tol of it is kept. A row where that fails (an unlucky
    sample, or most items excluded) is flagged for :func:`_row_candidates`. One compare per
    score replaces a full selection per row (``np.argpartition`` over 100k scores costs several
    times the matrix product).

    ``excluded`` holds flat cells ``row · n_items + item``. Returns ``(items (b, w), float32
    scores (b, w) with -inf padding, ok (b,) bool)``.
    """
    b, N = U.shape[0], V.shape[0]
    target = max(SAMPLE_OVERSHOOT * kk, SAMPLE_MIN_TARGET)
    step = max(1, target // SAMPLE_RANK)
    jb = max(256, ITEM_BLOCK_SCORES // b)
    er, ec = np.divmod(excluded, N)
    order = np.argsort(ec, kind="stable")
    er, ec = er[order], ec[order]
    bounds = np.searchsorted(ec, np.arange(0, N + jb, jb))  # excluded cells of each item block
    sample = U @ V[::step].T
    on = ec % step == 0
    sample[er[on], ec[on] // step] = -np.inf
    ns = sample.shape[1]
    q = min(ns, max(SAMPLE_RANK, -(-target // step)))
    t = np.partition(sample, ns - q, axis=1)[:, ns - q]
    lo = _round_down(np.where(np.isfinite(t), t - tol, np.inf))[:, None]
    filled = np.zeros(b, dtype=np.int64)  # candidates per row so far
    rows, pos, cols, vals = [], [], [], []
    for blk, j0 in enumerate(range(0, N, jb)):
        S = U @ V[j0 : j0 + jb].T
        x, y = bounds[blk], bounds[blk + 1]
        S[er[x:y], ec[x:y] - j0] = -np.inf
        flat = np.flatnonzero(S >= lo)  # row-major: sorted by row
        r = flat // S.shape[1]
        rows.append(r)
        pos.append(filled[r] + _row_positions(r, b))
        filled += np.bincount(r, minlength=b)
        cols.append(flat - r * S.shape[1] + j0)
        vals.append(S.ravel()[flat])
    r, v = np.concatenate(rows), np.concatenate(vals)
    ok = np.bincount(r, weights=v >= t[r], minlength=b) >= kk
    H, P = _padded(r, np.concatenate(pos), np.concatenate(cols), v, b)
    return H, P, ok


def _row_candidates(
    u: np.ndarray, V: np.ndarray, kk: int, tol: float, excluded: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One row's candidates by a full selection over all its scores (the fallback of
    :func:`_candidates`): ``(items, float32 scores)``."""
    s = V @ u
    s[excluded] = -np.inf
    kth = np.partition(s, len(s) - kk)[len(s) - kk]  # -inf when fewer than kk items are left
    cut = _round_down(np.asarray([kth - tol]))[0] if np.isfinite(kth) else -np.inf
    c = np.flatnonzero((s >= cut) & (s > -np.inf))
    return c, s[c]


def _finish(
    U: np.ndarray, V: np.ndarray, H: np.ndarray, P: np.ndarray, kk: int, tol: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-kk of each row among its candidates (items H, float32 scores P, -inf: none): the
    candidates within tol of the row's kk-th best, rescored in float64, ties by item index.
    Returns ``(items (b, m), float32 scores (b, m))``, m <= kk, -inf where fewer exist."""
    b, w = P.shape
    kth = np.full(b, -np.inf, np.float32) if w < kk else -np.partition(-P, kk - 1, axis=1)[:, kk - 1]
    rr, cc = np.nonzero(np.isfinite(P) & (P >= (kth - tol)[:, None]))
    part, kept = _padded(rr, _row_positions(rr, b), H[rr, cc], P[rr, cc], b)  # kept: -inf pads
    ps = np.where(np.isfinite(kept), exact_scores(U, V, part), -np.inf)
    order = np.lexsort((part, -ps), axis=1)[:, :kk]
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(ps, order, axis=1).astype(np.float32)


def top_k_by_factors(
    U: np.ndarray,
    V: np.ndarray,
    item_ids: Sequence[str] | np.ndarray,
    k: int,
    *,
    exclude: sp.csr_matrix | None = None,
    chunk: int = 1024,
    lookup: np.ndarray | None = None,
    max_norm: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of U·Vᵀ per row, with a CSR mask of excluded items; ``""``/-inf padding.

    :func:`top_k_items` with the item indices turned into ids. ``lookup``, when given, is
    ``item_ids + [""]`` as an object array: kept by a caller that searches often, so that no
    per-call pass over the ids is made.

    Returns ``(ids (n, k) object, scores (n, k) float32)`` sorted by descending score, ties by item
    index (deterministic).
    """
    if lookup is None:
        lookup = np.asarray(list(item_ids) + [""], dtype=object)
    items, scores = top_k_items(U, V, k, exclude=exclude, chunk=chunk, max_norm=max_norm)
    return lookup[np.where(items >= 0, items, len(lookup) - 1)], scores


def top_k_items(
    U: np.ndarray,
    V: np.ndarray,
    k: int,
    *,
    exclude: sp.csr_matrix | None = None,
    chunk: int = 1024,
    max_norm: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of U·Vᵀ per row as item indices, with a CSR mask of excluded items.

    ``chunk`` bounds the rows searched together. ``max_norm``, when given, is the largest row
    norm of V (kept by a caller that searches often, so that no per-call pass over V is made).

    How: float32 scores through BLAS matrix products, whatever the batch size (FAISS's exact
    k-NN switches to BLAS only from ``faiss.cvar.distance_compute_blas_threshold`` queries,
    128000 in faiss 1.15, and below that scans V once per query), block by block of items,
    keeping each row's candidates (:func:`_candidates`). The candidates are rescored in float64
    and ranked on that, ties by item index. float32 scores depend on the kernel (one row and
    many rows are summed in different orders, a bit apart), so a row's candidates are every
    non-excluded item whose float32 score is within the float32 error bound of the k-th best.
    So a row's answer is the exact one, whatever batch it is in, also when a block of tied
    items (equal factors) straddles the k-th place. Nothing process-global (such as FAISS's
    threshold) is changed.

    Returns ``(items (n, k) int64, scores (n, k) float32)`` sorted by descending score, ties by
    item index; ``-1`` / ``-inf`` padding where fewer than k items remain.
    """
    n = U.shape[0]
    n_items = V.shape[0]
    items = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0 or n_items == 0:
        return items, scores
    kk = min(k, n_items)
    Vc = np.ascontiguousarray(V, dtype=np.float32)
    # |float32 dot - exact| <= f * 2^-24 * |u| * |v| (+ rounding of the sum): 4x that as the bound
    if max_norm is None:
        max_norm = float(np.linalg.norm(Vc, axis=1).max())
    err = 4.0 * Vc.shape[1] * 2.0**-24 * max_norm * 1.001
    step = max(1, max(SAMPLE_OVERSHOOT * kk, SAMPLE_MIN_TARGET) // SAMPLE_RANK)
    rows_per_pass = max(1, min(chunk, SAMPLE_BUDGET // -(-n_items // step)))

    def write(at: np.ndarray, top: np.ndarray, ts: np.ndarray) -> None:
        ok = np.isfinite(ts)
        scores[at, : ts.shape[1]] = np.where(ok, ts, -np.inf)
        items[at, : ts.shape[1]] = np.where(ok, top, -1)

    for start in range(0, n, rows_per_pass):
        Uc = np.ascontiguousarray(U[start : start + rows_per_pass], dtype=np.float32)
        b = Uc.shape[0]
        if exclude is not None:
            sub = exclude if start == 0 and n <= rows_per_pass else exclude[start : start + b]  # no copy for one pass
            excluded = np.repeat(np.arange(b, dtype=np.int64), np.diff(sub.indptr)) * n_items + sub.indices
        else:
            sub, excluded = None, np.zeros(0, np.int64)
        tol = err * np.linalg.norm(Uc.astype(np.float64), axis=1)
        H, P, ok = _candidates(Uc, Vc, kk, tol, excluded)
        write(start + np.arange(b), *_finish(Uc, Vc, H, P, kk, tol))
        redo = np.flatnonzero(~ok)
        if len(redo):
            found = [
                _row_candidates(Uc[i], Vc, kk, float(tol[i]),
                                sub.indices[sub.indptr[i] : sub.indptr[i + 1]] if sub is not None else excluded)
                for i in redo
            ]
            r = np.repeat(np.arange(len(redo)), [len(c) for c, _ in found])
            Hr, Pr = _padded(r, _row_positions(r, len(redo)), np.concatenate([c for c, _ in found]),
                             np.concatenate([v for _, v in found]), len(redo))
            items[start + redo], scores[start + redo] = -1, -np.inf
            write(start + redo, *_finish(Uc[redo], Vc, Hr, Pr, kk, tol[redo]))
    return items, scores
