"""Shared, cached objects for the recommender tests (no tests here).

The world matches the ``small_world`` fixture; one APEX predictor and one Recommender are built
per test process and reused. Builds run with one thread: the test machine is shared, and
oversubscribed torch/LightGBM pools are several times slower than a single thread.
"""

from __future__ import annotations

import functools

import numpy as np
import polars as pl

from apex_rank.predictor import ApexPredictor
from apex_rank.ranking.candidates import CandidateConfig
from apex_rank.ranking.cf import CFConfig
from apex_rank.ranking.recommender import ApexFitConfig, Recommender, RecommenderConfig
from apex_rank.ranking.reranker import RerankerConfig
from apex_rank.synthetic import World, WorldConfig, make_world
from apex_rank.threads import using_threads

TEST_CONFIG = RecommenderConfig(
    cf=CFConfig(factors=16, iterations=10, regularization=0.05, alpha=10.0),
    candidates=CandidateConfig(als=80, content=60, pseudo_cf=60, fresh=30),
    reranker=RerankerConfig(n_estimators=120, early_stopping_rounds=20, num_leaves=15, learning_rate=0.08),
    apex=ApexFitConfig(epochs=12, patience=4),
    cf_grid=(),  # the CF settings above; the default grid search is exercised by the demo and e2e tests
)


@functools.cache
def world() -> World:
    return make_world(WorldConfig(n_songs=800, n_users=200, dim=32, interactions_per_user=30, seed=7))


@functools.cache
def train_interactions() -> pl.DataFrame:
    w = world()
    return w.interactions.filter(pl.col("ts") < w.cutoff)


@functools.cache
def apex() -> ApexPredictor:
    from apex_rank.features.apex_tables import build_apex_dataset, train_apex

    w = world()
    # trained on the songs played before the cutoff only: the cold songs' own popularity labels
    # would leak into their priors (the world labels every song, new ones included)
    played = train_interactions()["song_id"].unique()
    with using_threads(1):
        data = build_apex_dataset(w.songs.filter(pl.col("song_id").is_in(played.implode())), w.embeddings, seed=0)
        pred, _, _ = train_apex(data, TEST_CONFIG.apex.train_config(seed=0), encoder="synthetic")
    return pred


@functools.cache
def recommender() -> Recommender:
    """Built on the interactions before the world's cutoff: cold songs have no interactions."""
    w = world()
    with using_threads(1):
        return Recommender.build(w.songs, w.embeddings, train_interactions(), TEST_CONFIG, apex=apex())


def build(
    songs: pl.DataFrame, embeddings: pl.DataFrame, interactions: pl.DataFrame, config: RecommenderConfig = TEST_CONFIG
) -> Recommender:
    with using_threads(1):
        return Recommender.build(songs, embeddings, interactions, config, apex=apex())


def ndcg_at(ranked: list[str], targets: set[str], k: int = 10) -> float:
    """Binary-relevance NDCG@k."""
    dcg = sum(1.0 / np.log2(i + 2) for i, s in enumerate(ranked[:k]) if s in targets)
    idcg = sum(1.0 / np.log2(i + 2) for i in range(min(len(targets), k)))
    return dcg / idcg if idcg > 0 else 0.0
