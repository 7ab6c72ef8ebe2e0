"""The APEX stage of ``apex-rank demo``: the multi-task head trained (small-catalogue recipe,
with a progress bar) on the synthetic songs' labels and saved under ``out/apex``."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

from apex_rank.cli.apex_cmds import format_metrics
from apex_rank.features.apex_tables import build_apex_dataset, train_apex
from apex_rank.predictor import ApexPredictor
from apex_rank.ranking.recommender import ApexFitConfig
from apex_rank.synthetic import World


def apex_stage(world: World, out: Path, *, seed: int = 0) -> Generator[str, None, ApexPredictor]:
    """Train, save to ``out/apex`` and yield the test metrics table; return the predictor."""
    data = build_apex_dataset(world.songs, world.embeddings, seed=seed)
    predictor, metrics, _ = train_apex(data, ApexFitConfig().train_config(seed, progress=True),
                                       encoder="synthetic")
    predictor.save(out / "apex")
    yield format_metrics(metrics)
    yield f"   predictor saved to {out / 'apex'}"
    return predictor
