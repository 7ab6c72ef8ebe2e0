"""Planted-world quality: the hybrid ranks cold songs that ALS and popularity cannot.

Built on interactions before ``world.cutoff``; evaluated on each user's interactions after it,
with targets restricted to cold songs (released after the cut, no training interactions).
Two protocols: the full top-10 list (warm songs may take slots) and the cold slice (only cold
songs are ranked: warm songs excluded for every method).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tests.integration.test_recommender_fixtures import ndcg_at, recommender, train_interactions, world


def _targets() -> tuple[list[str], dict[str, set[str]], list[str], list[str]]:
    rec, w = recommender(), world()
    cold = [s for s, wm in zip(rec.songs.song_ids, rec.songs.warm) if not wm]
    warm = [s for s, wm in zip(rec.songs.song_ids, rec.songs.warm) if wm]
    test = w.interactions.filter((pl.col("ts") >= w.cutoff) & pl.col("song_id").is_in(cold))
    g = test.group_by("user_id").agg(pl.col("song_id"))
    targets = {u: set(s) for u, s in zip(g["user_id"].to_list(), g["song_id"].to_list()) if rec.has_user(u)}
    return sorted(targets), targets, cold, warm


def test_hybrid_beats_als_and_popularity_on_cold_targets() -> None:
    rec = recommender()
    users, targets, cold, warm = _targets()
    assert len(users) >= 100
    # full list
    b = rec.recommend_batch(users, k=10)
    lists = {u: df["song_id"].to_list() for (u,), df in b.group_by("user_id")}
    hybrid = float(np.mean([ndcg_at(lists.get(u, []), targets[u]) for u in users]))
    ids, _ = rec.cf.recommend_batch(users, 10)
    als = float(np.mean([ndcg_at([s for s in ids[i] if s], targets[u]) for i, u in enumerate(users)]))
    pop_order = rec.popularity.sort(["count", "song_id"], descending=[True, False])["song_id"].to_list()

    def pop_list(u: str, allowed: set[str] | None = None) -> list[str]:
        hist = set(rec.user_state(u).history)
        return [s for s in pop_order if s not in hist and (allowed is None or s in allowed)][:10]

    pop = float(np.mean([ndcg_at(pop_list(u), targets[u]) for u in users]))
    # cold slice: every method ranks only cold songs
    warm_set, cold_set = set(warm), set(cold)
    hybrid_cold = float(
        np.mean([ndcg_at(rec.recommend(u, k=10, exclude=warm_set)["song_id"].to_list(), targets[u]) for u in users])
    )
    pop_cold = float(np.mean([ndcg_at(pop_list(u, cold_set), targets[u]) for u in users]))
    print(
        f"cold-target NDCG@10 full list: hybrid {hybrid:.4f} als {als:.4f} popularity {pop:.4f}; "
        f"cold slice: hybrid {hybrid_cold:.4f} popularity {pop_cold:.4f} (als cannot rank cold songs: 0)"
    )
    assert als == 0.0  # ALS has no factor for a cold song
    assert hybrid >= 0.01 and hybrid >= max(als, pop) + 0.01
    assert hybrid_cold >= 0.15 and hybrid_cold >= 3.0 * pop_cold + 0.1


def test_build_simulates_new_songs_and_reports_candidate_recall() -> None:
    """Reranker training holds a share of played songs out of the training side (their later
    plays stay labels), so the training groups hold new songs at the base rate a new song is
    played; songs nobody played are left out of them; each source's recall is reported."""
    rec = recommender()
    r = rec.report
    n_played = train_interactions()["song_id"].n_unique()
    assert r["n_simulated_new_songs"] == round(0.2 * r["n_fit_songs"]) and r["n_simulated_new_songs"] > 0
    assert r["n_never_played_songs"] == len(rec.songs) - n_played
    rc = r["candidate_recall"]
    assert 0 < rc["als"] <= rc["union"] <= 1 and 0 < rc["pseudo_cf"] <= rc["union"]
    assert r["n_rerank_positives"] <= rc["n_positive_pairs"]
    assert r["n_rerank_positives"] == round(rc["union"] * rc["n_positive_pairs"])
    # the new-song floor: the largest floor keeping half the reranker's validation margin over
    # the ALS order, scaled to this catalogue's share of new songs
    ex = r["exposure"]
    als, trees, trials = ex["trials"][0], ex["trials"][1], ex["trials"][1:]
    assert als["model"] == "als_order" and trees["min_cold_share"] == 0.0

    def keeps(t: dict) -> bool:
        return all(t[m] >= als[m] + 0.5 * max(trees[m] - als[m], 0.0) for m in ("ndcg_all", "ndcg_warm"))

    assert max(t["min_cold_share"] for t in trials if keeps(t)) == ex["min_cold_share"]
    assert ex["min_cold_share"] > 0  # this world has a margin to spend on new songs
    frac = float((~rec.songs.warm).mean())
    assert rec.min_cold_share == pytest.approx(ex["min_cold_share"] * min(1.0, frac / ex["train_cold_fraction"]))


def test_cold_share_gives_new_songs_their_slots_in_score_order() -> None:
    rec = recommender()
    users, targets, cold, _ = _targets()
    for share in (0.0, 0.3, 0.6):
        b = rec.recommend_batch(users, k=10, cold_share=share)
        per_user = b.group_by("user_id").agg(pl.col("is_cold").mean().alias("c"), pl.len().alias("n"))
        assert (per_user["n"] == 10).all()
        assert abs(per_user["c"].mean() - share) <= 0.2 * share + 1e-9  # within ±20 % of the asked share
        # placed by score, not appended: every list is in descending score order
        assert b.group_by("user_id").agg((pl.col("score").diff().drop_nulls() <= 0).all().alias("ok"))["ok"].all()
        assert b.equals(pl.concat([rec.recommend(u, k=10, cold_share=share).select(
            pl.lit(u).alias("user_id"), pl.all()) for u in users]))
    # the new-song slots hold the user's best-scored new songs
    u = users[0]
    best_cold = rec.recommend(u, k=10, cold_share=1.0)["song_id"].head(3).to_list()  # same candidates (same k)
    assert rec.recommend(u, k=10, cold_share=0.3).filter(pl.col("is_cold"))["song_id"].to_list() == best_cold
    # cold targets are ranked at least as well as with the model's own choice
    lists = {u: df["song_id"].to_list() for (u,), df in rec.recommend_batch(users, k=10, cold_share=0.3)
             .group_by("user_id")}
    assert np.mean([ndcg_at(lists[u], targets[u]) for u in users]) > 0.01


def test_cold_share_shortfall_fills_with_warm_songs_and_is_logged(caplog) -> None:  # type: ignore[no-untyped-def]
    from apex_rank.errors import ConfigError

    rec = recommender()
    u = rec.user_ids[0]
    n_cold = int((~rec.songs.warm).sum())
    k = n_cold + 40  # more slots asked for new songs than there are new songs
    with caplog.at_level("WARNING"):
        out = rec.recommend(u, k=k, cold_share=1.0)
    assert out.height == k and 0 < int(out["is_cold"].sum()) <= n_cold
    assert "fewer new songs than asked" in caplog.text
    for bad in (1.5, -0.1, float("nan"), True, "0.3"):
        with pytest.raises(ConfigError, match="cold_share must be a number in"):
            rec.recommend(u, k=10, cold_share=bad)  # type: ignore[arg-type]


def test_sparse_catalogue_item_cold_hybrid_keeps_als_on_warm_and_beats_every_input() -> None:
    """A sparse long-tail catalogue under the natural item-cold protocol (each user's latest 25 %
    is the test, 20 % of songs lose their earlier plays). Song ages used to be taken at the
    table's end while the reranker learned on each user's latest plays, which end long before
    it: every song looked older when serving than in training and the hybrid flooded the top
    with new songs (warm NDCG@10 0.084 against ALS's 0.122). Ages are now taken at each user's
    latest interaction (measured: warm 0.206, all 0.189; a second world and split seed: 0.177,
    0.165 against ALS 0.109, 0.083). Floors leave room for the seed spread."""
    from apex_rank.offline_eval.datasets import EvalDataset
    from apex_rank.offline_eval.protocols import RankingEvalConfig, evaluate_ranking
    from apex_rank.synthetic import WorldConfig, make_world

    w = make_world(WorldConfig(n_users=2000, n_songs=6000, interactions_per_user=20, temperature=0.3))
    r = evaluate_ranking(EvalDataset("sparse", w.songs, w.embeddings, w.interactions),
                         RankingEvalConfig(split="item-cold", seed=42, ks=(10,), models=("als", "content", "hybrid"),
                                           n_permutations=200, n_bootstrap=100))
    m = {name: {s: v["ndcg@10"] for s, v in res.items()} for name, res in r["models"].items()}
    assert 0.15 < r["split"]["test_cold_share"] < 0.25  # the natural share, not the 81 % of old
    assert m["hybrid"]["warm"] >= 1.2 * m["als"]["warm"]
    assert m["hybrid"]["all"] >= 1.3 * max(m["als"]["all"], m["content"]["all"])


def test_surge_of_new_releases_hybrid_passes_the_three_checks() -> None:
    """A world whose releases surge after the cut (half the catalogue released in the last 30%
    of the time; new-releases split: 34% of the test plays go to new songs). Placed by score,
    the floor's new songs sat low in the list and the hybrid lost new-song targets to content
    (0.063 vs 0.083) while winning the rest; spread over the list, and trained on new releases
    among its simulated new songs, it passes all three checks (seed 42: all 0.140 vs content
    0.088, warm 0.125 vs ALS 0.089, new-song targets 0.084 vs content 0.083; seed 43: 0.135,
    0.117, 0.086). The new-song floor sits just under the seed spread, the others far below."""
    from apex_rank.offline_eval.datasets import EvalDataset
    from apex_rank.offline_eval.protocols import RankingEvalConfig, evaluate_ranking
    from apex_rank.synthetic import WorldConfig, make_world

    w = make_world(WorldConfig(n_users=3000, cold_share=0.5))
    r = evaluate_ranking(EvalDataset("surge", w.songs, w.embeddings, w.interactions),
                         RankingEvalConfig(split="new-releases", seed=42, ks=(10,), models=("als", "content", "hybrid"),
                                           n_permutations=200, n_bootstrap=100))
    m = {name: {s: v["ndcg@10"] for s, v in res.items()} for name, res in r["models"].items()}
    assert 0.3 < r["split"]["test_cold_share"] < 0.4
    assert m["hybrid"]["all"] >= 1.3 * max(m["als"]["all"], m["content"]["all"])
    assert m["hybrid"]["warm"] >= 1.2 * m["als"]["warm"]
    assert m["hybrid"]["cold"] >= 0.97 * m["content"]["cold"] > 0
    assert r["models"]["hybrid"]["all"]["cold_share@10"] >= 0.35  # new songs are a third of the plays
