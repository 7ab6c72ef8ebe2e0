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

from apex_rank.ranking.cf import CFModel

from .keys import UserRecord

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

    @property
    def data_until_s(self) -> float:
        """End of the bundle's training interactions (unix seconds): what was recorded online
        after it is carried onto a newly published version."""
        ...

    def rank_user(self, user_id: str, state: UserRecord | None, k: int,
                  exclude: Collection[str], cold_share: float | None = None) -> list[Item]:
        """Top-``k`` for a user state (``None``: unknown user, cold-user path); ``cold_share`` as in
        ``Recommender.recommend`` (None: the scores decide)."""
        ...

    def cold_shortfall(self, song_ids: Collection[str], k: int, cold_share: float | None) -> int:
        """New-song slots ``cold_share`` asked for that the list could not fill."""
        ...

    def fallback(self, k: int, exclude: Collection[str]) -> list[Item]:
        """Top-``k`` of the popularity-and-quality list (no store needed)."""
        ...

    def has_song(self, song_id: str) -> bool: ...

    def add_song(self, song_id: str, embedding: np.ndarray, priors: np.ndarray) -> None:
        """Make an ingested song rankable in this process with the given (7,) APEX priors, the
        ones stored in its song record; they are not predicted again."""
        ...

    @property
    def cf_model(self) -> CFModel:
        """The bundle's CF model (the factors the warm-up steps run against)."""
        ...

    def warm_songs(self, song_ids: list[str], factors: np.ndarray, plays: np.ndarray, *,
                   replace: bool = False) -> int:
        """Give songs the bundle has no CF factor for their warmed factors ((n, f) float32) and
        play counts ((n,)), so they rank as warm songs (see :mod:`.warmup`); songs this engine
        lacks or that the bundle fitted are skipped. ``replace``: these are all the warmed
        songs (the ones warmed before and not named go back to cold). Returns songs applied."""
        ...

    def predict_priors(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, d) embeddings -> (n, 7) APEX priors, NaN for the tasks the predictor was not
        trained on; priors that are not finite where it was trained are a SchemaError."""
        ...

    def song_block(self) -> SongBlock: ...

    def user_records(self) -> Iterator[tuple[str, UserRecord]]: ...

    def n_users(self) -> int: ...

    def close(self) -> None:
        """Release background resources (the engine stays usable, without them)."""
        ...


class FallbackList:
    """A precomputed best-first list of (song_id, score, "fallback"); ``top`` is pure Python.

    Built once per loaded version from the bundle's popularity-and-quality scores, so the
    degraded path needs neither the store nor the model.
    """

    def __init__(self, ids: list[str], scores: np.ndarray, size: int) -> None:
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:size]
        self.items: list[Item] = [(ids[i], float(scores[i]), "fallback") for i in order]

    def top(self, k: int, exclude: Collection[str]) -> list[Item]:
        out: list[Item] = []
        for item in self.items:
            if item[0] not in exclude:
                out.append(item)
                if len(out) >= k:
                    break
        return out
