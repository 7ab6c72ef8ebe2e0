"""``Reranker``: a LightGBM lambdarank model over the feature frame.

Training groups are users (rows must be contiguous per user), labels are graded integers
(0 = not consumed in the label slice, 1.. from the summed weight), ``label_gain`` is set to
2^g − 1 for the label range. Validation is a seeded share of users; training stops early on
validation NDCG@``eval_at``. Queries longer than ``max_query_rows`` (LightGBM's lambdarank
limit is 10000 rows) are split into consecutive groups of at most that many rows, and the
split is logged. New songs in the training groups come from the Recommender's build, which
holds a share of played songs out of the training side (``RecommenderConfig.cold_sim_share``);
masking the CF features of warm candidates here instead (the DropoutNet idea, this module's
former ``cold_sim_share``) taught the model that songs without CF evidence are as likely to be
played as the popular warm songs ALS had put among the candidates.

The model is saved as LightGBM text; feature importance is exported as a polars frame.

Example
-------
>>> # rr = Reranker(RerankerConfig()).fit(frame, label_col="label")
>>> # scores = rr.score(frame)
"""

from __future__ import annotations

import logging
import numbers
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from apex_rank.errors import ArtifactError, ConfigError, NotFittedError, SchemaError
from apex_rank.ranking.rerank_features import FEATURES, feature_matrix
from apex_rank.threads import thread_count

log = logging.getLogger(__name__)

LGB_QUERY_LIMIT = 10000
_MODEL_MARKERS = (b"\nend of trees\n", b"\nend of parameters\n")  # sections of a LightGBM text model


@dataclass(frozen=True)
class RerankerConfig:
    """Settings of :class:`Reranker`.

    Attributes
    ----------
    num_leaves, learning_rate, min_data_in_leaf, feature_fraction: LightGBM tree settings.
    n_estimators: maximum boosting rounds. early_stopping_rounds: patience on validation NDCG.
    eval_at: NDCG cut-off for early stopping. max_grade: highest label grade.
    val_share: share of users held out for early stopping.
    max_query_rows: longer queries are split into groups of at most this many rows.
    max_train_users: at most this many users (seeded sample) build training groups.
    negatives_per_query: keep every positive and at most this many sampled negatives per training
        group (0 keeps all); lambdarank's cost grows with pairs per query, so this bounds build time.
    als_prior: weight of the ALS rank in the base score the trees start from (see
        :func:`base_score`; 0: trees start from zero).
    min_val_gain: the relative validation NDCG@``eval_at`` gain over the ALS order the trees must
        show to reorder the ALS list; below it they only order what that list ties (songs
        outside its top :data:`ALS_PRIOR_RANK_CAP`, new songs among them; see ``tree_weight``).
    seed: seeds the user split, the negative sample and LightGBM.
    engine: ``"local"`` (LightGBM in this process) or ``"dask"``: the build makes the training
        frame per partition of users on the Dask workers, and the training groups are cut into
        partitions of whole users, each partition's LightGBM inputs are built on a Dask worker
        and ``lightgbm.dask.DaskLGBMRanker`` trains on them (the ``scale`` extra; see
        :mod:`apex_rank.ranking.dask_reranker`).
    dask_partitions: partitions of the training groups for ``engine="dask"`` (0: one per worker).
    dask_address: the scheduler for ``engine="dask"`` (``tcp://host:8786``); empty: the client
        already running in this process.
    """

    num_leaves: int = 31
    learning_rate: float = 0.05
    n_estimators: int = 300
    early_stopping_rounds: int = 30
    min_data_in_leaf: int = 20
    feature_fraction: float = 0.9
    eval_at: int = 10
    max_grade: int = 4
    val_share: float = 0.2
    max_query_rows: int = 10000
    max_train_users: int = 5000
    negatives_per_query: int = 100
    als_prior: float = 1.0
    min_val_gain: float = 0.05
    seed: int = 0
    engine: str = "local"
    dask_partitions: int = 0
    dask_address: str = ""

    def __post_init__(self) -> None:
        if self.engine not in ("local", "dask"):
            raise ConfigError(f"reranker.engine must be 'local' or 'dask', got {self.engine!r}")
        if self.dask_partitions < 0:
            raise ConfigError(f"reranker.dask_partitions must be >= 0, got {self.dask_partitions}")
        if not 0.0 < self.val_share < 1.0:
            raise ConfigError(f"reranker.val_share must be in (0, 1), got {self.val_share}")
        if not 1 <= self.max_query_rows <= LGB_QUERY_LIMIT:
            raise ConfigError(f"reranker.max_query_rows must be in [1, {LGB_QUERY_LIMIT}], got {self.max_query_rows}")
        if self.max_grade < 1 or self.max_grade > 30:
            raise ConfigError(f"reranker.max_grade must be in [1, 30], got {self.max_grade}")
        if self.negatives_per_query < 0:
            raise ConfigError(f"reranker.negatives_per_query must be >= 0, got {self.negatives_per_query}")
        for name in ("num_leaves", "n_estimators", "early_stopping_rounds", "eval_at", "max_train_users"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reranker.{name} must be >= 1, got {getattr(self, name)}")


SMALL_PREDICT_ROWS = 2000  # below this many rows, predict on one thread


def grade_labels(weight: np.ndarray, max_grade: int) -> np.ndarray:
    """Graded relevance from summed interaction weight: 0 for none, else ceil(log2(1 + w)) capped."""
    w = np.nan_to_num(np.asarray(weight, dtype=np.float64), nan=0.0)
    g = np.where(w > 0, np.ceil(np.log2(1.0 + np.maximum(w, 0.0))), 0.0)
    return np.clip(g, 0, max_grade).astype(np.int32)


def sample_negatives(frame: pl.DataFrame, label_col: str, n_neg: int, seed: int) -> pl.DataFrame:
    """Keep every positive row and a seeded sample of at most ``n_neg`` negatives per user."""
    key = pl.Series("_key", np.random.default_rng(seed).random(frame.height))
    f = frame.with_columns(key)
    neg_rank = pl.col("_key").rank("ordinal").over(["user_id", pl.col(label_col) > 0])
    return f.filter((pl.col(label_col) > 0) | (neg_rank <= n_neg)).drop("_key")


ALS_PRIOR_RANK_CAP = 100  # ranks beyond (and songs ALS did not return) share the base score of rank cap + 1


TREES_TIE_BREAK = 1e-4  # tree weight of a reranker that did not earn its place (``RerankerConfig.min_val_gain``):
# |trees| stays far below the 0.014 between the base scores of ALS ranks 100 and 101


def base_score(X: np.ndarray, weight: float) -> np.ndarray:
    """The score the boosted trees start from: ``-weight · log2(1 + rank_als)`` (rank capped at
    ``ALS_PRIOR_RANK_CAP``; songs outside the ALS list, cold songs among them, at cap + 1).

    With it the trees learn corrections to the ALS order rather than an order from scratch, so a
    feature that does not help on validation leaves ALS's order in place (LightGBM's
    ``init_score``; it is not stored in the model file, so serving adds it here too).
    """
    r = X[:, FEATURES.index("rank_als")].astype(np.float64)
    r = np.where(np.isfinite(r), np.clip(r, 1.0, ALS_PRIOR_RANK_CAP), ALS_PRIOR_RANK_CAP + 1)
    return -weight * np.log2(1.0 + r)


def check_cold_share(cold_share: float | None) -> None:
    """None or a real number in [0, 1]; anything else is a :class:`ConfigError` naming it."""
    if cold_share is None:
        return
    if isinstance(cold_share, bool) or not isinstance(cold_share, (int, float)) or not 0.0 <= cold_share <= 1.0:
        raise ConfigError(f"cold_share must be a number in [0, 1] or None, got {cold_share!r}")


def user_draws(user_ids: Sequence[str]) -> np.ndarray:
    """A fixed number in [0, 1) per user id (CRC-32 of the UTF-8 id / 2^32): which users get
    the fractional slot of a floor (:func:`select_top_k`), the same in every batch and process."""
    return np.asarray([zlib.crc32(u.encode("utf-8")) for u in user_ids], dtype=np.float64) / 2.0**32


def select_top_k(
    user_key: np.ndarray, is_cold: np.ndarray, k: int, cold_share: float | None, *, floor: bool = False,
    draws: np.ndarray | None = None, by_score: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of a (user, best score first) sorted candidate list make each user's top-k.

    ``cold_share`` None: the first k. A float in [0, 1]: ``round(cold_share · k)`` slots go to
    the user's best-scored new (cold) songs and the rest to its best-scored warm songs; the k
    chosen keep their score order, so a new song sits where its score puts it, not appended at
    the bottom. A user with too few new candidates gets warm songs in the free slots (and the
    other way round), so lists stay k long where k songs are rankable.

    ``floor`` (the default lists' minimum share of new songs): the share is a minimum, a list
    whose own top k holds more new songs keeps them, and the share holds at every depth of the
    list, not only at k: the top p holds at least ``cold_share · p`` new songs (rounded by the
    user's draw), each new song sitting at the higher of its score position and the position
    that depth needs. Placed by score alone, the floor's songs sat at the bottom of the list
    (slots 9 and 10 for a floor of 0.2), where they earn new-song targets little: in a
    synthetic world where new releases took 34% of the test plays the hybrid's first slot held
    a new song for 27% of users against 49% in the content-only list, and its new-song-target
    NDCG@10 was 0.070 against content's 0.083 (spread: 0.084). Spread, a floor costs validation about
    what it costs the test (MovieLens item-cold, a floor of 0.2: warm-target NDCG -17% on
    validation, -16% on the test), which the choice of the floor relies on.

    ``by_score`` ((n,) bool per row, with ``floor``): the users whose rows are True get the
    floor's new songs where their scores put them, not spread (requests the trees were not
    trained for keep the ALS order on top, see ``Reranker.trusted_states``).

    ``draws`` ((n,) per row, the row's user's :func:`user_draws`): ``cold_share · k`` slots are
    split into whole slots for every user and one more for the users whose draw is below the
    fraction, so the mean over users is the share itself. Without draws the slots are rounded,
    and a floor of 0.04 at k = 10 would be no new song for anyone where new songs get 4 % of
    the plays.

    Returns ``(positions of the kept rows in the input order, their 1-based ranks)``.
    """
    n = len(user_key)
    start = np.r_[0, np.flatnonzero(np.diff(user_key)) + 1] if n else np.zeros(0, np.int64)
    lens = np.diff(np.r_[start, n])
    pos = np.arange(n) - np.repeat(start, lens)
    if cold_share is None:
        keep = np.flatnonzero(pos < k)
        return keep, (pos[keep] + 1).astype(np.int32)
    check_cold_share(cold_share)
    user = np.repeat(np.arange(len(start)), lens)
    cold = np.asarray(is_cold, dtype=bool)
    n_cold = np.bincount(user, weights=cold, minlength=len(start)).astype(np.int64)
    n_warm = lens - n_cold
    slots = float(cold_share) * k
    if draws is None:
        want = np.full(len(start), int(round(slots)), dtype=np.int64)
    else:
        whole = np.floor(slots + 1e-9)
        want = (whole + (np.asarray(draws, dtype=np.float64)[start] < slots - whole)).astype(np.int64)
    if floor:
        share = np.full(len(start), float(cold_share))  # the depth each user's floor holds at
        if by_score is not None:
            share[np.asarray(by_score, dtype=bool)[start]] = 0.0  # spread nothing
        top = pos < k
        want = np.maximum(want, np.bincount(user[top], weights=cold[top], minlength=len(start)).astype(np.int64))
    take_cold = np.minimum(want, n_cold)
    take_warm = np.minimum(k - take_cold, n_warm)
    take_cold = np.minimum(n_cold, k - take_warm)  # too few warm songs: more new ones
    # position of each row among its user's cold (warm) rows
    c_pos = np.cumsum(cold) - 1 - np.repeat(np.r_[0, np.cumsum(cold)][start], lens)
    w_pos = np.cumsum(~cold) - 1 - np.repeat(np.r_[0, np.cumsum(~cold)][start], lens)
    keep = np.flatnonzero(np.where(cold, c_pos < take_cold[user], w_pos < take_warm[user]))
    if floor and len(keep):
        keep = _spread_new_songs(keep, user[keep], cold[keep], share,
                                 np.full(len(start), 0.5) if draws is None else np.asarray(draws, np.float64)[start])
    u_kept = user[keep]
    first = np.r_[0, np.flatnonzero(np.diff(u_kept)) + 1] if len(keep) else np.zeros(0, np.int64)
    rank = np.arange(len(keep)) - np.repeat(first, np.diff(np.r_[first, len(keep)])) + 1
    return keep, rank.astype(np.int32)


def _spread_new_songs(keep: np.ndarray, user: np.ndarray, cold: np.ndarray, share: np.ndarray,
                      draw: np.ndarray) -> np.ndarray:
    """Reorder each user's kept rows (``keep``, in score order per user; ``user`` and ``cold``
    of each kept row, ``share`` and ``draw`` per user) so that every depth p of the list holds
    at least ``ceil(share · p − draw)`` new songs: at p = k that is the floor's own count.

    The j-th new song (0-based) goes to the higher of its position in score order and the
    first depth that needs j + 1 new songs, ``floor((j + draw) / share) + 1``; the warm songs
    fill the other positions in score order. Written as a sort: a new song goes after the
    warm songs that still precede it, ``position - 1 - j`` of them, a warm song after i earlier
    warm songs.
    """
    first = np.r_[0, np.flatnonzero(np.diff(user)) + 1]
    lens = np.diff(np.r_[first, len(keep)])
    pos = np.arange(len(keep)) - np.repeat(first, lens)  # 0-based, in score order
    j = np.cumsum(cold) - cold - np.repeat(np.r_[0, np.cumsum(cold)][first], lens)  # index among the new rows
    i = pos - j  # index among the warm rows
    su = share[user]  # a share of 0 forces nothing
    forced = np.where(su > 0, np.floor((j + draw[user]) / np.where(su > 0, su, 1.0)), np.inf)
    placed = np.minimum(pos, forced)  # 0-based: the first depth needing j + 1 new songs, or the score position
    key = np.where(cold, placed - j, i)  # warm songs ahead of the row
    return keep[np.lexsort((~cold, key, user))]


def _group_draws(n_groups: int) -> np.ndarray:
    """Evenly spread stand-ins for :func:`user_draws` over validation groups (golden-ratio steps)."""
    return (np.arange(n_groups) * 0.6180339887498949) % 1.0


def group_ndcg(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    k: int,
    *,
    cold: np.ndarray | None = None,
    min_cold_share: float = 0.0,
    targets: str = "all",
) -> float:
    """Mean NDCG@k over consecutive groups with a positive (gain 2^label − 1, LightGBM's).

    The top k of a group is chosen as served with ``min_cold_share`` as a floor
    (:func:`select_top_k`); ``targets`` "warm" ("cold") counts only warm (new, ``cold`` True)
    rows as relevant, groups without such a positive left out: the offline evaluation's
    ``warm`` (``cold``) slice.
    """
    return served_ndcg(labels, scores, groups, k, cold=cold, min_cold_share=min_cold_share,
                       targets=(targets,))[f"ndcg_{targets}"]


def served_ndcg(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    k: int,
    *,
    cold: np.ndarray | None = None,
    min_cold_share: float = 0.0,
    targets: Sequence[str] = ("all", "warm", "cold"),
) -> dict[str, float]:
    """:func:`group_ndcg` for each of ``targets`` (``ndcg_<target>``) and the share of new songs
    served (``served_cold_share``), from one selection of each group's top k."""
    n = len(labels)
    g = np.repeat(np.arange(len(groups)), groups)
    is_cold = np.zeros(n, bool) if cold is None else np.asarray(cold, bool)
    for t in targets:
        if t not in ("all", "warm", "cold"):
            raise ConfigError(f"targets must be 'all', 'warm' or 'cold', got {t!r}")
    order = np.lexsort((np.arange(n), -scores, g))
    keep, rank = select_top_k(g[order], is_cold[order], k, min_cold_share, floor=True,
                              draws=_group_draws(len(groups))[g[order]])
    rows = order[keep]
    disc = 1.0 / np.log2(rank + 1.0)
    out: dict[str, float] = {}
    for t in targets:
        y = labels.astype(np.float64)
        if t != "all":
            y = np.where(is_cold == (t == "warm"), 0.0, y)
        dcg = np.bincount(g[rows], weights=(2.0 ** y[rows] - 1.0) * disc, minlength=len(groups))
        ideal_order = np.lexsort((-y, g))
        ikeep, irank = select_top_k(g[ideal_order], np.zeros(n, bool), k, None)
        irows = ideal_order[ikeep]
        idcg = np.bincount(g[irows], weights=(2.0 ** y[irows] - 1.0) / np.log2(irank + 1.0),
                           minlength=len(groups))
        ok = idcg > 0
        out[f"ndcg_{t}"] = float(np.mean(dcg[ok] / idcg[ok])) if ok.any() else float("nan")
    out["served_cold_share"] = float(is_cold[rows].mean()) if len(rows) else 0.0
    return out


def query_groups(user_ids: pl.Series, max_rows: int) -> np.ndarray:
    """Group sizes for contiguous runs of equal user ids, runs longer than ``max_rows`` split."""
    if user_ids.len() == 0:
        return np.zeros(0, dtype=np.int64)
    runs = user_ids.rle()
    sizes = runs.struct.field("len").to_numpy().astype(np.int64)
    if len(user_ids.unique()) != len(sizes):
        raise SchemaError("feature frame rows are not contiguous per user_id (sort by user first)")
    out: list[int] = []
    n_split = 0
    for sz in sizes:
        if sz > max_rows:
            n_split += 1
            full, rest = divmod(int(sz), max_rows)
            out.extend([max_rows] * full + ([rest] if rest else []))
        else:
            out.append(int(sz))
    if n_split:
        log.warning("%d queries longer than %d rows were split into consecutive groups", n_split, max_rows)
    return np.asarray(out, dtype=np.int64)


def lgb_inputs(part: pl.DataFrame, label_col: str, cfg: RerankerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LightGBM's inputs from training groups sorted by user: the feature matrix, the labels
    clipped to ``max_grade`` and the query group sizes (on one machine, and per partition on
    each Dask worker)."""
    y = np.clip(part[label_col].to_numpy(), 0, cfg.max_grade).astype(np.int32)
    return feature_matrix(part), y, query_groups(part["user_id"], cfg.max_query_rows)


class Reranker:
    """LightGBM lambdarank over ``FEATURES`` (see module doc)."""

    def __init__(self, config: RerankerConfig | None = None) -> None:
        self.config = config or RerankerConfig()
        self.booster: Any = None
        self.best_iteration = 0
        self.best_score: float = float("nan")
        self.als_order_score: float = float("nan")
        self.tree_weight = 1.0
        self.max_gap_s = float("inf")  # see trusted_states
        self.validation_users: frozenset[str] = frozenset()  # the users of the validation groups (not saved)
        self._validation: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def fit(self, frame: pl.DataFrame, *, label_col: str = "label") -> Reranker:
        """Train on a feature frame holding ``user_id``, ``FEATURES`` and an integer ``label_col``."""
        import lightgbm as lgb

        cfg = self.config
        if label_col not in frame.columns:
            raise SchemaError(f"feature frame lacks the label column {label_col!r}")
        # keep users that have at least one positive and one negative
        stats = frame.group_by("user_id").agg((pl.col(label_col) > 0).sum().alias("p"), pl.len().alias("n"))
        users = stats.filter((pl.col("p") > 0) & (pl.col("p") < pl.col("n")))["user_id"].sort()
        if users.len() < 2:
            raise SchemaError(
                f"reranker training needs at least 2 users with positives among candidates, found {users.len()}"
            )
        rng = np.random.default_rng(cfg.seed)
        if users.len() > cfg.max_train_users:
            users = users.gather(np.sort(rng.choice(users.len(), cfg.max_train_users, replace=False)))
        is_val = rng.random(users.len()) < cfg.val_share
        if is_val.all() or not is_val.any():
            is_val[: max(1, users.len() // 5)] = True
            is_val[-1] = False
        split = pl.DataFrame({"user_id": users, "_val": is_val})
        self.validation_users = frozenset(users.filter(pl.Series(is_val)).to_list())
        f = frame.join(split, on="user_id", how="inner")
        if cfg.negatives_per_query > 0:  # training groups only: validation sees every candidate, as serving does
            val_rows = f.filter(pl.col("_val"))
            f = pl.concat([sample_negatives(f.filter(~pl.col("_val")), label_col, cfg.negatives_per_query, cfg.seed),
                           val_rows])
        f = f.sort(["user_id"], maintain_order=True)
        params = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [cfg.eval_at],
            "label_gain": [float(2**g - 1) for g in range(cfg.max_grade + 1)],
            "num_leaves": cfg.num_leaves,
            "learning_rate": cfg.learning_rate,
            "min_data_in_leaf": cfg.min_data_in_leaf,
            "feature_fraction": cfg.feature_fraction,
            "num_threads": thread_count(),
            "seed": cfg.seed,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }
        val = lgb_inputs(f.filter(pl.col("_val")), label_col, cfg)
        if cfg.engine == "dask":
            from apex_rank.ranking.dask_reranker import train_on_dask

            self.booster, self.best_iteration, self.best_score = train_on_dask(
                params, f.filter(~pl.col("_val")), val, label_col, cfg
            )
        else:
            train = lgb_inputs(f.filter(~pl.col("_val")), label_col, cfg)
            dtrain = lgb.Dataset(train[0], train[1], group=train[2], feature_name=list(FEATURES), free_raw_data=True,
                                 init_score=base_score(train[0], cfg.als_prior))
            dval = lgb.Dataset(val[0], val[1], group=val[2], reference=dtrain,
                               init_score=base_score(val[0], cfg.als_prior))
            evals: dict[str, dict[str, list[float]]] = {}
            self.booster = lgb.train(
                params,
                dtrain,
                num_boost_round=cfg.n_estimators,
                valid_sets=[dval],
                valid_names=["val"],
                callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False), lgb.record_evaluation(evals)],
            )
            self.best_iteration = int(self.booster.best_iteration or cfg.n_estimators)
            hist = evals.get("val", {}).get(f"ndcg@{cfg.eval_at}", [])
            self.best_score = float(hist[self.best_iteration - 1]) if hist else float("nan")
        # the same validation groups ordered by the ALS source alone: what the reranker must beat
        r_als = val[0][:, FEATURES.index("rank_als")]
        self.als_order_score = group_ndcg(val[1], -np.nan_to_num(r_als, nan=np.inf), val[2], cfg.eval_at)
        self._validation = val  # kept for exposure_on_validation (not saved)
        # Trees that barely beat the ALS order on validation learned corrections that do not
        # carry over to the serving side, whose CF is refitted on every interaction (the
        # validation groups are ordered by the weaker CF of the training side, so part of what
        # the trees correct is gone when serving): MovieLens random split, validation +0.6%
        # over the ALS order and test -1.4% (seed 43), validation +3.1% and test -4.2% (seed
        # 42); the item-cold split, +33% and +7%. Such trees keep the ALS order and only
        # order the songs it ties.
        if not self.best_score >= (1.0 + cfg.min_val_gain) * self.als_order_score:
            self.tree_weight = TREES_TIE_BREAK
        log.info(
            "reranker: %d train / %d val users, %d rows, best iteration %d, val NDCG@%d %.4f (ALS order %.4f), "
            "tree weight %g",
            int((~is_val).sum()),
            int(is_val.sum()),
            f.height,
            self.best_iteration,
            cfg.eval_at,
            self.best_score,
            self.als_order_score,
            self.tree_weight,
        )
        return self

    def floors_on_validation(self, shares: tuple[float, ...], k: int = 10) -> list[dict[str, Any]]:
        """NDCG@k of the whole list, of warm targets and of new-song targets on the validation
        groups: the ALS order first, then the reranker with each minimum new-song share in
        ``shares`` (a floor, see :func:`select_top_k`), and the share of new songs it served.
        Once, after :meth:`fit`: the validation groups are not saved, and are freed here."""
        if self._validation is None:
            raise NotFittedError("the reranker's validation groups are gone (only once, right after fit)")
        X, y, groups = self._validation
        self._validation = None
        cold = X[:, FEATURES.index("is_cold")] > 0.5
        sc = self.score_matrix(X)
        als = -np.nan_to_num(X[:, FEATURES.index("rank_als")], nan=np.inf)
        als_order = served_ndcg(y, als, groups, k, cold=cold)
        del als_order["served_cold_share"]  # reported for the reranker's lists only
        out: list[dict[str, Any]] = [{"model": "als_order", "min_cold_share": None, **als_order}]
        for share in shares:
            out.append({"model": "reranker", "min_cold_share": share,
                        **served_ndcg(y, sc, groups, k, cold=cold, min_cold_share=share)})
        return out

    def score(self, frame: pl.DataFrame) -> np.ndarray:
        """Scores (n,) float64 for each row of a feature frame (row-wise; batch-independent)."""
        if self.booster is None:
            raise NotFittedError("Reranker is not fitted; call fit() or load()")
        if frame.height == 0:
            return np.zeros(0, dtype=np.float64)
        return self.score_matrix(feature_matrix(frame))

    def trusted_states(self, last_seen_s: np.ndarray, at: float | None) -> np.ndarray | None:
        """(n_states,) bool: the requests made ``at`` (epoch seconds) that the trees were
        trained for, that is at most ``max_gap_s`` after the user's latest play (None, the
        default, or an unknown latest play: the request continues the user's history, as the
        training groups' labels did). None when every request is (no ``at``). An ``at`` that is
        not a finite number of seconds is a :class:`ConfigError` naming it."""
        if at is not None and (isinstance(at, bool) or not isinstance(at, numbers.Real) or not np.isfinite(at)):
            raise ConfigError(f"at must be a finite number of epoch seconds or None, got {at!r}")
        if at is None or not np.isfinite(self.max_gap_s):
            return None
        gap = float(at) - np.asarray(last_seen_s, dtype=np.float64)
        return ~(gap > self.max_gap_s)

    def score_matrix(self, X: np.ndarray, trusted: np.ndarray | None = None) -> np.ndarray:
        """Scores (n,) float64 for a (n, len(FEATURES)) float32 matrix in ``FEATURES`` order, NaN = missing.

        ``trusted`` ((n,) bool, default all): rows whose request lies inside the range of
        situations the trees were trained on (:meth:`trusted_states`); the other rows
        keep the ALS order, the trees only breaking its ties (weight ``TREES_TIE_BREAK``).

        Inputs below ``SMALL_PREDICT_ROWS`` rows are predicted on one thread: waking a thread pool
        costs more than a few hundred rows take.
        """
        if self.booster is None:
            raise NotFittedError("Reranker is not fitted; call fit() or load()")
        if X.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        X = np.ascontiguousarray(X, dtype=np.float32)
        trees = self.booster.predict(
            X, num_iteration=self.best_iteration, num_threads=1 if X.shape[0] < SMALL_PREDICT_ROWS else thread_count()
        )
        w: float | np.ndarray = self.tree_weight
        if trusted is not None:
            w = np.where(np.asarray(trusted, dtype=bool), w, min(w, TREES_TIE_BREAK))
        return w * np.asarray(trees, dtype=np.float64) + base_score(X, self.config.als_prior)

    def feature_importance(self) -> pl.DataFrame:
        """``feature``, ``gain``, ``split`` per feature, by descending gain."""
        if self.booster is None:
            raise NotFittedError("Reranker is not fitted")
        b = self.booster
        return pl.DataFrame(
            {
                "feature": list(FEATURES),
                "gain": b.feature_importance("gain", iteration=self.best_iteration).astype(np.float64),
                "split": b.feature_importance("split", iteration=self.best_iteration).astype(np.int64),
            }
        ).sort("gain", descending=True)

    def save(self, path: str | Path) -> Path:
        """LightGBM text model."""
        if self.booster is None:
            raise NotFittedError("Reranker is not fitted")
        path = Path(path)
        self.booster.save_model(str(path), num_iteration=self.best_iteration)
        return path

    @classmethod
    def load(cls, path: str | Path, config: RerankerConfig | None = None) -> Reranker:
        import lightgbm as lgb

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"reranker model file {path} is missing")
        # LightGBM trusts the file: a text model cut off before its last section aborts or
        # segfaults the process, so the sections it reads must all be there first
        data = path.read_bytes()
        if not data.startswith(b"tree\n") or not all(m in data for m in _MODEL_MARKERS):
            raise ArtifactError(f"reranker model file {path} is not a complete LightGBM text model (truncated?)")
        try:
            booster = lgb.Booster(model_file=str(path))
        except (lgb.basic.LightGBMError, ValueError) as err:
            raise ArtifactError(f"reranker model file {path} is not a LightGBM text model: {err}") from err
        if list(booster.feature_name()) != list(FEATURES):
            raise ArtifactError(
                f"reranker model {path} was trained on different features: {booster.feature_name()[:5]}..."
            )
        obj = cls(config)
        obj.booster = booster
        obj.best_iteration = booster.current_iteration()
        return obj
