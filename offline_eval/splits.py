"""Train/test splits of an interactions table, and the validation slice carved from train.

Kinds (:data:`SPLIT_KINDS`):

- ``random``: per-user stratified split (the Recommenders project's
  ``python_stratified_split``): each user's interactions are shuffled with the seed and the
  first ``round(train_share · n_u)`` go to train, the rest to test, so every user keeps about
  75% of its history in train.
- ``temporal``: one global time cut at the ``train_share`` quantile of ``ts``; train strictly
  before, test at or after.
- ``item-cold``: each user's latest ``1 - train_share`` of interactions (by ``ts``) is the test
  period, as in a leave-latest-out protocol; a seeded ``cold_share`` (20%) of the items are new:
  their earlier (training-period) interactions are dropped, their test-period rows stay. Cold
  items therefore keep their natural share of the test rows (about ``cold_share`` of them), the
  same base rate a live catalogue's new songs would have. (Holding out *every* interaction of
  the cold items instead, as this split once did, made 81% of MovieLens test positives cold and
  rewarded "cold first" rather than personalisation.)
- ``new-releases``: one global time cut at the ``train_share`` quantile of ``ts``; the cold items
  are those first seen at or after the cut (released during the test period), with every one of
  their rows in test. Their share of the test rows is whatever the data has.

Cold items are absent from train, hence from everything fitted on it (CF factors, popularity
counts, reranker labels, APEX popularity targets). ``info["test_cold_share"]`` records the share
of test rows on cold items: the base rate every model's ``cold_share@k`` is read against.

The validation slice applies the same kind of split to the training interactions (with
``seed + 1``), so tuning never sees the test. Users and items are whatever appears in the
table; the catalogue of an evaluation is the songs table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from apex_rank.errors import ConfigError, SchemaError

log = logging.getLogger(__name__)

SPLIT_KINDS = ("random", "temporal", "item-cold", "new-releases")


@dataclass
class Split:
    """A train/test split.

    Attributes
    ----------
    kind, seed: how it was made.
    train, test: interactions tables (same columns as the input).
    cold_items: song ids that are new in test (empty for ``random`` and ``temporal``).
    info: counts for the report (rows, users, items, cold items).
    """

    kind: str
    seed: int
    train: pl.DataFrame
    test: pl.DataFrame
    cold_items: frozenset[str] = field(default_factory=frozenset)
    info: dict[str, Any] = field(default_factory=dict)


def _ts_numeric(df: pl.DataFrame) -> np.ndarray:
    if "ts" not in df.columns:
        raise SchemaError("interactions table: a time split needs the column 'ts'")
    ts = df["ts"]
    if ts.dtype.is_temporal():
        ts = ts.cast(pl.Datetime("us")).dt.epoch("us")
    return ts.cast(pl.Float64).to_numpy()


def random_split(
    inter: pl.DataFrame, *, train_share: float = 0.75, seed: int = 42
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-user stratified random split (see module doc)."""
    rng = np.random.default_rng(seed)
    n = inter.height
    key = rng.random(n)
    df = inter.with_columns(pl.Series("_key", key), pl.Series("_row", np.arange(n)))
    df = df.sort(["user_id", "_key"]).with_columns(
        pl.int_range(pl.len()).over("user_id").alias("_pos"), pl.len().over("user_id").alias("_n")
    )
    is_train = (df["_pos"].cast(pl.Float64) < (df["_n"].cast(pl.Float64) * train_share).round(0)).to_numpy()
    df = df.with_columns(pl.Series("_train", is_train)).sort("_row")
    drop = ["_key", "_row", "_pos", "_n", "_train"]
    return df.filter(pl.col("_train")).drop(drop), df.filter(~pl.col("_train")).drop(drop)


def temporal_split(inter: pl.DataFrame, *, train_share: float = 0.75) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Global time cut at the ``train_share`` quantile of ``ts``."""
    ts = _ts_numeric(inter)
    cut = np.quantile(ts, train_share)
    m = ts < cut
    if m.all() or not m.any():
        raise SchemaError(f"temporal split: all timestamps fall on one side of the cut {cut}")
    mask = pl.Series(m)
    return inter.filter(mask), inter.filter(~mask)


def user_temporal_split(inter: pl.DataFrame, *, train_share: float = 0.75) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per user: the earliest ``round(train_share · n_u)`` interactions (by ``ts``, ties by row
    order) to train, the rest to test."""
    ts = _ts_numeric(inter)
    n = inter.height
    df = inter.with_columns(pl.Series("_t", ts), pl.Series("_row", np.arange(n)))
    df = df.sort(["user_id", "_t", "_row"]).with_columns(
        pl.int_range(pl.len()).over("user_id").alias("_pos"), pl.len().over("user_id").alias("_n")
    )
    is_train = (df["_pos"].cast(pl.Float64) < (df["_n"].cast(pl.Float64) * train_share).round(0)).to_numpy()
    df = df.with_columns(pl.Series("_train", is_train)).sort("_row")
    drop = ["_t", "_row", "_pos", "_n", "_train"]
    return df.filter(pl.col("_train")).drop(drop), df.filter(~pl.col("_train")).drop(drop)


def item_cold_split(
    inter: pl.DataFrame, *, cold_share: float = 0.2, train_share: float = 0.75, seed: int = 42
) -> tuple[pl.DataFrame, pl.DataFrame, frozenset[str]]:
    """Per-user latest rows to test; a seeded ``cold_share`` of items lose their training rows."""
    items = np.sort(np.asarray(inter["song_id"].unique().to_list(), dtype=object))
    rng = np.random.default_rng(seed)
    n_cold = int(round(cold_share * items.size))
    cold = frozenset(items[rng.permutation(items.size)[:n_cold]].tolist())
    train, test = user_temporal_split(inter, train_share=train_share)
    train = train.filter(~pl.col("song_id").is_in(pl.Series(list(cold), dtype=pl.String).implode()))
    return train, test, cold


def new_releases_split(
    inter: pl.DataFrame, *, train_share: float = 0.75
) -> tuple[pl.DataFrame, pl.DataFrame, frozenset[str]]:
    """Global time cut; items first seen at or after the cut are the cold ones."""
    train, test = temporal_split(inter, train_share=train_share)
    seen = set(train["song_id"].unique().to_list())
    cold = frozenset(s for s in test["song_id"].unique().to_list() if s not in seen)
    return train, test, cold


def make_split(
    inter: pl.DataFrame, kind: str, *, seed: int = 42, train_share: float = 0.75, cold_share: float = 0.2
) -> Split:
    """Split ``inter`` by ``kind`` (one of :data:`SPLIT_KINDS`); test users absent from train are
    dropped from test (nothing can be ranked for them) and counted in ``info``.
    """
    if kind not in SPLIT_KINDS:
        raise ConfigError(f"unknown split kind {kind!r}; valid kinds: {', '.join(SPLIT_KINDS)}")
    if not 0.0 < train_share < 1.0:
        raise ConfigError(f"train_share must lie in (0, 1), got {train_share}")
    if not 0.0 <= cold_share < 1.0:
        raise ConfigError(f"cold_share must lie in [0, 1), got {cold_share}")
    cold: frozenset[str] = frozenset()
    if kind == "random":
        train, test = random_split(inter, train_share=train_share, seed=seed)
    elif kind == "temporal":
        train, test = temporal_split(inter, train_share=train_share)
    elif kind == "item-cold":
        train, test, cold = item_cold_split(inter, cold_share=cold_share, train_share=train_share, seed=seed)
    else:
        train, test, cold = new_releases_split(inter, train_share=train_share)
    train_users = train["user_id"].unique()
    unknown = test.filter(~pl.col("user_id").is_in(train_users.implode()))
    test = test.filter(pl.col("user_id").is_in(train_users.implode()))
    if train.height == 0 or test.height == 0:
        raise SchemaError(f"{kind} split left an empty train ({train.height}) or test ({test.height}) set")
    info = {
        "n_train": train.height,
        "n_test": test.height,
        "n_train_users": train["user_id"].n_unique(),
        "n_test_users": test["user_id"].n_unique(),
        "n_train_items": train["song_id"].n_unique(),
        "n_test_items": test["song_id"].n_unique(),
        "n_cold_items": len(cold),
        "test_cold_share": float(test["song_id"].is_in(pl.Series(list(cold), dtype=pl.String).implode()).mean())
        if cold
        else 0.0,
        "n_test_rows_unknown_user": unknown.height,
        "train_share": train_share,
    }
    if kind == "item-cold":
        info["cold_share"] = cold_share
    log.info("%s split: %s", kind, info)
    return Split(kind, seed, train, test, cold, info)


def validation_split(split: Split, *, train_share: float = 0.75, cold_share: float = 0.2) -> Split:
    """The same kind of split applied to ``split.train`` (seed + 1): for tuning, never the test."""
    return make_split(split.train, split.kind, seed=split.seed + 1, train_share=train_share, cold_share=cold_share)
