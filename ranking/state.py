"""The two pieces of state the per-user path reads: :class:`UserState` and :class:`SongTable`.

``UserState`` is everything about one user that candidate generation and the feature frame
need (a CF factor, a content profile, the history, an activity count), plus what updating it by
one more event needs (each history song's summed weight, the mass and reference time of the
profile). It is the one user state of the project: the Recommender builds it from its
interactions, the online store holds it (:mod:`~apex_rank.ranking.online.keys` is its codec)
and the online events update it. ``SongTable`` is the song side (dense arrays aligned with one
id list): normalised embeddings, CF factors of warm songs, pseudo factors, APEX priors, train
popularity, release time. Both are plain data; the functions that read them
(``generate_candidates``, ``build_feature_frame``) are pure.

One profile algorithm, three entry points
-----------------------------------------
The content profile is the half-life mean of the user's history: the L2-normalised sum of the
normalised song embeddings, each weighted by the event weight times
``0.5 ** (age_days / half_life_days)``, ages taken from a fixed reference time, the end of the
bundle's data (``SongTable.now_s``); an event after it, or of unknown time, has age 0
(:func:`recency_weights`). That is the profile the reranker was trained on: the build's
training side measures ages from the end of its fit data, and the fit rows of users active
after it weigh 1. Keeping the sum's norm (``profile_mass``) and the reference time
(``profile_ref_s``) next to the direction makes the mean incremental, exactly (to float
rounding): an event adds its weighted embedding to ``profile_mass * profile``. A new bundle
(a later ``now_s``) decays what the previous one counted as recent.

- batch, many users at once: :func:`~apex_rank.ranking.build.user_arrays` (the build; it calls
  :func:`recency_weights` per row and sums with one sparse product);
- incremental, one event: :func:`apply_event` (online events, the carry-over at publish, and
  :func:`user_state_from_history`, which folds a history event by event);
- ALS fold-in of the CF factor: :func:`fold_in` (the ALS user step over the history's summed
  weights, :meth:`~apex_rank.ranking.cf.CFModel.factor_from_history`), for users the CF model
  has no factor for (offline ``Recommender.state_from_history``, a user created by online
  events).

The same events give the same state whichever entry point built it; the history is the songs in
order of first interaction (``recent_cf_sim`` reads its latest entries), each with its summed
weight; an event of weight 0 (a skip) joins the history and the activity count and moves the
latest time, not the profile; the online store bounds the history to ``history_len`` songs
(earliest first interactions dropped).

Example
-------
>>> import numpy as np
>>> s = user_state_from_history("u1", ["a", "b"], ts=[1.0, 2.0], song_table=None, cf_factor=None)
>>> s.history, s.activity
(('a', 'b'), 2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from apex_rank.errors import SchemaError
from apex_rank.tasks import APEX_TASKS

if TYPE_CHECKING:
    from apex_rank.ranking.cf import CFModel


@dataclass(frozen=True)
class UserState:
    """One user's state (see the module doc for how it is built and updated).

    Attributes
    ----------
    user_id: the user's id.
    cf_factor: (f,) float32 CF factor, or None (no CF history).
    profile: (d,) float32 L2-normalised content profile (half-life mean of the history
        embeddings), or None (no event with a positive weight on a known song).
    history: song ids the user consumed, in order of first interaction (never recommended back).
    activity: number of interactions (events of every weight).
    last_seen_s: time of the user's latest interaction (epoch seconds; NaN unknown): the
        user's own "now", from which song ages are measured (see ``age_days`` in
        :mod:`~apex_rank.ranking.rerank_features`).
    history_weights: summed event weight of each ``history`` song (what :func:`fold_in`
        solves from); empty: one unit weight per song (a state built without weights).
    profile_mass: norm of the recency-weighted embedding sum behind ``profile``, at
        ``profile_ref_s`` (what the next event's weight is measured against).
    profile_ref_s: the reference time ages are measured from (epoch seconds: the bundle's
        ``now_s``; NaN: none, no decay).
    """

    user_id: str
    cf_factor: np.ndarray | None
    profile: np.ndarray | None
    history: tuple[str, ...] = ()
    activity: int = 0
    last_seen_s: float = float("nan")
    history_weights: tuple[float, ...] = ()
    profile_mass: float = 1.0
    profile_ref_s: float = float("nan")

    @property
    def is_unknown(self) -> bool:
        """True when nothing personal is known: the popularity-and-quality fallback applies."""
        return self.cf_factor is None and self.profile is None

    @property
    def weights(self) -> tuple[float, ...]:
        """``history_weights``, or one unit weight per history song when none were kept."""
        return self.history_weights or (1.0,) * len(self.history)


def recency_weights(ts: np.ndarray | float, weights: np.ndarray | float, ref_s: np.ndarray | float,
                    half_life_days: float) -> np.ndarray:
    """The profile weight of each event: ``weight * 0.5 ** (age_days / half_life_days)``, the age
    taken from ``ref_s`` (a scalar or one per event); an unknown time (NaN) or a time after
    ``ref_s`` has age 0; ``half_life_days <= 0``: no decay. float64."""
    w = np.asarray(weights, dtype=np.float64)
    if half_life_days > 0:
        age = np.nan_to_num(np.maximum(0.0, np.asarray(ref_s, dtype=np.float64) - np.asarray(ts, dtype=np.float64))
                            / 86400.0, nan=0.0)
        w = w * np.power(0.5, age / half_life_days)
    return w


def _event_weight(ts: float, weight: float, ref_s: float, half_life_days: float) -> float:
    """:func:`recency_weights` for one event, in scalar arithmetic (the per-event path runs it
    once per recorded event; numpy's scalar overhead was half of ``apply_event``)."""
    w = float(weight)
    if half_life_days > 0:
        age = (float(ref_s) - float(ts)) / 86400.0
        if age > 0:  # NaN (an unknown time) and a time after ref_s: age 0
            w *= 0.5 ** (age / half_life_days)
    return w


def apply_event(state: UserState, song_id: str, embedding: np.ndarray | None, weight: float,
                ts: float = float("nan"), *, half_life_days: float,
                history_len: int | None = None) -> UserState:
    """``state`` after one more event: the incremental entry point of the profile algorithm.

    ``embedding``: the song's (d,) content embedding (normalised here), or None for a song the
    catalogue lacks (it joins the history, not the profile). The song joins the end of the
    history (a repeat adds its weight where it stands); ``history_len`` bounds the history (the
    earliest first interactions leave); activity grows by one; ``last_seen_s`` becomes ``ts``
    if later; the profile sum adds the embedding with the event's :func:`recency_weights`
    weight, from the state's ``profile_ref_s``. Pure: returns a new state.
    """
    hist, hw = list(state.history), list(state.weights)
    if song_id in hist:
        hw[hist.index(song_id)] += float(weight)
    else:
        hist.append(song_id)
        hw.append(float(weight))
    if history_len is not None and len(hist) > history_len:
        hist, hw = hist[-history_len:], hw[-history_len:]
    seen = float(np.fmax(state.last_seen_s, ts))
    profile, mass, ref = state.profile, state.profile_mass, state.profile_ref_s
    if embedding is not None:
        e = np.asarray(embedding, dtype=np.float64)
        norm = math.sqrt(float(e @ e))
        e = e / norm if norm > 0 else e
        total = (np.zeros_like(e) if profile is None or profile.shape != e.shape
                 else mass * profile.astype(np.float64))
        total += _event_weight(ts, weight, ref, half_life_days) * e
        mass = math.sqrt(float(total @ total))
        profile = (total / mass).astype(np.float32) if mass > 0 else None
    return replace(state, profile=profile, history=tuple(hist), activity=state.activity + 1,
                   last_seen_s=seen, history_weights=tuple(hw), profile_mass=mass if profile is not None else 0.0,
                   profile_ref_s=ref)


def fold_in(state: UserState, cf: CFModel) -> UserState:
    """``state`` with the CF factor the ALS user step solves from its history: songs the CF model
    lacks and songs of summed weight 0 (skips only) left out; no song left: no factor. The
    fold-in entry point: what ``Recommender.state_from_history`` gives a new user offline and
    :func:`~apex_rank.ranking.online.events.record_many` a user created by events."""
    keep = [(s, w) for s, w in zip(state.history, state.weights, strict=True) if w > 0]
    factor = cf.factor_from_history([s for s, _ in keep], [w for _, w in keep]) if keep else None
    return replace(state, cf_factor=factor)


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
    """A :class:`UserState` from a history: its events folded in time order (unknown times
    last, ties in the given order) with :func:`apply_event`; songs outside ``song_table`` join
    the history, not the profile. ``cf_factor`` is set as given (:func:`fold_in` solves one)."""
    n = len(song_ids)
    t = np.full(n, np.nan) if ts is None else np.asarray(ts, dtype=np.float64)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    idx = song_table.index_of(song_ids) if song_table is not None else np.full(n, -1)
    state = UserState(user_id, None if cf_factor is None else np.asarray(cf_factor, dtype=np.float32), None,
                      profile_mass=0.0, profile_ref_s=float("nan") if song_table is None else song_table.now_s)
    for i in np.lexsort((np.arange(n), np.nan_to_num(t, nan=0.0), np.isnan(t))).tolist():  # last key first
        emb = song_table.embeddings[idx[i]] if song_table is not None and idx[i] >= 0 else None
        state = apply_event(state, song_ids[i], emb, float(w[i]), float(t[i]), half_life_days=half_life_days)
    return state
