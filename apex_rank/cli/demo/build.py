"""The recommender stage of ``apex-rank demo``: build on the world's pre-cutoff interactions (so the
songs released after the cut are cold) and show two users' rankings with sources and priors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from apex_rank.predictor import ApexPredictor
from apex_rank.ranking.candidates import CandidateConfig
from apex_rank.ranking.cf import CFConfig
from apex_rank.ranking.recommender import Recommender, RecommenderConfig
from apex_rank.ranking.reranker import RerankerConfig
from apex_rank.synthetic import World

DEMO_CONFIG = RecommenderConfig(
    cf=CFConfig(factors=32, iterations=10),
    candidates=CandidateConfig(als=100, content=60, pseudo_cf=60, fresh=30),
    reranker=RerankerConfig(n_estimators=100, early_stopping_rounds=15, num_leaves=15, learning_rate=0.08),
)


def build_stage(world: World, predictor: ApexPredictor, bundle_dir: str | Path, *, k: int = 8) -> Iterator[str]:
    """Build, save to ``bundle_dir`` and yield printable lines (two users' top-k)."""
    t0 = time.perf_counter()
    train = world.interactions.filter(pl.col("ts") < world.cutoff)
    rec = Recommender.build(world.songs, world.embeddings, train, DEMO_CONFIG, apex=predictor)
    rec.save(bundle_dir)
    r = rec.report
    yield (
        f"   built on {train.height} interactions before {world.cutoff:%Y-%m-%d} in {time.perf_counter() - t0:.1f} s: "
        f"{r['n_warm_songs']} warm + {r['n_cold_songs']} cold songs (released after the cut), "
        f"reranker val NDCG@10 {r['reranker_val_ndcg']:.3f}; bundle in {bundle_dir}"
    )
    batch = rec.recommend_batch(rec.user_ids, k=k)
    per_user = batch.group_by("user_id", maintain_order=True).agg(pl.col("is_cold").sum().alias("n_cold"))
    users = per_user.sort(["n_cold", "user_id"], descending=[True, False])["user_id"].head(2).to_list()
    with pl.Config(tbl_rows=k, tbl_cols=-1, tbl_width_chars=160, float_precision=2, tbl_hide_dataframe_shape=True):
        for u in users:
            st = rec.user_state(u)
            yield f"   user {u} ({st.activity} plays): top {k}"
            table = batch.filter(pl.col("user_id") == u).drop("user_id")
            yield "\n".join("   " + line for line in str(table).splitlines())
    imp = rec.reranker.feature_importance().head(5)
    yield "   reranker's top features by gain: " + ", ".join(imp["feature"].to_list())
