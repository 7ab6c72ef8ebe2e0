"""The configs of the offline ``Recommender``: what ``build`` reads, what a bundle's manifest
stores and what serving reads back (``batch_users``, ``candidates``, ``reranker``).

Frozen dataclasses, loadable from TOML through :func:`apex_rank.config.from_dict` (unknown keys
rejected). They live apart from the modules that use them (:mod:`.build`, :mod:`.bundle`,
:mod:`.pipeline`, the :mod:`.recommender` facade) so that none of those has to import another
only for its config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from apex_rank.errors import ConfigError
from apex_rank.ranking.candidates import CandidateConfig
from apex_rank.ranking.cf import ALS_GRID, CFConfig
from apex_rank.ranking.reranker import RerankerConfig
from apex_rank.training import TrainConfig


@dataclass(frozen=True)
class IndexConfig:
    """FAISS factory strings of the content index (all songs) and the pseudo-CF index (cold songs)."""

    content_factory: str = "Flat"
    pseudo_factory: str = "Flat"
    nprobe: int = 16
    ef_search: int = 128


@dataclass(frozen=True)
class ApexFitConfig:
    """The small-catalogue APEX recipe: how ``build`` trains a predictor on the way when given
    none, and what the evaluation and the demo train with (one recipe, here)."""

    epochs: int = 60
    lr: float = 2e-3
    batch_size: int = 256
    patience: int = 15

    def train_config(self, seed: int, *, progress: bool = False) -> TrainConfig:
        """The :class:`~apex_rank.training.TrainConfig` of this recipe (CPU)."""
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, patience=self.patience,
                           seed=seed, device="cpu", progress=progress)


@dataclass(frozen=True)
class RecommenderConfig:
    """Everything ``Recommender.build`` needs; loadable from TOML (unknown keys rejected).

    Attributes
    ----------
    cf, index, candidates, reranker, apex: nested component configs.
    content_map_regularization: ridge λ of the content→CF map.
    rerank_share: each user's latest share of interactions (by ``ts``; seeded random rows
        without ``ts``) labels the reranker's training groups; the earlier rest is the fit part.
    half_life_days: recency half-life of the content profile.
    refit_on_all: refit CF, the map and user states on all interactions for serving.
    batch_users: users per chunk in batch scoring.
    seed: seeds the label rows without ``ts`` and the simulated new songs.
    cold_sim_share: share of the songs played in the fit part that are made new for reranker
        training: their fit-part plays are dropped from everything fitted on the training side
        (CF, content map, user states, popularity), their label-slice plays stay as labels.
        They reach the training groups exactly as a new song reaches a served user: no CF
        factor, out-of-sample pseudo factor, from the ``pseudo_cf``/``fresh``/``content``
        sources, at the base rate of plays a song has in one period (0 disables). Half are the
        latest songs to reach the catalogue (new releases), half a seeded random draw (songs
        whose history was lost); see ``build._simulated_new_songs``.
    cf_grid: ALS settings (overrides of ``cf``) tried on the training side; the one with the best
        NDCG@10 of plain ALS on the label slice is kept for both sides (empty: ``cf`` as given;
        only for ``cf.model == "als"``).
    """

    cf: CFConfig = field(default_factory=CFConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    apex: ApexFitConfig = field(default_factory=ApexFitConfig)
    content_map_regularization: float = 1.0
    rerank_share: float = 0.25
    half_life_days: float = 30.0
    refit_on_all: bool = True
    batch_users: int = 1000
    seed: int = 0
    cold_sim_share: float = 0.2
    cf_grid: tuple[dict[str, Any], ...] = ALS_GRID

    def __post_init__(self) -> None:
        if not 0.0 <= self.cold_sim_share < 1.0:
            raise ConfigError(f"cold_sim_share must be in [0, 1), got {self.cold_sim_share}")
        if not 0.0 < self.rerank_share < 1.0:
            raise ConfigError(f"rerank_share must be in (0, 1), got {self.rerank_share}")
        if self.batch_users < 1:
            raise ConfigError(f"batch_users must be >= 1, got {self.batch_users}")
        for point in self.cf_grid:
            try:
                replace(self.cf, **point)
            except TypeError as err:
                raise ConfigError(f"cf_grid entry {point!r} is not a set of cf settings: {err}") from None
