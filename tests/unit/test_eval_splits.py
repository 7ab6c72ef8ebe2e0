"""Splits: per-user stratification, the time cut, cold items held out entirely, seeding."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from apex_rank.errors import ConfigError, SchemaError
from apex_rank.offline_eval.splits import make_split, validation_split


def _inter(n_users: int = 30, per_user: int = 20, n_items: int = 60, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for i in rng.choice(n_items, per_user, replace=False):
            rows.append((f"u{u}", f"s{i}", int(rng.integers(0, 10_000))))
    df = pl.DataFrame(rows, schema=["user_id", "song_id", "ts"], orient="row")
    return df.with_columns(pl.lit(1.0).alias("weight"))


def test_random_split_is_stratified_per_user_and_seeded() -> None:
    inter = _inter()
    sp = make_split(inter, "random", seed=3)
    per_user = sp.train.group_by("user_id").len()["len"].to_numpy()
    assert (per_user == 15).all()  # round(0.75 * 20)
    assert sp.train.height + sp.test.height == inter.height
    again = make_split(inter, "random", seed=3)
    assert again.train.equals(sp.train) and again.test.equals(sp.test)
    other = make_split(inter, "random", seed=4)
    assert not other.train.equals(sp.train)


def test_temporal_split_cuts_once_in_time() -> None:
    sp = make_split(_inter(), "temporal")
    assert sp.train["ts"].max() < sp.test["ts"].min()


def test_item_cold_holds_out_all_interactions_of_cold_items() -> None:
    inter = _inter()
    sp = make_split(inter, "item-cold", seed=1)
    n_items = inter["song_id"].n_unique()
    assert len(sp.cold_items) == round(0.2 * n_items)
    assert not sp.train["song_id"].is_in(list(sp.cold_items)).any()
    cold_rows = inter.filter(pl.col("song_id").is_in(list(sp.cold_items)))
    test_cold = sp.test.filter(pl.col("song_id").is_in(list(sp.cold_items)))
    known_users = set(sp.train["user_id"].to_list())
    assert test_cold.height == cold_rows.filter(pl.col("user_id").is_in(list(known_users))).height
    warm_test = sp.test.filter(~pl.col("song_id").is_in(list(sp.cold_items)))
    assert sp.train["ts"].max() < warm_test["ts"].min()
    assert make_split(inter, "item-cold", seed=1).cold_items == sp.cold_items


def test_validation_split_comes_from_train_only() -> None:
    sp = make_split(_inter(), "item-cold", seed=1)
    val = validation_split(sp)
    assert val.train.height + val.test.height <= sp.train.height
    assert not val.test.join(sp.test, on=["user_id", "song_id"], how="inner").height
    assert not val.train["song_id"].is_in(list(sp.cold_items)).any()


def test_bad_kind_and_missing_ts() -> None:
    with pytest.raises(ConfigError, match="unknown split kind 'cold'"):
        make_split(_inter(), "cold")
    with pytest.raises(SchemaError, match="needs the column 'ts'"):
        make_split(_inter().drop("ts"), "temporal")
    with pytest.raises(ConfigError, match="train_share"):
        make_split(_inter(), "random", train_share=1.5)
