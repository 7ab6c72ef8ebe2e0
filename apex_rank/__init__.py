"""apex-rank: cold-start ranking for AI-generated music.

The core (this package) holds config, errors, device and thread handling, the APEX model, its
trainer and predictor. The stages live in sub-packages installed under this name:
``apex_rank.features`` (audio → embeddings, targets), ``apex_rank.ranking`` (FAISS, CF,
reranker, Recommender, online ranker) and ``apex_rank.offline_eval`` (splits, metrics, reports).

Heavy pieces are re-exported lazily (PEP 562), so ``import apex_rank`` stays light.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from apex_rank.errors import (
    ApexRankError,
    ArtifactError,
    AudioError,
    CheckpointError,
    ConfigError,
    DeviceError,
    MissingDependencyError,
    NotFittedError,
    SchemaError,
    StoreError,
    UnknownIdError,
)
from apex_rank.tasks import AESTHETIC_TASKS, APEX_TASKS, POPULARITY_TASKS

__version__ = "0.1.0"

# The strict editable install (README) puts a folder of links on sys.path in which features/,
# ranking/ and offline_eval/ sit under apex_rank/. Run from the repository root, this folder (the
# core alone) is found first; extending __path__ lets apex_rank.ranking & co. come from the links.
# With a wheel or the default editable install there is one apex_rank folder and nothing changes.
__path__ = pkgutil.extend_path(__path__, __name__)

# name -> module that defines it; resolved on first attribute access.
_LAZY: dict[str, str] = {
    "ApexHead": "apex_rank.model",
    "FusedApexHead": "apex_rank.model",
    "ApexPredictor": "apex_rank.predictor",
    "ApexTrainer": "apex_rank.training",
    "TrainConfig": "apex_rank.training",
    "resolve_device": "apex_rank.device",
    "configure_threads": "apex_rank.threads",
    "load_config": "apex_rank.config",
    "regression_metrics": "apex_rank.metrics",
    "PopularityTransform": "apex_rank.features.targets",
    "Recommender": "apex_rank.ranking.recommender",
    "load_recommender": "apex_rank.ranking.recommender",
    "OnlineRanker": "apex_rank.ranking.online",
}

__all__ = [
    "AESTHETIC_TASKS", "APEX_TASKS", "POPULARITY_TASKS", "ApexRankError", "ArtifactError", "AudioError",
    "CheckpointError", "ConfigError", "DeviceError", "MissingDependencyError", "NotFittedError",
    "SchemaError", "StoreError", "UnknownIdError", *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'apex_rank' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
