"""Reranker training on Dask: ``RerankerConfig(engine="dask")`` (the ``scale`` extra).

:meth:`~apex_rank.ranking.reranker.Reranker.fit` prepares the groups as it does on one machine
(the same users, validation split and negative sample) and hands the training groups here:

1. :func:`user_partitions` cuts them into partitions of whole users (a query group is never
   split across partitions, LightGBM's ranking objective needs each group on one worker);
2. each partition's LightGBM inputs are built on a Dask worker by the same
   :func:`~apex_rank.ranking.reranker.lgb_inputs` the local path runs, with the ALS base score
   (``init_score``) from the same :func:`~apex_rank.ranking.reranker.base_score`;
3. ``lightgbm.dask.DaskLGBMRanker`` trains ``n_estimators`` rounds on the workers;
4. the round to keep is chosen on the validation groups with the local path's rule (early
   stopping after ``early_stopping_rounds`` rounds without a better NDCG@``eval_at``), on the
   driver: early stopping inside a distributed run would let each worker stop on its own share
   of the validation groups.

It connects to ``reranker.dask_address``, or uses the ``dask.distributed`` client already
running in the caller's process.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import polars as pl

from apex_rank.errors import ConfigError
from apex_rank.ranking.rerank_features import FEATURES
from apex_rank.ranking.reranker import RerankerConfig, base_score, group_ndcg, lgb_inputs, query_groups

log = logging.getLogger(__name__)


def _client(address: str) -> Any:
    try:
        from distributed import Client, default_client
    except ImportError:
        raise ConfigError("reranker.engine='dask' needs Dask: pip install 'apex-rank[scale]'") from None
    if address:
        try:
            return Client(address, timeout=10, set_as_default=False)
        except (OSError, TimeoutError) as err:
            raise ConfigError(f"reranker.dask_address {address!r}: no Dask scheduler answers ({err})") from err
    try:
        return default_client()
    except ValueError:
        raise ConfigError(
            "reranker.engine='dask' needs a Dask scheduler: set reranker.dask_address (tcp://host:8786), "
            "or start a dask.distributed Client in this process before the build"
        ) from None


def user_partitions(frame: pl.DataFrame, n_parts: int) -> list[pl.DataFrame]:
    """Cut a frame sorted by ``user_id`` into at most ``n_parts`` slices of about equal rows,
    each cut between two users (every user's rows in one slice)."""
    if frame.height == 0:
        return []
    sizes = frame.group_by("user_id", maintain_order=True).len()["len"].to_numpy().astype(np.int64)
    if len(sizes) != frame["user_id"].n_unique():
        raise ConfigError("internal: training groups are not sorted by user_id")
    ends = np.cumsum(sizes)
    part_of_user = np.minimum((ends - sizes) * n_parts // ends[-1], n_parts - 1)
    cuts = np.r_[0, ends[np.flatnonzero(np.diff(part_of_user)) ], frame.height]
    return [frame.slice(int(a), int(b - a)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _worker_inputs(part: pl.DataFrame, label_col: str, cfg: RerankerConfig) -> tuple[np.ndarray, ...]:
    X, y, _ = lgb_inputs(part, label_col, cfg)
    return X, y, base_score(X, cfg.als_prior)


def train_on_dask(
    params: dict[str, Any],
    train: pl.DataFrame,
    val: tuple[np.ndarray, np.ndarray, np.ndarray],
    label_col: str,
    cfg: RerankerConfig,
) -> tuple[Any, int, float]:
    """Train on the training groups ``train`` (sorted by user) with DaskLGBMRanker; returns the
    booster, the round kept and its validation NDCG@``eval_at`` on ``val`` (X, labels, groups)."""
    client = _client(cfg.dask_address)
    import dask
    import dask.array as da
    from lightgbm.dask import DaskLGBMRanker

    workers = sorted(client.scheduler_info().get("workers", {}))
    if not workers:
        raise ConfigError("reranker.engine='dask': the Dask cluster has no worker")
    n_workers = len(workers)
    parts = user_partitions(train, cfg.dask_partitions or n_workers)
    Xs, ys, inits, groups = [], [], [], []
    for i, part in enumerate(parts):
        # partitions dealt round-robin to the workers: each trains on the groups it built
        built = dask.delayed(client.submit(_worker_inputs, part, label_col, cfg, workers=[workers[i % n_workers]],
                                           pure=False), nout=3)
        Xs.append(da.from_delayed(built[0], shape=(part.height, len(FEATURES)), dtype=np.float32))
        ys.append(da.from_delayed(built[1], shape=(part.height,), dtype=np.int32))
        inits.append(da.from_delayed(built[2], shape=(part.height,), dtype=np.float64))
        g = query_groups(part["user_id"], cfg.max_query_rows)
        groups.append(da.from_array(g, chunks=len(g)))
    # the local path's LightGBM parameters; threads are the workers' own (LightGBM's dask default)
    keep = {k: v for k, v in params.items() if k not in ("metric", "eval_at", "num_threads", "seed")}
    model = DaskLGBMRanker(client=client, n_estimators=cfg.n_estimators, random_state=cfg.seed, **keep)
    log.info("reranker on Dask: %d rows of %d users in %d partitions on %d workers", train.height,
             train["user_id"].n_unique(), len(parts), n_workers)
    model.fit(da.concatenate(Xs), da.concatenate(ys), group=da.concatenate(groups),
              init_score=da.concatenate(inits), feature_name=list(FEATURES))
    booster = model.booster_
    best_iteration, best_score = _early_stopping_round(booster, val, cfg)
    return booster, best_iteration, best_score


def _early_stopping_round(booster: Any, val: tuple[np.ndarray, np.ndarray, np.ndarray],
                          cfg: RerankerConfig) -> tuple[int, float]:
    """The round LightGBM's early stopping keeps: the first with the best validation NDCG,
    looking no further than ``early_stopping_rounds`` past it."""
    X, y, groups = val
    raw = base_score(X, cfg.als_prior)
    best, best_round = -np.inf, 0
    for i in range(booster.num_trees()):
        raw = raw + booster.predict(X, start_iteration=i, num_iteration=1, raw_score=True)
        score = group_ndcg(y, raw, groups, cfg.eval_at)
        if score > best:
            best, best_round = score, i + 1
        elif i + 1 - best_round >= cfg.early_stopping_rounds:
            break
    return best_round, float(best)
