"""Splits: per-user stratification, the time cut, cold items at their natural test share, new releases, seeding."""

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


def test_item_cold_keeps_the_natural_share_of_cold_test_rows() -> None:
    inter = _inter()
    sp = make_split(inter, "item-cold", seed=1)
    n_items = inter["song_id"].n_unique()
    assert len(sp.cold_items) == round(0.2 * n_items)
    cold = pl.col("song_id").is_in(list(sp.cold_items))
    assert not sp.train.filter(cold).height
    # every user's test rows are its latest quarter, cold or warm: no cold row of the training period
    last_train = sp.train.group_by("user_id").agg(pl.col("ts").max().alias("t_train"))
    first_test = sp.test.group_by("user_id").agg(pl.col("ts").min().alias("t_test"))
    both = last_train.join(first_test, on="user_id")
    assert both.height and (both["t_train"] <= both["t_test"]).all()
    assert (sp.test.group_by("user_id").len()["len"] == 5).all()  # 20 - round(0.75 * 20)
    # cold rows: about 20 % of test rows (the cold share of items), not all of them
    share = sp.info["test_cold_share"]
    assert share == pytest.approx(sp.test.filter(cold).height / sp.test.height)
    assert 0.1 < share < 0.35
    dropped = inter.height - sp.train.height - sp.test.height
    assert dropped == inter.filter(cold).height - sp.test.filter(cold).height
    assert make_split(inter, "item-cold", seed=1).cold_items == sp.cold_items


def test_new_releases_cold_items_are_first_seen_after_the_cut() -> None:
    inter = _inter(n_items=400)
    sp = make_split(inter, "new-releases")
    assert sp.train["ts"].max() < sp.test["ts"].min()
    first = inter.group_by("song_id").agg(pl.col("ts").min().alias("t0"))
    cut = sp.test["ts"].min()
    expected = set(first.filter(pl.col("t0") >= cut)["song_id"].to_list())
    in_test = set(sp.test["song_id"].to_list())
    assert sp.cold_items and set(sp.cold_items) == expected & in_test
    assert not sp.train["song_id"].is_in(list(sp.cold_items)).any()
    assert 0 < sp.info["test_cold_share"] < 1


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
