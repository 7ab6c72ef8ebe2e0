"""Ranking metrics: hand-computed cases and agreement with ranx on random inputs (1e-9)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from apex_rank.errors import SchemaError
from apex_rank.offline_eval.metrics import (
    cold_share,
    coverage,
    novelty,
    ranking_metrics,
    top_k_from_scores,
)


def test_hand_computed_single_user() -> None:
    # list: [3, 7, 1, 9, -1], relevant {7, 9, 42}: hits at ranks 2 and 4
    topk = np.array([[3, 7, 1, 9, -1]])
    m = ranking_metrics(topk, [np.array([7, 9, 42])], [1, 2, 5], n_items=50)
    dcg5 = 1 / math.log2(3) + 1 / math.log2(5)
    idcg5 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@5"][0] == pytest.approx(dcg5 / idcg5, abs=1e-12)
    assert m["ndcg@2"][0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)), abs=1e-12)
    assert m["ndcg@1"][0] == 0.0
    assert m["recall@5"][0] == pytest.approx(2 / 3)
    assert m["precision@5"][0] == pytest.approx(2 / 5)  # padding counts in the denominator
    assert m["map@5"][0] == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert m["mrr@5"][0] == pytest.approx(1 / 2)
    assert m["mrr@1"][0] == 0.0
    assert m["hitrate@2"][0] == 1.0 and m["hitrate@1"][0] == 0.0


def test_idcg_uses_min_of_k_and_relevant_count() -> None:
    topk = np.array([[0, 1, 2, 3]])
    m = ranking_metrics(topk, [np.array([0])], [4], n_items=4)
    assert m["ndcg@4"][0] == pytest.approx(1.0)
    assert m["map@4"][0] == pytest.approx(1.0)


def test_user_without_relevant_items_is_an_error() -> None:
    with pytest.raises(SchemaError, match="no relevant item"):
        ranking_metrics(np.array([[0, 1]]), [np.array([], dtype=np.int64)], [2], n_items=3)


def test_list_metrics_hand_computed() -> None:
    topk = np.array([[0, 1], [1, -1]])
    assert coverage(topk, 2, n_items=4) == pytest.approx(0.5)
    counts = np.array([3.0, 0.0, 1.0, 1.0])
    expected = np.mean([-math.log2(4 / 4), -math.log2(1 / 4), -math.log2(1 / 4)])
    assert novelty(topk, 2, counts, n_train_users=3) == pytest.approx(expected)
    assert cold_share(topk, 2, np.array([False, True, False, False])) == pytest.approx(2 / 3)


def test_top_k_from_scores_excludes_inf_and_breaks_ties_by_index() -> None:
    S = np.array([[0.5, 0.9, 0.5, -np.inf], [-np.inf, -np.inf, 1.0, -np.inf]])
    out = top_k_from_scores(S, 3)
    assert out.tolist() == [[1, 0, 2], [2, -1, -1]]
    allowed = np.array([True, False, True, True])
    assert top_k_from_scores(S, 2, allowed=allowed).tolist() == [[0, 2], [2, -1]]


def _ranx_check() -> None:
    """Compare with ranx (run in a subprocess with numba's JIT off: compiling ranx's kernels
    takes minutes on a loaded 2-core machine, the pure-Python path takes a second here)."""
    import ranx

    rng = np.random.default_rng(3)
    n_users, n_items, K = 60, 40, 25
    topk = np.stack([rng.permutation(n_items)[:K] for _ in range(n_users)])
    topk[:5, 20:] = -1  # some short lists (padding)
    relevant = [rng.choice(n_items, size=rng.integers(1, 12), replace=False) for _ in range(n_users)]
    ks = [1, 5, 10, 20]
    ours = ranking_metrics(topk, relevant, ks, n_items)
    # ranx returns per-query values in sorted query-id order: zero-pad the ids
    qrels = ranx.Qrels({f"q{u:04d}": {f"d{i}": 1 for i in relevant[u]} for u in range(n_users)})
    run = ranx.Run({f"q{u:04d}": {f"d{i}": float(K - j) for j, i in enumerate(topk[u]) if i >= 0}
                    for u in range(n_users)})
    names = {"ndcg": "ndcg", "recall": "recall", "precision": "precision", "map": "map", "mrr": "mrr",
             "hitrate": "hit_rate"}
    for ours_name, ranx_name in names.items():
        for k in ks:
            res = ranx.evaluate(qrels, run, f"{ranx_name}@{k}", return_mean=False, make_comparable=True)
            np.testing.assert_allclose(ours[f"{ours_name}@{k}"], np.asarray(res), atol=1e-9, rtol=0,
                                       err_msg=f"{ours_name}@{k}")


def test_agrees_with_ranx_on_random_inputs() -> None:
    pytest.importorskip("ranx")
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    code = "import tests.unit.test_eval_metrics as t; t._ranx_check(); print('ranx-ok')"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0 and "ranx-ok" in res.stdout, res.stderr[-3000:]
