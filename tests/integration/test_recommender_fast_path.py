"""The array serving path equals the frame path it replaced.

``rank_arrays`` (as a frame: ``ranked_frame``) runs on ``candidate_arrays`` / ``feature_array`` /
``Reranker.score_matrix``; ``generate_candidates`` / ``build_feature_frame`` / ``Reranker.score``
wrap the same functions in frames for training and batch work. The reference below is the frame
pipeline with the polars top-k the serving path used before it ran on arrays: ids, order,
sources and scores must match.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from apex_rank.ranking.candidates import (
    RANK_COLUMNS,
    SOURCE_ORDER,
    candidate_arrays,
    candidate_positions,
    generate_candidates,
)
from apex_rank.ranking.pipeline import rank_arrays, ranked_frame
from apex_rank.ranking.rerank_features import (
    FEATURES,
    GAP_COLUMNS,
    RECENT,
    _rowdot,
    build_feature_frame,
    feature_array,
    feature_matrix,
)
from apex_rank.ranking.reranker import select_top_k, user_draws
from apex_rank.ranking.state import UserState
from apex_rank.threads import using_threads
from tests.integration.test_recommender_fixtures import recommender


def _frame_reference(states: list[UserState], k: int, excludes: list[set[str]]) -> pl.DataFrame:
    """Frame pipeline + polars top-k (the serving path before arrays)."""
    rec = recommender()
    cands = generate_candidates(states, rec.sources, rec.config.candidates, excludes=excludes, min_per_source=k)
    feats = build_feature_frame(states, cands, rec.songs)
    scores = rec.reranker.score(feats)
    return (
        feats.select("user_id", "song_id", "source")
        .with_columns(pl.Series("score", scores, dtype=pl.Float64))
        .sort(["user_id", "score", "song_id"], descending=[False, True, False])
        .with_columns((pl.int_range(pl.len()).over("user_id") + 1).cast(pl.Int32).alias("rank"))
        .filter(pl.col("rank") <= k)
    )


def test_array_path_equals_frame_path() -> None:
    rec = recommender()
    users = rec.user_ids[:40]
    states = [rec.user_state(u) for u in users]
    excludes = [set(rec.user_state(users[(i + 1) % len(users)]).history[:3]) for i in range(len(users))]
    with using_threads(1):
        for k in (1, 20, 150):
            got = ranked_frame(rank_arrays(states, k, rec.sources, rec.songs, rec.reranker, rec.config.candidates,
                                           excludes=excludes), states, rec.songs)
            ref = _frame_reference(states, k, excludes)  # pure score order (no new-song floor)
            assert got["user_id"].to_list() == ref["user_id"].to_list(), k
            assert got["song_id"].to_list() == ref["song_id"].to_list(), k
            assert got["source"].to_list() == ref["source"].to_list(), k
            assert got["rank"].to_list() == ref["rank"].to_list(), k
            np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), rtol=0, atol=1e-6)
            # single users equal their rows of the batch (served with the build's new-song floor)
            got = ranked_frame(rank_arrays(states, k, rec.sources, rec.songs, rec.reranker, rec.config.candidates,
                                           excludes=excludes, min_cold_share=rec.min_cold_share), states, rec.songs)
            for i, u in enumerate(users[:5]):
                one = rec.recommend(u, k=k, exclude=excludes[i])
                part = got.filter(pl.col("user_id") == u).drop("user_id")
                assert one["song_id"].to_list() == part["song_id"].to_list()
                np.testing.assert_allclose(one["score"].to_numpy(), part["score"].to_numpy(), rtol=0, atol=1e-6)


def test_frame_wrappers_share_the_array_functions() -> None:
    """generate_candidates / build_feature_frame are the array functions in frame form."""
    rec = recommender()
    states = [rec.user_state(u) for u in rec.user_ids[:15]]
    rows, ids, best, R = candidate_arrays(states, rec.sources, rec.config.candidates, min_per_source=20)
    cands = generate_candidates(states, rec.sources, rec.config.candidates, min_per_source=20)
    assert cands["song_id"].to_list() == ids.tolist()
    assert cands["user_id"].to_list() == [states[r].user_id for r in rows]
    assert cands["source"].to_list() == [SOURCE_ORDER[b] for b in best]
    ranks = cands.select(RANK_COLUMNS).fill_null(0).to_numpy()
    np.testing.assert_array_equal(ranks, R)
    # each row's best source ranked it at its best rank
    assert (R[np.arange(len(R)), best] == np.where(R > 0, R, np.iinfo(np.int32).max).min(axis=1)).all()
    frame = build_feature_frame(states, cands, rec.songs)
    X = feature_array(states, rows, rec.songs.index_of(ids.tolist()), np.where(R > 0, R, np.nan), rec.songs)
    assert X.dtype == np.float32 and X.shape == (len(rows), len(FEATURES))
    np.testing.assert_array_equal(feature_matrix(frame), X)
    assert list(frame.columns[:3]) == ["user_id", "song_id", "source"]
    with using_threads(1):
        np.testing.assert_array_equal(rec.reranker.score(frame), rec.reranker.score_matrix(X))


def test_positions_path_equals_id_path() -> None:
    """candidate_positions is candidate_arrays in catalogue positions, row for row."""
    rec = recommender()
    states = [rec.user_state(u) for u in rec.user_ids[:30]]
    rows, ids, best, R = candidate_arrays(states, rec.sources, rec.config.candidates, min_per_source=20)
    prow, pos, pbest, pR = candidate_positions(states, rec.sources, rec.config.candidates, rec.songs, min_per_source=20)
    np.testing.assert_array_equal(prow, rows)
    assert rec.songs.id_array[pos].tolist() == ids.tolist()
    np.testing.assert_array_equal(pbest, best)
    np.testing.assert_array_equal(pR, R)


def test_history_features_equal_the_per_user_means() -> None:
    """The batch's history means (one lookup, grouped sums) are bit-identical to a per-user
    ``mean(axis=0)``, with ids outside the catalogue and cold songs in the histories."""
    rec = recommender()
    st = rec.songs
    cold = [st.song_ids[i] for i in np.flatnonzero(~st.warm)[:3]]
    states = [rec.user_state(u) for u in rec.user_ids[:25]]
    t = states[0].last_seen_s
    assert np.isfinite(t)
    states[0] = UserState("x0", states[0].cf_factor, states[0].profile, ("nope", *states[0].history, "gone", *cold),
                          last_seen_s=t)
    states[1] = UserState("x1", states[1].cf_factor, None, ("nope",), last_seen_s=t)
    states[2] = UserState("x2", states[2].cf_factor, None, tuple(cold), last_seen_s=t)
    states[3] = UserState("x3", states[3].cf_factor, None, states[3].history)  # no time: no "recent"
    rows, ids, _, R = candidate_arrays(states, rec.sources, rec.config.candidates)
    s = st.index_of(ids.tolist())
    X = feature_array(states, rows, s, np.where(R > 0, R, np.nan), st)
    for i, x in enumerate(states):
        idx = st.index_of(x.history)
        hi = idx[idx >= 0]
        mean = st.priors[hi].mean(axis=0) if len(hi) else np.full(7, np.nan, np.float32)
        recent = idx[-RECENT:]
        recent = recent[(recent >= 0)]
        recent = recent[st.warm[recent]]
        m = rows == i
        gaps = X[m][:, [FEATURES.index(c) for c in GAP_COLUMNS]]
        np.testing.assert_array_equal(gaps, (st.priors[s[m]] - mean).astype(np.float32))
        got = X[m, FEATURES.index("recent_cf_sim")]
        if len(recent) and np.isfinite(x.last_seen_s):
            V = np.where(st.warm[s[m], None], st.cf_factors[s[m]], st.pseudo_factors[s[m]])
            want = _rowdot(np.repeat(st.cf_factors[recent].mean(axis=0)[None], m.sum(), axis=0), V)
            np.testing.assert_array_equal(got, want)
        else:
            assert np.isnan(got).all()


def test_top_k_of_the_contenders_equals_the_top_k_of_all() -> None:
    """rank_arrays sorts only each user's k best new and k best warm candidates: its lists equal
    a full sort of every candidate, with and without a new-song share or floor."""
    rec = recommender()
    states = [rec.user_state(u) for u in rec.user_ids[:40]]
    st = rec.songs
    with using_threads(1):
        for k, share, floor in ((5, None, 0.0), (10, 0.3, 0.0), (10, None, 0.2), (20, 1.0, 0.0), (3, 0.5, 0.0)):
            got = rank_arrays(states, k, rec.sources, st, rec.reranker, rec.config.candidates, cold_share=share,
                              min_cold_share=floor)
            rows, pos, _, R = candidate_positions(states, rec.sources, rec.config.candidates, st, min_per_source=k)
            scores = rec.reranker.score_matrix(feature_array(states, rows, pos, np.where(R > 0, R, np.nan), st))
            order = np.lexsort((st.id_rank[pos], -scores, rows))  # user ids follow state order here
            if share is None:
                keep, rank = select_top_k(rows[order], ~st.warm[pos[order]], k, floor, floor=True,
                                          draws=user_draws([x.user_id for x in states])[rows[order]])
            else:
                keep, rank = select_top_k(rows[order], ~st.warm[pos[order]], k, share)
            np.testing.assert_array_equal(got.song, pos[order[keep]])
            np.testing.assert_array_equal(got.rank, rank)
            assert got.song_id.tolist() == st.id_array[pos[order[keep]]].tolist()
