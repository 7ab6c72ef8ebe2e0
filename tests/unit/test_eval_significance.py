"""Significance: Holm by hand, paired tests on known differences, seeded bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from apex_rank.errors import SchemaError
from apex_rank.offline_eval.significance import compare_to_reference, holm, paired_test


def test_holm_hand_computed() -> None:
    # sorted p: 0.01, 0.02, 0.04 → 3·0.01=0.03, 2·0.02=0.04, 1·0.04=0.04 (monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_paired_test_detects_a_real_difference_and_not_a_null_one() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(300)
    a = b + 0.05 + 0.05 * rng.normal(size=300)
    res = paired_test(a, b, n_permutations=2000, n_bootstrap=500, seed=1)
    assert res["p_randomization"] < 0.01 and res["p_t"] < 1e-6
    assert res["ci95_low"] > 0 and res["ci95_low"] < res["mean_diff"] < res["ci95_high"]
    d = a - b
    assert res["effect_size_dz"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert res["p_t"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    null = paired_test(b + 0.01 * rng.normal(size=300), b, n_permutations=2000, n_bootstrap=500, seed=1)
    assert null["p_randomization"] > 0.01
    assert paired_test(a, b, n_permutations=2000, n_bootstrap=500, seed=1) == res  # seeded


def test_compare_to_reference_adds_holm_and_rejects_bad_shapes() -> None:
    rng = np.random.default_rng(2)
    base = rng.random(200)
    per_user = {"hybrid": base + 0.1, "pop": base, "als": base + 0.1 + 1e-3 * rng.normal(size=200)}
    res = compare_to_reference(per_user, "hybrid", n_permutations=1000, n_bootstrap=200)
    assert res["pop"]["significant"] is True and res["als"]["significant"] is False
    assert res["pop"]["p_holm"] >= res["pop"]["p_randomization"]
    with pytest.raises(SchemaError, match="one length"):
        paired_test(np.zeros(3), np.zeros(4))
    with pytest.raises(SchemaError, match="reference model 'x'"):
        compare_to_reference(per_user, "x")
