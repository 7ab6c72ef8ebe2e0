"""Reranker training on Dask: ``RerankerConfig(engine="dask")`` (the ``scale`` extra).

The build makes the training frame with :func:`training_frame_on_dask`: its own frame builder
run on each worker for a block of users. Then :meth:`~apex_rank.ranking.reranker.Reranker.fit`
prepares the groups as it does on one machine (the same users, validation split and negative
sample) and hands the training groups here:

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
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from apex_rank.errors import ConfigError, SchemaError
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


def training_frame_on_dask(
    build_frame: Callable[..., tuple[pl.DataFrame, dict[str, float]]],
    label_part: pl.DataFrame,
    *training_side: Any,
    cfg: Any,
) -> tuple[pl.DataFrame, dict[str, float]]:
    """The reranker's training frame built per partition of users on the Dask workers.

    ``build_frame`` is the build's own frame builder (``build.training_frame``, passed in: this
    module may not import the build), called on each worker with that partition's rows of
    ``label_part`` and the training side (user states, songs, CF, candidate sources; sent once to
    every worker). Partitions are blocks of users in id order, so the frames concatenate in the
    order one machine builds them; each partition samples its share of
    ``reranker.max_train_users``. The per-source recall of the partitions is merged by their
    positive pairs.
    """
    from dataclasses import replace

    client = _client(cfg.reranker.dask_address)
    workers = sorted(client.scheduler_info().get("workers", {}))
    if not workers:
        raise ConfigError("reranker.engine='dask': the Dask cluster has no worker")
    users = label_part["user_id"].unique().sort()
    n_parts = max(1, min(cfg.reranker.dask_partitions or len(workers), users.len()))
    share = replace(cfg, reranker=replace(cfg.reranker, max_train_users=-(-cfg.reranker.max_train_users // n_parts)))
    side = client.scatter(list(training_side), broadcast=True)
    futures = []
    for i, block in enumerate(np.array_split(np.arange(users.len()), n_parts)):
        rows = label_part.filter(pl.col("user_id").is_in(users.gather(block).implode()))
        futures.append(client.submit(_frame_or_none, build_frame, rows, *side, share,
                                     workers=[workers[i % len(workers)]], pure=False))
    results = client.gather(futures)
    built = [r for r in results if not isinstance(r, str)]
    if not built:
        raise SchemaError(results[0])
    frame = pl.concat([f for f, _ in built])
    n_pos = sum(int(r["n_positive_pairs"]) for _, r in built)
    recall = {k: sum(r[k] * r["n_positive_pairs"] for _, r in built) / max(n_pos, 1)
              for k in built[0][1] if k != "n_positive_pairs"}
    recall["n_positive_pairs"] = n_pos
    log.info("reranker training frame: %d rows of %d users built in %d partitions on %d workers", frame.height,
             users.len(), n_parts, len(workers))
    return frame, recall


def _frame_or_none(build_frame: Callable[..., Any], *args: Any) -> Any:
    """``build_frame(*args)``, or the message of its SchemaError: a partition none of whose users
    has both earlier and later plays is empty, not a failure (unless every partition is)."""
    try:
        return build_frame(*args)
    except SchemaError as err:
        return str(err)


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
