"""APEX popularity labels from interactions (features.apex_tables.labels_from_interactions)."""

from __future__ import annotations

import numpy as np
import polars as pl

from apex_rank.features.apex_tables import labels_from_interactions

SONGS = pl.DataFrame({"song_id": ["a", "b", "c", "d"], "genre": ["x", "y", "x", "y"]})
PLAYS = pl.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3"], "song_id": ["b", "b", "b", "d", "c"],
                      "weight": [1.0, 2.0, 1.0, 0.5, 0.0]})


def test_only_played_songs_are_labelled_in_catalogue_order() -> None:
    # a: never played; c: one play of weight 0, so unplayed too (unknown popularity, not zero)
    songs, counts = labels_from_interactions(SONGS, PLAYS)
    assert songs.equals(SONGS.filter(pl.col("song_id").is_in(["b", "d"])))
    np.testing.assert_array_equal(counts["streams"], [4.0, 0.5])
    np.testing.assert_array_equal(counts["likes"], [4.0, 0.5])


def test_a_count_of_users_and_likes_and_musicality_from_ratings() -> None:
    rated = PLAYS.with_columns(pl.Series("rating", [5, 4, 2, 1, 3]))
    songs, counts = labels_from_interactions(SONGS.select("song_id"), rated, plays=pl.col("user_id").n_unique(),
                                             likes_from_plays=False)
    assert songs["song_id"].to_list() == ["b", "c", "d"]
    np.testing.assert_array_equal(counts["streams"], [2.0, 1.0, 1.0])  # b: u1 twice and u2
    np.testing.assert_array_equal(counts["likes"], [2.0, 0.0, 0.0])  # ratings >= 4
    np.testing.assert_allclose(songs["musicality"].to_numpy(), [11 / 3, 3.0, 1.0])


def test_likes_are_left_out_without_ratings_when_asked() -> None:
    _, counts = labels_from_interactions(SONGS, PLAYS, likes_from_plays=False)
    assert set(counts) == {"streams"}
