"""Popularity targets: percentile (average rank) → power, zeros, platforms, no leakage."""

from __future__ import annotations

import numpy as np
import pytest

from apex_rank import SchemaError
from apex_rank.features.targets import PopularityTransform


def test_hand_computed_percentiles_with_ties_and_zeros() -> None:
    train = np.array([0, 0, 3, 3, 10])
    t = PopularityTransform().fit(train)
    # ranks: 0,0 -> zeros pinned to 0; 3,3 share ranks 3 and 4 -> 3.5 -> (3.5-1)/4 = 0.625; 10 -> 1
    np.testing.assert_allclose(t.percentile(train), [0, 0, 0.625, 0.625, 1.0])


def test_monotone_and_within_range_on_new_values() -> None:
    rng = np.random.default_rng(0)
    t = PopularityTransform(gamma=2.0).fit(rng.poisson(50, size=1000))
    grid = np.linspace(0, 500, 2001)
    s = t.transform(grid)
    assert np.all(np.diff(s) >= 0)
    assert s.min() >= 0 and s.max() <= 100
    assert s[0] == 0 and s[-1] == 100


def test_gamma_is_a_power_of_the_percentile() -> None:
    train = np.arange(1, 101)
    p = PopularityTransform(gamma=1.0).fit(train).percentile([50])
    s = PopularityTransform(gamma=3.0).fit(train).transform([50])
    assert s[0] == pytest.approx(100 * p[0] ** 3)


def test_no_leakage_mapping_depends_on_training_counts_only() -> None:
    rng = np.random.default_rng(1)
    train = rng.poisson(20, 500)
    val_a = rng.poisson(20, 100)
    val_b = np.concatenate([val_a[:50], rng.poisson(200, 50)])  # very different rest of val
    t = PopularityTransform().fit(train)
    # a val song's score does not depend on what else is in val
    np.testing.assert_array_equal(t.transform(val_a)[:50], t.transform(val_b)[:50])
    t2 = PopularityTransform().fit(np.concatenate([train, val_b]))
    assert not np.allclose(t.transform(val_a), t2.transform(val_a))  # fitting on val would change it


def test_per_platform_percentiles_and_unknown_platform_fallback() -> None:
    counts = np.array([1, 2, 3, 100, 200, 300])
    plats = ["suno"] * 3 + ["udio"] * 3
    t = PopularityTransform().fit(counts, plats)
    np.testing.assert_allclose(t.percentile(counts, plats), [0, 0.5, 1, 0, 0.5, 1])
    pooled = t.percentile([100], ["riffusion"])
    assert pooled[0] == pytest.approx(0.6)  # 100 is rank 4 of 6 in the pooled counts -> 3/5


def test_null_counts_stay_missing_and_negative_counts_fail() -> None:
    t = PopularityTransform().fit([1, 2, np.nan, 4])
    assert np.isnan(t.transform([np.nan, 2])[0])
    with pytest.raises(SchemaError, match="negative"):
        t.transform([-1])
    with pytest.raises(SchemaError, match="negative"):
        PopularityTransform().fit([3, -2])


def test_round_trip_through_json_dict() -> None:
    t = PopularityTransform(gamma=0.5).fit([0, 4, 9, 9, 30], ["a", "a", "b", "b", "b"])
    again = PopularityTransform.from_dict(t.to_dict())
    x = [0, 5, 9, 100]
    np.testing.assert_array_equal(again.transform(x, ["a", "b", "b", "a"]), t.transform(x, ["a", "b", "b", "a"]))
