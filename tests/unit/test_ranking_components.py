"""Content map, feature frame, reranker pieces and the recommender config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from apex_rank.config import from_dict, load_config, to_dict
from apex_rank.errors import ConfigError, SchemaError
from apex_rank.ranking.content_map import ContentToCF
from apex_rank.ranking.recommender import RecommenderConfig
from apex_rank.ranking.reranker import (
    LGB_QUERY_LIMIT,
    Reranker,
    RerankerConfig,
    base_score,
    grade_labels,
    query_groups,
)


def test_content_map_recovers_linear_map() -> None:
    rng = np.random.default_rng(0)
    E = rng.normal(size=(300, 10)).astype(np.float32)
    W = rng.normal(size=(10, 4))
    V = E @ W + 0.5
    m = ContentToCF(1e-3).fit(E, V)
    np.testing.assert_allclose(m.predict(E), V, atol=1e-2)
    with pytest.raises(SchemaError, match=r"embeddings must be \(n, 10\)"):
        m.predict(E[:, :3])


def test_grade_labels() -> None:
    assert grade_labels(np.array([0.0, 1.0, 3.0, 100.0, np.nan]), 4).tolist() == [0, 1, 2, 4, 0]


def test_query_groups_split_long_queries() -> None:
    users = pl.Series(["a"] * 25 + ["b"] * 3)
    assert query_groups(users, 10).tolist() == [10, 10, 5, 3]
    with pytest.raises(SchemaError, match="not contiguous"):
        query_groups(pl.Series(["a", "b", "a"]), 10)
    with pytest.raises(ConfigError, match="max_query_rows"):
        RerankerConfig(max_query_rows=LGB_QUERY_LIMIT + 1)


def _frame(n_users: int = 60, per: int = 30) -> pl.DataFrame:
    from apex_rank.ranking.rerank_features import FEATURES

    rng = np.random.default_rng(1)
    n = n_users * per
    cols = {c: rng.normal(size=n).astype(np.float32) for c in FEATURES}
    cols["is_cold"] = np.zeros(n, np.float32)
    signal = cols["content_sim"] + 0.5 * cols["als_score"]
    label = (signal > np.quantile(signal, 0.9)).astype(np.int32)
    return pl.DataFrame(
        {
            "user_id": np.repeat([f"u{i:03d}" for i in range(n_users)], per),
            "song_id": np.tile([f"s{j:03d}" for j in range(per)], n_users),
            **cols,
            "label": label,
        }
    )


def test_base_score_follows_the_als_rank_and_puts_unranked_songs_last() -> None:
    from apex_rank.ranking.rerank_features import FEATURES

    X = np.zeros((4, len(FEATURES)), np.float32)
    X[:, FEATURES.index("rank_als")] = [1.0, 7.0, 500.0, np.nan]
    b = base_score(X, 1.0)
    assert b[0] > b[1] > b[2] > b[3]  # rank 500 is capped at 100, a song outside the list sits below it
    assert b[0] == pytest.approx(-1.0) and b[3] == pytest.approx(-np.log2(102.0))
    np.testing.assert_array_equal(base_score(X, 0.0), 0.0)


def test_reranker_learns_and_roundtrips(tmp_path: Path) -> None:
    f = _frame()
    cfg = RerankerConfig(n_estimators=40, early_stopping_rounds=10, min_data_in_leaf=5, als_prior=0.0)
    rr = Reranker(cfg).fit(f)
    assert rr.best_score > 0.5
    imp = rr.feature_importance()
    assert imp["feature"][0] in ("content_sim", "als_score", "rank_content")
    back = Reranker.load(rr.save(tmp_path / "m.txt"), cfg)  # the base score's weight lives in the config
    np.testing.assert_array_equal(back.score(f), rr.score(f))
    # row-wise: scoring a slice equals slicing the scores
    np.testing.assert_array_equal(rr.score(f[100:130]), rr.score(f)[100:130])


def test_trees_that_do_not_beat_the_als_order_on_validation_only_break_its_ties() -> None:
    """Labels that follow the ALS rank leave the trees nothing to add: below ``min_val_gain``
    they keep the ALS order and only order the songs outside its list."""
    from apex_rank.ranking.rerank_features import FEATURES
    from apex_rank.ranking.reranker import TREES_TIE_BREAK

    f = _frame()
    per = 30
    rank = np.tile(np.arange(1, per + 1, dtype=np.float32), f.height // per)
    rank[rank > 25] = np.nan  # 5 songs per user outside the ALS list
    f = f.with_columns(pl.Series("rank_als", rank), pl.Series("label", (rank <= 3).astype(np.int32)))
    rr = Reranker(RerankerConfig(n_estimators=40, early_stopping_rounds=10, min_data_in_leaf=5)).fit(f)
    assert rr.tree_weight == TREES_TIE_BREAK and not rr.best_score >= 1.02 * rr.als_order_score
    sc = rr.score(f).reshape(-1, per)
    assert (np.diff(sc[:, :25], axis=1) < 0).all()  # the ALS order, strictly
    assert (sc[:, 25:].max(axis=1) < sc[:, 24]).all()  # songs outside the list stay below it
    trees = rr.booster.predict(np.ascontiguousarray(f.select(FEATURES).to_numpy(), np.float32))
    np.testing.assert_array_equal(np.argsort(-sc[:, 25:], axis=1, kind="stable"),
                                  np.argsort(-trees.reshape(-1, per)[:, 25:], axis=1, kind="stable"))
    # a reranker with signal beyond the ALS order keeps its full weight
    assert Reranker(RerankerConfig(n_estimators=40, early_stopping_rounds=10, min_data_in_leaf=5,
                                   als_prior=0.0)).fit(_frame()).tree_weight == 1.0


def test_requests_past_the_trained_gap_keep_the_als_order() -> None:
    """``trusted_states``: a request more than ``max_gap_s`` after the user's latest play is
    scored in the ALS order (tree weight ``TREES_TIE_BREAK``); at or within the gap, or with
    no request time, the trees count in full."""
    from apex_rank.ranking.reranker import TREES_TIE_BREAK

    f = _frame()
    rr = Reranker(RerankerConfig(n_estimators=40, early_stopping_rounds=10, min_data_in_leaf=5)).fit(f)
    assert rr.tree_weight == 1.0
    assert rr.trusted_states(np.array([0.0, 50.0]), None) is None  # no request time: every state
    assert rr.trusted_states(np.array([0.0, 50.0]), 100.0) is None  # no gap learned: every state
    rr.max_gap_s = 60.0
    np.testing.assert_array_equal(rr.trusted_states(np.array([0.0, 50.0, 40.0, np.nan]), 100.0),
                                  [False, True, True, True])  # 100 s late, 50 s, exactly 60 s, unknown
    from apex_rank.ranking.rerank_features import FEATURES
    X = np.ascontiguousarray(f.select(FEATURES).to_numpy(), np.float32)
    trees = rr.booster.predict(X)
    full, als = rr.score_matrix(X), rr.score_matrix(X, np.zeros(len(X), bool))
    np.testing.assert_allclose(full - als, (1.0 - TREES_TIE_BREAK) * trees, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(rr.score_matrix(X, np.ones(len(X), bool)), full)
    for bad in ("tomorrow", float("nan"), True, float("inf")):
        with pytest.raises(ConfigError, match="at must be a finite number of epoch seconds"):
            rr.trusted_states(np.array([0.0]), bad)  # type: ignore[arg-type]


def test_trees_rank_past_the_trained_gap_only_with_evidence() -> None:
    """``build._max_gap``: with no validation user coming back after more than a day, the
    trees rank up to the 90th percentile of the users' gaps (at least a day); no timestamps,
    no limit."""
    from apex_rank.ranking.build import MIN_GAP_S, _max_gap

    f = _frame()
    rr = Reranker(RerankerConfig(n_estimators=20, early_stopping_rounds=5, min_data_in_leaf=5)).fit(f)
    users = f["user_id"].unique().sort().to_list()
    day = 86400.0
    fit = pl.DataFrame({"user_id": users, "ts_s": [0.0] * len(users)})
    label = pl.DataFrame({"user_id": users, "ts_s": [60.0 * i for i in range(len(users))]})  # minutes later
    gap, info = _max_gap(fit, label, rr, f)
    assert gap == MIN_GAP_S == day and info["n_validation_users"] == 0
    label = label.with_columns(pl.Series("ts_s", [3 * day * (i % 5 == 0) for i in range(len(users))]))
    gap, info = _max_gap(fit, label, rr, f)  # a fifth come back after 3 days: too few to judge
    assert gap == 3 * day and 0 < info["n_validation_users"] < 30 and "ndcg_trees" not in info
    no_time = label.with_columns(pl.lit(float("nan")).alias("ts_s"))
    assert _max_gap(fit, no_time, rr, f) == (float("inf"), {})


def test_recommender_config_toml(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('rerank_share = 0.3\n[cf]\nmodel = "bpr"\nfactors = 8\n[index]\ncontent_factory = "HNSW32"\n')
    cfg = load_config(p, RecommenderConfig)
    assert cfg.cf.model == "bpr" and cfg.index.content_factory == "HNSW32" and cfg.rerank_share == 0.3
    assert from_dict(RecommenderConfig, to_dict(cfg)) == cfg
    p.write_text("[candidates]\nals = 10\nbogus = 1\n")
    with pytest.raises(ConfigError, match="candidates.bogus"):
        load_config(p, RecommenderConfig)
    with pytest.raises(ConfigError, match="'svd' is not one of"):
        from_dict(RecommenderConfig, {"cf": {"model": "svd"}})


def test_select_top_k_reserves_new_song_slots_in_score_order() -> None:
    from apex_rank.ranking.reranker import select_top_k

    # two users, rows already sorted best first; user 0: w w c w c c, user 1: c only (2 rows)
    user = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    cold = np.array([0, 0, 1, 0, 1, 1, 1, 1], dtype=bool)
    keep, rank = select_top_k(user, cold, 4, None)
    assert keep.tolist() == [0, 1, 2, 3, 6, 7] and rank.tolist() == [1, 2, 3, 4, 1, 2]
    keep, rank = select_top_k(user, cold, 4, 0.5)  # 2 new + 2 warm, kept in score order
    assert keep.tolist() == [0, 1, 2, 4, 6, 7] and rank.tolist() == [1, 2, 3, 4, 1, 2]
    keep, _ = select_top_k(user, cold, 4, 0.0)  # no new song while warm ones remain
    assert keep.tolist()[:4] == [0, 1, 3, 2]  or keep.tolist()[:4] == [0, 1, 2, 3]
    assert not cold[keep[:4][np.isin(keep[:4], [0, 1, 3])]].any()
    keep, _ = select_top_k(user, cold, 4, 1.0)  # 3 new exist, the 4th slot goes to a warm song
    assert sorted(keep.tolist()[:4]) == [0, 2, 4, 5]
    # as a floor: at least the share, more where the scores put more new songs in the top k
    keep, _ = select_top_k(user, cold, 4, 0.25, floor=True)  # user 0's own top 4 holds 1 new song
    assert keep.tolist() == [0, 1, 2, 3, 6, 7]
    keep, _ = select_top_k(user, cold, 4, 0.5, floor=True)  # raised to 2 new songs, one in the top 2
    assert keep.tolist() == [0, 2, 1, 4, 6, 7]


def test_floor_holds_at_every_depth_of_the_list() -> None:
    """A floor spreads new songs over the list: the top p of each user's list holds at least
    ceil(share · p − draw) new songs (where that many are kept), new and warm songs each keep
    their score order, and no new song sits below its score position."""
    from apex_rank.ranking.reranker import select_top_k

    rng = np.random.default_rng(0)
    n_users, n, k = 300, 30, 10
    user = np.repeat(np.arange(n_users), n)
    cold = rng.random(n_users * n) < 0.3
    draws = np.repeat(rng.random(n_users), n)
    for share in (0.1, 0.25, 0.4):
        keep, rank = select_top_k(user, cold, k, share, floor=True, draws=draws)
        assert (np.bincount(user[keep], minlength=n_users) == k).all()
        in_user = keep - user[keep] * n  # score position of each kept row
        mean_new_at = np.zeros(k)
        for u in range(n_users):
            rows = keep[user[keep] == u]
            c = cold[rows]
            pos = in_user[user[keep] == u]
            assert (np.diff(pos[c]) > 0).all() and (np.diff(pos[~c]) > 0).all()
            need = np.ceil(share * np.arange(1, k + 1) - draws[u * n])
            assert (np.cumsum(c) >= np.minimum(need, c.sum())).all()
            score_rank = np.argsort(np.argsort(pos))  # position by score alone among the kept rows
            assert (np.flatnonzero(c) <= score_rank[c]).all()
            mean_new_at += c
        # on average every depth gets at least the share
        assert (mean_new_at / n_users >= share - 0.08).all()


def test_fractional_floor_slots_average_to_the_share_and_follow_the_user() -> None:
    """A floor of 0.04 at k = 10 is 0.4 slots: 40 % of users (those whose fixed draw is below
    0.4) get one new song and the rest none, where rounding gave nobody one."""
    from apex_rank.ranking.reranker import select_top_k, user_draws

    ids = [f"user{i}" for i in range(2000)]
    draws = user_draws(ids)
    assert np.array_equal(draws, user_draws(ids)) and ((draws >= 0) & (draws < 1)).all()
    assert user_draws(ids[5:6])[0] == draws[5]  # a user's draw does not depend on its batch
    # each user: 10 warm rows scored above 10 new ones
    user = np.repeat(np.arange(len(ids)), 20)
    cold = np.tile(np.r_[np.zeros(10, bool), np.ones(10, bool)], len(ids))
    row_draws = draws[user]
    keep, _ = select_top_k(user, cold, 10, 0.04, floor=True)
    assert not cold[keep].any()  # rounded: 0 slots
    keep, _ = select_top_k(user, cold, 10, 0.04, floor=True, draws=row_draws)
    got = np.bincount(user[keep], weights=cold[keep], minlength=len(ids))
    assert np.array_equal(got, (draws < 0.4).astype(float))  # exactly the users with a low draw
    assert abs(got.mean() - 0.4) < 0.05
    keep, _ = select_top_k(user, cold, 10, 0.25, floor=True, draws=row_draws)  # 2.5 slots: 2 or 3
    got = np.bincount(user[keep], weights=cold[keep], minlength=len(ids))
    assert set(got.tolist()) == {2.0, 3.0} and abs(got.mean() - 2.5) < 0.1


def test_group_ndcg_counts_what_is_served() -> None:
    from apex_rank.ranking.reranker import group_ndcg

    y = np.array([1, 0, 0, 1, 0])  # one group of 5, positives at rows 0 (warm) and 3 (cold)
    cold = np.array([0, 0, 0, 1, 0], dtype=bool)
    sc = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    ideal = 1 + 1 / np.log2(3)
    assert group_ndcg(y, sc, np.array([5]), 2, cold=cold) == pytest.approx(1 / ideal)
    # a floor of one new song in two slots swaps the second warm song for the cold positive
    assert group_ndcg(y, sc, np.array([5]), 2, cold=cold, min_cold_share=0.5) == pytest.approx(1.0)
    # warm targets only: the cold positive is not relevant
    assert group_ndcg(y, sc, np.array([5]), 2, cold=cold, targets="warm") == pytest.approx(1.0)
    # new-song targets only: the cold positive is served first under the floor (the floor holds
    # at every depth, and the first group's draw, 0, gives depth 1 its half slot), absent without it
    assert group_ndcg(y, sc, np.array([5]), 2, cold=cold, min_cold_share=0.5, targets="cold") == pytest.approx(1.0)
    assert group_ndcg(y, sc, np.array([5]), 2, cold=cold, targets="cold") == 0.0
    with pytest.raises(ConfigError, match="targets"):
        group_ndcg(y, sc, np.array([5]), 2, cold=cold, targets="new")


def test_simulated_new_songs_are_half_new_releases_half_random() -> None:
    """Half of the simulated new songs are the latest songs to reach the catalogue, half a
    seeded draw among the others; without timestamps all are drawn."""
    import polars as pl

    from apex_rank.ranking.build import _simulated_new_songs
    from apex_rank.ranking.config import RecommenderConfig

    rng = np.random.default_rng(1)
    n = 2000
    s = rng.integers(0, 100, n)
    first_day = np.arange(100) * 3.0  # song i appears on day 3i
    ts = (first_day[s] + rng.random(n) * 50) * 86400
    fit = pl.DataFrame({"_s": s, "ts_s": ts})
    cfg = RecommenderConfig(cold_sim_share=0.2)
    sim = _simulated_new_songs(fit, cfg)
    assert len(sim) == 20 and len(set(sim.tolist())) == 20
    first = fit.group_by("_s").agg(pl.col("ts_s").min()).sort("ts_s", descending=True)["_s"].to_list()
    assert set(first[:10]) <= set(sim.tolist())  # the 10 latest arrivals
    assert len(set(sim.tolist()) - set(first[:10])) == 10
    assert (_simulated_new_songs(fit, cfg) == sim).all()  # seeded
    no_ts = _simulated_new_songs(fit.with_columns(pl.lit(float("nan")).alias("ts_s")), cfg)
    assert len(no_ts) == 20 and not set(first[:10]) <= set(no_ts.tolist())
