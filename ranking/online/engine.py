"""The in-process half of online ranking: the ``RankingEngine`` contract and helpers.

An engine holds one published bundle's heavy state (FAISS index, CF item factors, reranker,
APEX predictor, song table), loaded explicitly from the bundle folder, and ranks for a user
state read from the store. The online ranker never imports model code itself: it asks an
engine. :class:`~.recommender_engine.RecommenderEngine` is the engine over the offline
``Recommender`` (same candidate generation, same feature frame, same reranker).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .store import UserRecord

Item = tuple[str, float, str]  # (song_id, score, source)


@dataclass
class SongBlock:
    """Song records of a bundle as arrays: ids (n,), priors (n, 7), popularity (n,),
    age_days (n,), is_cold (n,) bool, embeddings (n, d) float32."""

    ids: list[str]
    priors: np.ndarray
    popularity: np.ndarray
    age_days: np.ndarray
    is_cold: np.ndarray
    embeddings: np.ndarray


class RankingEngine(Protocol):
    """What the online layer needs from a loaded bundle."""

    bundle_dir: str
    fingerprint: str

    @property
    def embedding_dim(self) -> int: ...

    def rank_user(self, user_id: str, state: UserRecord | None, k: int,
                  exclude: Collection[str]) -> list[Item]:
        """Top-``k`` for a user state (``None``: unknown user, cold-user path)."""
        ...

    def fallback(self, k: int, exclude: Collection[str]) -> list[Item]:
        """Top-``k`` of the popularity-and-quality list (no store needed)."""
        ...

    def has_song(self, song_id: str) -> bool: ...

    def song_embedding(self, song_id: str) -> np.ndarray | None: ...

    def add_song(self, song_id: str, embedding: np.ndarray, priors: np.ndarray) -> None:
        """Make an ingested song rankable in this process."""
        ...

    def predict_priors(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, d) embeddings -> (n, 7) APEX priors."""
        ...

    def song_block(self) -> SongBlock: ...

    def user_records(self) -> Iterator[tuple[str, UserRecord]]: ...

    def n_users(self) -> int: ...


def popularity_quality_order(popularity: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Scores of the degraded-mode list: mean of the rank-normalised popularity, the two APEX
    popularity priors and the mean aesthetic prior (columns 2..6). Pure; (n,) float32."""
    n = popularity.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float32)

    def pct(x: np.ndarray) -> np.ndarray:
        r = np.empty(n, dtype=np.float64)
        r[np.argsort(x, kind="stable")] = np.arange(n)
        return r / max(1, n - 1)

    cols = [pct(np.log1p(np.maximum(popularity, 0))), pct(priors[:, 0]), pct(priors[:, 1]),
            pct(priors[:, 2:].mean(axis=1))]
    return np.mean(cols, axis=0).astype(np.float32)


class FallbackList:
    """A precomputed popularity-and-quality list; ``top(k, exclude)`` is pure Python."""

    def __init__(self, ids: list[str], popularity: np.ndarray, priors: np.ndarray, size: int) -> None:
        scores = popularity_quality_order(popularity, priors)
        order = np.argsort(-scores, kind="stable")[:size]
        self.items: list[Item] = [(ids[i], float(scores[i]), "fallback") for i in order]

    def top(self, k: int, exclude: Collection[str]) -> list[Item]:
        out: list[Item] = []
        for item in self.items:
            if item[0] not in exclude:
                out.append(item)
                if len(out) >= k:
                    break
        return out
