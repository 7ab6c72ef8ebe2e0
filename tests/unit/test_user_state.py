"""The one user state and its one profile algorithm (ranking/state.py): the incremental update
reproduces the half-life mean the build computes for many users at once, event by event, in any
arrival order, to float rounding."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from apex_rank.ranking.index import l2_normalize
from apex_rank.ranking.state import UserState, apply_event, recency_weights, user_state_from_history

DAY = 86400.0
NOW = 1.7e9


class Songs:
    """The part of a SongTable the state reads: normalised embeddings and an id lookup."""

    def __init__(self, n: int, d: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.embeddings = l2_normalize(rng.normal(size=(n, d)).astype(np.float32))
        self.song_ids = [f"s{i}" for i in range(n)]
        self.now_s = NOW

    def __len__(self) -> int:
        return len(self.song_ids)

    def index_of(self, ids: list[str]) -> np.ndarray:
        pos = {s: i for i, s in enumerate(self.song_ids)}
        return np.asarray([pos.get(s, -1) for s in ids], dtype=np.int64)


def events(seed: int, n: int = 60) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    songs = [f"s{i}" for i in rng.integers(0, 25, n)]
    ts = NOW - rng.uniform(0, 120 * DAY, n)
    weights = rng.choice([1.0, 2.0, 0.0, 0.5], n)
    return songs, ts, weights


def half_life_mean(table: Songs, songs: list[str], ts: np.ndarray, weights: np.ndarray, ref: float,
                   half_life_days: float) -> np.ndarray:
    """The profile written out: the normalised recency-weighted sum of the embeddings."""
    w = recency_weights(ts, weights, ref, half_life_days)
    total = (w[:, None] * table.embeddings[table.index_of(songs)].astype(np.float64)).sum(axis=0)
    return l2_normalize(total[None, :].astype(np.float32))[0]


@pytest.mark.parametrize("half_life_days", [30.0, 7.0, 0.0])
def test_incremental_update_equals_the_half_life_mean_in_any_arrival_order(half_life_days: float) -> None:
    table = Songs(25, 16, seed=1)
    songs, ts, weights = events(seed=2)
    want = half_life_mean(table, songs, ts, weights, NOW, half_life_days)
    for order in (np.argsort(ts), np.arange(len(ts)), np.random.default_rng(3).permutation(len(ts))):
        st = UserState("u", None, None, profile_mass=0.0, profile_ref_s=NOW)
        for i in order.tolist():
            st = apply_event(st, songs[i], table.embeddings[table.index_of([songs[i]])[0]], float(weights[i]),
                             float(ts[i]), half_life_days=half_life_days)
        assert st.profile is not None
        np.testing.assert_allclose(st.profile, want, atol=2e-6)
        assert st.activity == len(songs) and st.last_seen_s == ts.max()
        per_song = pl.DataFrame({"s": songs, "w": weights}).group_by("s").agg(pl.col("w").sum())
        assert dict(zip(st.history, st.history_weights, strict=True)) == dict(per_song.iter_rows())


def test_ages_count_from_the_reference_and_a_skip_moves_only_history_and_time() -> None:
    e = np.eye(3, dtype=np.float32)
    st = UserState("u", None, None, profile_mass=0.0, profile_ref_s=NOW)  # the bundle's now_s
    st = apply_event(st, "a", e[0], 1.0, NOW - 30 * DAY, half_life_days=30.0)  # one half-life old
    st = apply_event(st, "b", e[1], 1.0, NOW, half_life_days=30.0)
    np.testing.assert_allclose(st.profile, l2_normalize(np.array([[0.5, 1.0, 0.0]], np.float32))[0], rtol=1e-6)
    assert st.profile_ref_s == NOW and st.profile_mass == pytest.approx(np.hypot(0.5, 1.0))
    later = apply_event(st, "c", e[2], 2.0, NOW + 10 * DAY, half_life_days=30.0)  # after the reference: age 0
    np.testing.assert_allclose(later.profile, l2_normalize(np.array([[0.5, 1.0, 2.0]], np.float32))[0], rtol=1e-6)
    skipped = apply_event(st, "c", e[0], 0.0, NOW + 31 * DAY, half_life_days=30.0)
    np.testing.assert_allclose(skipped.profile, st.profile, rtol=1e-6)
    assert skipped.history == ("a", "b", "c") and skipped.activity == 3 and skipped.last_seen_s == NOW + 31 * DAY
    only_skips = apply_event(UserState("v", None, None, profile_mass=0.0), "a", e[0], 0.0, NOW, half_life_days=30.0)
    assert only_skips.profile is None and only_skips.history == ("a",) and only_skips.activity == 1


def test_history_keeps_first_interaction_order_and_the_bound_drops_the_earliest() -> None:
    e = np.ones(3, np.float32)
    st = UserState("u", None, None, profile_mass=0.0)
    for song, t in [("a", 1.0), ("b", 2.0), ("a", 3.0), ("c", 4.0), ("d", 5.0)]:
        st = apply_event(st, song, e, 1.0, NOW + t, half_life_days=30.0, history_len=3)
    assert st.history == ("b", "c", "d") and st.history_weights == (1.0, 1.0, 1.0)


def test_state_from_history_is_the_incremental_update_folded_in_time_order() -> None:
    table = Songs(25, 8, seed=4)
    songs, ts, weights = events(seed=5, n=30)
    st = user_state_from_history("u", [*songs, "not-in-catalogue"], ts=[*ts, NOW], weights=[*weights, 1.0],
                                 song_table=table, cf_factor=None)  # type: ignore[arg-type]
    np.testing.assert_allclose(st.profile, half_life_mean(table, songs, ts, weights, NOW, 30.0), atol=2e-6)
    first = list(dict.fromkeys(songs[i] for i in np.argsort(ts, kind="stable")))
    assert st.history == (*first, "not-in-catalogue") and st.activity == 31


def test_the_build_batch_equals_the_incremental_update_for_every_user() -> None:
    """``build.user_arrays`` (many users, one sparse product) and ``apply_event`` (one event at
    a time) are one algorithm: same profile, mass, reference time, history and weights."""
    from apex_rank.ranking.build import user_arrays

    table = Songs(25, 16, seed=6)
    rows = []
    for u in range(4):
        songs, ts, weights = events(seed=10 + u, n=20 + 5 * u)
        rows += [(f"u{u}", s, t, w) for s, t, w in zip(songs, ts, weights, strict=True)]
    rows.append(("only-skips", "s1", NOW - DAY, 0.0))
    inter = pl.DataFrame(rows, schema=["user_id", "song_id", "ts_s", "weight"], orient="row")
    inter = inter.with_columns(_s=pl.Series(table.index_of(inter["song_id"].to_list())))
    batch = user_arrays(inter, table, 30.0)  # type: ignore[arg-type]
    for user in batch.user_ids:
        mine = inter.filter(pl.col("user_id") == user)
        want = user_state_from_history(user, mine["song_id"].to_list(), ts=mine["ts_s"].to_list(),
                                       weights=mine["weight"].to_list(), song_table=table,  # type: ignore[arg-type]
                                       cf_factor=None)
        got = batch.state(user, table, NoCF())  # type: ignore[arg-type]
        assert got.history == want.history and got.activity == want.activity and got.last_seen_s == want.last_seen_s
        np.testing.assert_allclose(got.history_weights, want.history_weights)
        if want.profile is None:
            assert got.profile is None and user == "only-skips"
            continue
        assert got.profile is not None
        np.testing.assert_allclose(got.profile, want.profile, atol=2e-6)
        # the same sum, measured at each one's reference time
        scale = recency_weights(want.profile_ref_s, 1.0, got.profile_ref_s, 30.0)
        assert got.profile_mass == pytest.approx(want.profile_mass * float(scale), rel=1e-6)  # float32 profiles


class NoCF:
    def has_user(self, user_id: str) -> bool:
        return False
