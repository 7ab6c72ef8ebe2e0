"""The models an evaluation compares, behind one contract: :class:`Ranker`.

A ranker is fitted on an :class:`EvalContext` (training interactions only) and returns, for a
batch of users, their top-k item indices over the full catalogue with each user's training
history excluded (``-1`` pads when fewer than k items can be ranked). ``allowed`` restricts the
ranking to a subset of items (the ``cold_only`` slice).

Score-based baselines (:class:`ScoreRanker` subclasses) define ``score(users) -> (n, n_items)``:

- ``popularity``: ``s(u, i) = c_i``, the number of training users of item i (cold items: 0).
- ``content``: ``s(u, i) = cos(p_u, e_i)`` with ``p_u = Σ_{j ∈ H_u} e_j / |H_u|`` the mean of the
  L2-normalised content embeddings of the user's training history ``H_u``.
- ``apex_prior``: ``s(u, i) = mean_t z_t(i)`` over the APEX tasks the predictor was trained
  for, ``z_t`` the prediction for task t standardised over the catalogue (not personalised).
- ``als`` / ``bpr``: ``s(u, i) = x_u · y_i`` from the ranking package's implicit CF wrapper;
  items without factors (cold) get ``-inf`` (CF cannot rank them).

``hybrid`` is the full :class:`~apex_rank.ranking.recommender.Recommender`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from apex_rank.errors import ConfigError, SchemaError
from apex_rank.offline_eval.metrics import top_k_from_scores
from apex_rank.ranking.cf import ALS_GRID as CF_ALS_GRID
from apex_rank.schemas import embedding_matrix

log = logging.getLogger(__name__)

MODELS = ("popularity", "als", "bpr", "content", "apex_prior", "hybrid")


@dataclass
class EvalContext:
    """Everything a ranker may fit on: the catalogue and the *training* interactions only.

    Attributes
    ----------
    item_ids: catalogue song ids; item index = position.
    user_ids: ids of users with training interactions; user index = position.
    train: (n_users, n_items) CSR of training interaction weights (1 per pair).
    X: (n_items, d) float32 L2-normalised content embeddings.
    is_cold: (n_items,) bool, cold items (never in ``train``).
    songs, embeddings, train_df: the tables, for rankers that take tables (hybrid).
    priors: (n_items, 7) APEX predictions (NaN columns for untrained tasks) or None.
    seed: seed for models with randomness.
    request_s: when the test's lists are asked for (epoch seconds): the cut of a global time
        split; None where each user's test follows their own history (random, item-cold).
    """

    item_ids: list[str]
    user_ids: list[str]
    train: sp.csr_matrix
    X: np.ndarray
    is_cold: np.ndarray
    songs: pl.DataFrame
    embeddings: pl.DataFrame
    train_df: pl.DataFrame
    priors: np.ndarray | None = None
    apex: Any = None
    seed: int = 42
    request_s: float | None = None

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_counts(self) -> np.ndarray:
        """(n_items,) number of training users per item."""
        return np.asarray((self.train > 0).sum(axis=0)).ravel().astype(np.float64)


def build_context(
    songs: pl.DataFrame,
    embeddings: pl.DataFrame,
    train_df: pl.DataFrame,
    cold_items: frozenset[str] | set[str],
    *,
    seed: int = 42,
) -> EvalContext:
    """Index the catalogue (songs table order) and the training users; build the CSR."""
    item_ids = songs["song_id"].to_list()
    pos = {s: i for i, s in enumerate(item_ids)}
    emb_ids, X = embedding_matrix(embeddings)
    epos = {s: i for i, s in enumerate(emb_ids)}
    missing = [s for s in item_ids if s not in epos]
    if missing:
        raise SchemaError(f"{len(missing)} catalogue song(s) have no embedding, e.g. {missing[0]!r}")
    X = X[[epos[s] for s in item_ids]].astype(np.float32)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    leak = train_df.filter(pl.col("song_id").is_in(list(cold_items)))
    if leak.height:
        raise SchemaError(f"cold song {leak['song_id'][0]!r} appears in the training interactions")
    user_ids = sorted(train_df["user_id"].unique().to_list())
    upos = {u: i for i, u in enumerate(user_ids)}
    unknown = [s for s in train_df["song_id"].unique().to_list() if s not in pos]
    if unknown:
        raise SchemaError(f"training interactions mention song_id {unknown[0]!r}, absent from the songs table")
    rows = np.fromiter((upos[u] for u in train_df["user_id"].to_list()), dtype=np.int64, count=train_df.height)
    cols = np.fromiter((pos[s] for s in train_df["song_id"].to_list()), dtype=np.int64, count=train_df.height)
    M = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(len(user_ids), len(item_ids)))
    M.data[:] = 1.0  # duplicates collapse to one positive
    M.sum_duplicates()
    M.data[:] = 1.0
    is_cold = np.zeros(len(item_ids), dtype=bool)
    for s in cold_items:
        if s in pos:
            is_cold[pos[s]] = True
    return EvalContext(item_ids, user_ids, M, np.ascontiguousarray(X), is_cold, songs, embeddings, train_df, seed=seed)


class Ranker:
    """Contract of every evaluated model. Subclasses set ``name`` and implement ``fit``/``rank``."""

    name = "ranker"

    def fit(self, ctx: EvalContext) -> Ranker:
        raise NotImplementedError

    def rank(self, users: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> np.ndarray:
        """(len(users), k) int64 item indices, best first, history excluded, ``-1`` padded."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Hyper-parameters, for the report."""
        return {}


class ScoreRanker(Ranker):
    """A ranker defined by a dense score matrix; history items get ``-inf``.

    Equal scores are ordered by a permutation of the catalogue seeded with ``ctx.seed``, never by
    the catalogue order itself (which may correlate with popularity).
    """

    ctx: EvalContext
    _tiebreak: np.ndarray | None = None

    def tiebreak(self) -> np.ndarray:
        if self._tiebreak is None or self._tiebreak.size != self.ctx.n_items:
            self._tiebreak = np.random.default_rng(self.ctx.seed).permutation(self.ctx.n_items)
        return self._tiebreak

    def score(self, users: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def rank(self, users: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> np.ndarray:
        out = []
        for start in range(0, len(users), 1024):
            ub = np.asarray(users[start : start + 1024], dtype=np.int64)
            S = np.asarray(self.score(ub), dtype=np.float64)
            hist = self.ctx.train[ub]
            r, c = hist.nonzero()
            S[r, c] = -np.inf
            out.append(top_k_from_scores(S, k, allowed=allowed, tiebreak=self.tiebreak()))
        return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


class PopularityRanker(ScoreRanker):
    name = "popularity"

    def fit(self, ctx: EvalContext) -> PopularityRanker:
        self.ctx = ctx
        self.counts = ctx.user_counts()
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return np.tile(self.counts, (len(users), 1))


class ContentRanker(ScoreRanker):
    name = "content"

    def fit(self, ctx: EvalContext) -> ContentRanker:
        self.ctx = ctx
        hist = ctx.train.astype(np.float64)
        n = np.asarray(hist.sum(axis=1)).ravel()
        prof = np.asarray(hist @ ctx.X.astype(np.float64)) / np.maximum(n, 1.0)[:, None]
        self.profiles = prof / np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return self.profiles[users] @ self.ctx.X.T.astype(np.float64)


class ApexPriorRanker(ScoreRanker):
    name = "apex_prior"

    def fit(self, ctx: EvalContext) -> ApexPriorRanker:
        if ctx.priors is None:
            raise ConfigError("apex_prior needs APEX predictions (train or pass an APEX predictor)")
        self.ctx = ctx
        P = np.asarray(ctx.priors, dtype=np.float64)
        keep = np.isfinite(P).all(axis=0)
        Z = P[:, keep]
        Z = (Z - Z.mean(axis=0)) / np.maximum(Z.std(axis=0), 1e-12)
        self.prior = Z.mean(axis=1)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return np.tile(self.prior, (len(users), 1))


def model_names(names: Sequence[str] | None) -> tuple[str, ...]:
    """Validate model names (default: all of :data:`MODELS`)."""
    if not names:
        return MODELS
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise ConfigError(f"unknown model {bad[0]!r}; valid models: {', '.join(MODELS)}")
    return tuple(names)


class CFRanker(ScoreRanker):
    """ALS or BPR through the ranking package's :class:`~apex_rank.ranking.cf.CFModel`."""

    def __init__(self, kind: str, params: dict[str, Any]) -> None:
        self.name = kind
        self._params = dict(params)

    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def fit(self, ctx: EvalContext) -> CFRanker:
        from apex_rank.config import from_dict
        from apex_rank.ranking.cf import CFConfig, CFModel

        self.ctx = ctx
        cfg = from_dict(CFConfig, {"model": self.name, "seed": ctx.seed, **self._params})
        self.cf = CFModel(cfg).fit(ctx.train_df.select("user_id", "song_id", pl.lit(1.0).alias("weight")).unique(
            subset=["user_id", "song_id"]))
        upos = {u: i for i, u in enumerate(self.cf.user_ids)}
        self._urow = np.asarray([upos.get(u, -1) for u in ctx.user_ids], dtype=np.int64)
        self._icol = self.cf.song_index(ctx.item_ids)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        rows = self._urow[users]
        S = np.full((len(users), self.ctx.n_items), -np.inf)
        ok_i = self._icol >= 0
        U = self.cf.user_factors[np.maximum(rows, 0)].astype(np.float64)
        S[:, ok_i] = U @ self.cf.item_factors[self._icol[ok_i]].T.astype(np.float64)
        S[rows < 0] = -np.inf
        return S


class HybridRanker(Ranker):
    """The full :class:`~apex_rank.ranking.recommender.Recommender` (candidates + LightGBM).

    Built with ``Recommender.build`` on the songs that have training interactions, their
    embeddings, the *training* interactions and the APEX predictor trained on training songs;
    every other catalogue song (the cold ones) is then published with ``add_songs``, the way new
    songs reach a built recommender in production. So cold songs are absent from everything
    the hybrid fits on, including its reranker's training groups (where, as never-interacted
    candidates, they would only ever be negatives). Top-k lists come from ``recommend_states``
    over the full catalogue; the ``cold_only`` slice passes every warm song as an exclusion, so
    the reranker orders the cold candidates among themselves (``-1`` padding when the candidate
    sources hold fewer than k cold songs).
    """

    name = "hybrid"
    #: evaluation-side keys (not RecommenderConfig fields): ``drop_ts`` builds on interactions
    #: without ``ts``; ``cold_share`` is passed to every ranking (exposure control).
    EVAL_KEYS = ("drop_ts", "cold_share")

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = dict(params)

    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def fit(self, ctx: EvalContext) -> HybridRanker:
        from apex_rank.config import from_dict
        from apex_rank.ranking.recommender import Recommender, RecommenderConfig

        self.ctx = ctx
        rc = {k: v for k, v in self._params.items() if k not in self.EVAL_KEYS}
        cfg = from_dict(RecommenderConfig, rc) if rc else None
        train = ctx.train_df.select("user_id", "song_id", "weight", *(["ts"] if "ts" in ctx.train_df.columns else []))
        if self._params.get("drop_ts") and "ts" in train.columns:
            train = train.drop("ts")
        in_train = np.asarray(ctx.train.sum(axis=0)).ravel() > 0
        warm_ids = [s for s, w in zip(ctx.item_ids, in_train, strict=True) if w]
        new_ids = [s for s, w in zip(ctx.item_ids, in_train, strict=True) if not w]
        songs_warm = ctx.songs.filter(pl.col("song_id").is_in(warm_ids))
        emb_warm = ctx.embeddings.filter(pl.col("song_id").is_in(warm_ids))
        self.rec = Recommender.build(songs_warm, emb_warm, train, config=cfg, apex=ctx.apex)
        if new_ids:
            self.rec.add_songs(ctx.embeddings.filter(pl.col("song_id").is_in(new_ids)),
                               ctx.songs.filter(pl.col("song_id").is_in(new_ids)))
        self._ipos = {s: i for i, s in enumerate(ctx.item_ids)}
        self._warm_ids = set(warm_ids)
        return self

    def rank(self, users: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> np.ndarray:
        uid = [self.ctx.user_ids[int(u)] for u in users]
        excl: set[str] = set()
        if allowed is not None:
            excl = {s for s, a in zip(self.ctx.item_ids, allowed, strict=True) if not a}
        states = [self.rec.user_state(u) for u in uid]
        df = self.rec.recommend_states(states, k, excludes=[excl] * len(states),
                                       cold_share=self._params.get("cold_share"), at=self.ctx.request_s)
        out = np.full((len(users), k), -1, dtype=np.int64)
        if df.height == 0:
            return out
        row = {u: r for r, u in enumerate(uid)}
        df = df.sort(["user_id", "rank"])
        for (u,), g in df.group_by(["user_id"], maintain_order=True):
            r = row[str(u)]
            items = np.asarray([self._ipos[s] for s in g["song_id"].to_list()], dtype=np.int64)
            items = items[~np.isin(items, self.ctx.train[int(users[r])].indices)]
            if allowed is not None:
                items = items[allowed[items]]
            out[r, : min(k, items.size)] = items[:k]
        return out


# Small grids tuned on the validation split (NDCG@10). Keys are the CF wrapper's parameters.
ALS_GRID: tuple[dict[str, Any], ...] = CF_ALS_GRID  # the grid the Recommender's build searches too
# implicit's BPR peaks early and then degrades as its SGD runs on (MovieLens-100K validation
# NDCG@10: 0.22 at lr 0.001 x 300 epochs, 0.13 at lr 0.005 x 300): small learning rates, a few
# hundred epochs. Tuned on validation this gives 0.37-0.38 on the random split's test (the old
# grid, lr 0.01, gave 0.32); the published 0.442 (Cornac's BPR) is not reached.
BPR_GRID: tuple[dict[str, Any], ...] = tuple(
    {"factors": f, "learning_rate": lr, "regularization": 0.01, "iterations": it}
    for f in (64, 128) for lr, it in ((0.001, 300), (0.001, 600), (0.005, 100))
)


def make_ranker(name: str, params: dict[str, Any] | None = None) -> Ranker:
    """The ranker called ``name`` (one of :data:`MODELS`) with hyper-parameters ``params``."""
    params = dict(params or {})
    simple: dict[str, type[Ranker]] = {"popularity": PopularityRanker, "content": ContentRanker,
                                       "apex_prior": ApexPriorRanker}
    if name in simple:
        if params:
            raise ConfigError(f"model {name!r} takes no parameters; got {sorted(params)}")
        return simple[name]()
    if name in ("als", "bpr"):
        return CFRanker(name, params)
    if name == "hybrid":
        return HybridRanker(params)
    raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
