"""The two pieces of state the per-user path reads: :class:`UserState` and :class:`SongTable`.

``UserState`` is everything about one user that candidate generation and the feature frame
need (a CF factor, a content profile, the history, an activity count). The Recommender builds
it from its interactions; an online ranker can build the same object from Redis. ``SongTable``
is the song side (dense arrays aligned with one id list): normalised embeddings, CF factors of
warm songs, pseudo factors, APEX priors, train popularity, release time. Both are plain data;
the functions that read them (``generate_candidates``, ``build_feature_frame``) are pure.

Example
-------
>>> import numpy as np
>>> s = user_state_from_history("u1", ["a", "b"], ts=[1.0, 2.0], song_table=None, cf_factor=None)
>>> s.history, s.activity
(('a', 'b'), 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from apex_rank.errors import SchemaError
from apex_rank.ranking.index import l2_normalize
from apex_rank.tasks import APEX_TASKS


@dataclass(frozen=True)
class UserState:
    """One user's state.

    Attributes
    ----------
    user_id: the user's id.
    cf_factor: (f,) float32 CF factor, or None (no CF history).
    profile: (d,) float32 L2-normalised content profile (recency-weighted mean of history
        embeddings), or None (empty history).
    history: song ids the user consumed (never recommended back).
    activity: number of interactions.
    last_seen_s: time of the user's latest interaction (epoch seconds; NaN unknown): the
        user's own "now", from which song ages are measured (see ``age_days`` in
        :mod:`~apex_rank.ranking.features`).
    """

    user_id: str
    cf_factor: np.ndarray | None
    profile: np.ndarray | None
    history: tuple[str, ...] = ()
    activity: int = 0
    last_seen_s: float = float("nan")

    @property
    def is_unknown(self) -> bool:
        """True when nothing personal is known: the popularity-and-quality fallback applies."""
        return self.cf_factor is None and self.profile is None


@dataclass
class SongTable:
    """Song-side arrays aligned with ``song_ids`` (n songs).

    Attributes
    ----------
    song_ids: dense order of the catalogue.
    embeddings: (n, d) float32, L2-normalised content embeddings.
    cf_factors: (n, f) float32 CF factors (zeros for cold songs).
    warm: (n,) bool, the song has a CF factor.
    pseudo_factors: (n, f) float32 content→CF pseudo factors.
    priors: (n, 7) float32 APEX priors in ``APEX_TASKS`` order (NaN for untrained tasks).
    popularity: (n,) float32 interaction counts in the CF training data.
    created_s: (n,) float64 release time in epoch seconds (NaN unknown).
    quality: (n,) float32 popularity-and-quality score (fallback and fresh ranking).
    now_s: reference time of ages (end of the CF training data), epoch seconds.
    prior_mean, prior_std: (7,) statistics used to standardise priors in ``quality``.
    """

    song_ids: list[str]
    embeddings: np.ndarray
    cf_factors: np.ndarray
    warm: np.ndarray
    pseudo_factors: np.ndarray
    priors: np.ndarray
    popularity: np.ndarray
    created_s: np.ndarray
    quality: np.ndarray
    now_s: float
    prior_mean: np.ndarray
    prior_std: np.ndarray
    _pos: dict[str, int] = field(default_factory=dict, repr=False)
    _frame: pl.DataFrame | None = field(default=None, repr=False)
    popularity_scale: float = field(default=1.0, init=False)
    cold_fraction: float = field(default=0.0, init=False)
    id_array: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object), init=False, repr=False)
    id_rank: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), init=False, repr=False)

    def __post_init__(self) -> None:
        self.reindex()

    def reindex(self) -> None:
        """Rebuild the id lookups, ``popularity_scale`` (1 + the mean count of warm songs) and
        ``cold_fraction`` (share of songs without a CF factor).

        ``id_array`` is ``song_ids`` as an object array (position → id for whole arrays of
        positions) and ``id_rank`` each song's place in song-id order: the ranking path carries
        positions and breaks ties by song id through it, without touching strings."""
        self._pos = {s: i for i, s in enumerate(self.song_ids)}
        self.id_array = np.asarray(self.song_ids, dtype=object).reshape(-1)
        self.id_rank = np.empty(len(self.song_ids), dtype=np.int64)
        self.id_rank[np.argsort(self.id_array, kind="stable")] = np.arange(len(self.song_ids))
        w = np.asarray(self.warm, dtype=bool)
        self.popularity_scale = 1.0 + (float(np.mean(self.popularity[w])) if w.any() else 0.0)
        self.cold_fraction = float(1.0 - w.mean()) if len(w) else 0.0
        self._frame = pl.DataFrame(
            {
                "song_id": pl.Series(self.song_ids, dtype=pl.String),
                "_idx": np.arange(len(self.song_ids), dtype=np.int64),
            }
        )

    def __len__(self) -> int:
        return len(self.song_ids)

    def index_of(self, song_ids: Sequence[str]) -> np.ndarray:
        """Dense index per id, -1 where the id is not in the table."""
        return np.asarray([self._pos.get(s, -1) for s in song_ids], dtype=np.int64)

    def index_frame(self) -> pl.DataFrame:
        """``song_id`` → ``_idx`` lookup frame (for joins)."""
        assert self._frame is not None  # set in __post_init__
        return self._frame

    def priors_frame(self) -> pl.DataFrame:
        """``song_id`` + the seven APEX prior columns."""
        cols: dict[str, object] = {"song_id": pl.Series(self.song_ids, dtype=pl.String)}
        for j, t in enumerate(APEX_TASKS):
            cols[t] = pl.Series(self.priors[:, j], dtype=pl.Float32).fill_nan(None)
        return pl.DataFrame(cols)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez`` (allow_pickle=False)."""
        return {
            "song_ids": np.asarray(self.song_ids, dtype=str),
            "embeddings": self.embeddings,
            "cf_factors": self.cf_factors,
            "warm": self.warm,
            "pseudo_factors": self.pseudo_factors,
            "priors": self.priors,
            "popularity": self.popularity,
            "created_s": self.created_s,
            "quality": self.quality,
            "now_s": np.asarray(self.now_s),
            "prior_mean": self.prior_mean,
            "prior_std": self.prior_std,
        }

    @classmethod
    def from_arrays(cls, z: dict[str, np.ndarray]) -> SongTable:
        return cls(
            song_ids=z["song_ids"].tolist(),
            embeddings=z["embeddings"],
            cf_factors=z["cf_factors"],
            warm=z["warm"].astype(bool),
            pseudo_factors=z["pseudo_factors"],
            priors=z["priors"],
            popularity=z["popularity"],
            created_s=z["created_s"],
            quality=z["quality"],
            now_s=float(z["now_s"]),
            prior_mean=z["prior_mean"],
            prior_std=z["prior_std"],
        )

    def append(self, other: SongTable) -> None:
        """Append songs (same widths); ids must be new."""
        dup = [s for s in other.song_ids if s in self._pos]
        if dup:
            raise SchemaError(f"song_id {dup[0]!r} is already in the catalogue ({len(dup)} duplicates)")
        for name in (
            "embeddings",
            "cf_factors",
            "warm",
            "pseudo_factors",
            "priors",
            "popularity",
            "created_s",
            "quality",
        ):
            setattr(self, name, np.ascontiguousarray(np.concatenate([getattr(self, name), getattr(other, name)])))
        self.song_ids = self.song_ids + list(other.song_ids)
        self.reindex()


def history_positions(states: Sequence[UserState], song_table: SongTable) -> tuple[np.ndarray, np.ndarray]:
    """The states' histories as ``song_table`` positions, in one lookup for the whole batch:
    ``(indptr (b + 1,), positions)`` in CSR form, each history in its own order, -1 for ids
    outside the table."""
    lens = np.fromiter((len(x.history) for x in states), dtype=np.int64, count=len(states))
    indptr = np.r_[0, np.cumsum(lens)].astype(np.int64)
    return indptr, song_table.index_of([s for x in states for s in x.history])


def quality_score(priors: np.ndarray, popularity: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Popularity-and-quality score: mean standardised APEX prior plus 0.5·log1p(popularity).

    Untrained prior columns (NaN) are skipped. Deterministic given the stored statistics.
    """
    z = (priors - mean[None, :]) / np.where(std > 0, std, 1.0)[None, :]
    with np.errstate(invalid="ignore"):
        cols = np.isfinite(z).any(axis=0)
        q = np.nanmean(z[:, cols], axis=1) if cols.any() else np.zeros(len(priors))
    q = np.nan_to_num(q, nan=0.0)
    return (q + 0.5 * np.log1p(np.maximum(popularity, 0.0))).astype(np.float32)


def content_profile(
    embeddings: np.ndarray, ts: np.ndarray | None, weights: np.ndarray | None, *, now_s: float, half_life_days: float
) -> np.ndarray | None:
    """Recency-weighted mean of normalised history embeddings, L2-normalised; None if empty."""
    if embeddings.shape[0] == 0:
        return None
    w = np.ones(embeddings.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if ts is not None and half_life_days > 0:
        age_days = np.maximum(0.0, now_s - np.asarray(ts, dtype=np.float64)) / 86400.0
        w = w * np.power(0.5, np.nan_to_num(age_days, nan=0.0) / half_life_days)
    w = np.maximum(w, 0.0)
    if w.sum() <= 0:
        w = np.ones_like(w)
    prof = (embeddings.astype(np.float64) * w[:, None]).sum(axis=0) / w.sum()
    out = l2_normalize(prof[None, :].astype(np.float32))[0]
    return out if np.linalg.norm(out) > 0 else None


def user_state_from_history(
    user_id: str,
    song_ids: Sequence[str],
    *,
    ts: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    song_table: SongTable | None,
    cf_factor: np.ndarray | None,
    half_life_days: float = 30.0,
) -> UserState:
    """Build a :class:`UserState` from a history (songs outside ``song_table`` add no profile)."""
    hist = tuple(dict.fromkeys(song_ids))
    profile = None
    if song_table is not None and len(song_ids):
        idx = song_table.index_of(song_ids)
        keep = idx >= 0
        if keep.any():
            t = None if ts is None else np.asarray(ts, dtype=np.float64)[keep]
            w = None if weights is None else np.asarray(weights, dtype=np.float64)[keep]
            profile = content_profile(
                song_table.embeddings[idx[keep]], t, w, now_s=song_table.now_s, half_life_days=half_life_days
            )
    t_all = np.asarray([] if ts is None else ts, dtype=np.float64)
    last = float(np.nanmax(t_all)) if np.isfinite(t_all).any() else float("nan")
    return UserState(
        user_id, None if cf_factor is None else np.asarray(cf_factor, dtype=np.float32), profile, hist, len(song_ids),
        last
    )
