"""The ``Recommender`` facade: build from tables, recommend, add songs, save/load a bundle.

Build (DESIGN.md, "Cold start: how the pieces fit", with the changes of the blend work):

1. APEX priors for every catalogue song (a given :class:`~apex_rank.predictor.ApexPredictor`, or
   one trained on the way from the songs table's labels; without labels, from the play counts
   of the played songs only).
2. Each user's latest ``rerank_share`` of interactions labels the reranker's training groups; the
   earlier rest is the fit part. A seeded ``cold_sim_share`` of the played songs is held out of
   the training side as simulated new songs (their label plays stay), songs nobody played stay
   out of the groups, ALS settings are chosen on the label slice (``cf_grid``).
3. Training side: CF, content map, user states and candidates on the fit part; LightGBM learns
   corrections to the ALS order (``init_score``); a minimum share of new songs is chosen on its
   validation groups (``report["exposure"]``).
4. Serving side: CF, map, states and indexes refitted on all interactions (``refit_on_all``).

Per-user path (pure functions, reused by the online ranker): ``rec.user_state(u)`` →
:func:`~apex_rank.ranking.candidates.generate_candidates` →
:func:`~apex_rank.ranking.features.build_feature_frame` → ``rec.reranker.score`` → top-k.

A bundle is a folder: ``manifest.json`` (kind ``apex-recommender``, schema, config, files with
their SHA-256, library versions, build report), ``songs.npz``, ``users.npz``, ``cf.npz``,
``content_map.npz`` (all ``allow_pickle=False``), the large arrays as plain ``.npy`` files
beside them (``songs.embeddings.npy``, ``songs.cf_factors.npy``, ``songs.pseudo_factors.npy``,
``users.profiles.npy``, ``users.hist_indices.npy``, ``cf.user_factors.npy``,
``cf.item_factors.npy``: memory-mapped copy-on-write by :func:`load_recommender` once their
checksums passed, so worker processes share the pages), ``content.faiss`` / ``pseudo_cf.faiss``
(+ ``.ids.json``), ``reranker.txt`` (LightGBM text) and ``apex/`` (the predictor folder). No
pickle anywhere.

Example
-------
>>> # from apex_rank.synthetic import make_world
>>> # w = make_world()
>>> # rec = Recommender.build(w.songs, w.embeddings, w.interactions)
>>> # rec.recommend("u00001", k=10)       # song_id, score, source, rank, is_cold, 7 priors
>>> # rec.save("bundle"); load_recommender("bundle").recommend("u00001", k=10)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import scipy.sparse as sp

from apex_rank.config import from_dict, to_dict
from apex_rank.errors import ArtifactError, ConfigError, SchemaError, UnknownIdError
from apex_rank.manifest import as_if_created, read_manifest, write_manifest
from apex_rank.npfiles import apart_file, read_arrays, save_arrays
from apex_rank.predictor import ApexPredictor
from apex_rank.ranking.candidates import (
    RANK_COLUMNS,
    SOURCE_ORDER,
    CandidateConfig,
    CandidateSource,
    Exclusions,
    FactorSource,
    IndexSource,
    RankedListSource,
    candidate_positions,
    generate_candidates,
    sorted_codes,
)
from apex_rank.ranking.cf import ALS_GRID, CFConfig, CFModel
from apex_rank.ranking.content_map import ContentToCF
from apex_rank.ranking.features import build_feature_frame, feature_array
from apex_rank.ranking.index import CandidateIndex, l2_normalize
from apex_rank.ranking.reranker import (
    Reranker,
    RerankerConfig,
    check_cold_share,
    grade_labels,
    select_top_k,
    user_draws,
)
from apex_rank.ranking.state import SongTable, UserState, history_positions, quality_score
from apex_rank.schemas import check_id_column, embedding_matrix, validate_interactions, validate_songs
from apex_rank.tasks import APEX_TASKS
from apex_rank.training import TrainConfig

log = logging.getLogger(__name__)

KIND = "apex-recommender"
# 2: relative log_popularity, age for cold songs, build-time cold simulation (schema-1 rerankers
# read those features differently, so schema-1 bundles are refused with a "rebuild" message);
# 3: ages from each user's latest interaction (users.npz ``last_seen``);
# 4: the large arrays in plain .npy files memory-mapped at load (``songs.<name>.npy`` for
# ``LARGE_SONG_ARRAYS``, ``users.<name>.npy`` for ``LARGE_USER_ARRAYS``, ``cf.user_factors.npy``,
# ``cf.item_factors.npy``): N serving processes share their pages
SCHEMA = 4
LARGE_SONG_ARRAYS = ("embeddings", "cf_factors", "pseudo_factors")
LARGE_USER_ARRAYS = ("profiles", "hist_indices")
_OLDER_SCHEMA = {
    1: "its reranker features differ from this version's",
    2: "its reranker features differ from this version's",
    3: "its large arrays are inside .npz files, not in the .npy files this version memory-maps",
}
RESULT_SCHEMA: dict[str, Any] = {
    "song_id": pl.String,
    "score": pl.Float64,
    "source": pl.String,
    "rank": pl.Int32,
    "is_cold": pl.Boolean,
    **{t: pl.Float32 for t in APEX_TASKS},
}


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
        sources, at the base rate of plays a song has in one period (0 disables).
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


def _to_seconds(s: pl.Series) -> np.ndarray:
    """Datetime/Date/int-seconds column → float64 epoch seconds (NaN for null)."""
    if isinstance(s.dtype, pl.Datetime):
        v = s.dt.epoch("us").cast(pl.Float64) / 1e6
    elif s.dtype == pl.Date:
        v = s.cast(pl.Datetime("us")).dt.epoch("us").cast(pl.Float64) / 1e6
    else:
        v = s.cast(pl.Float64)
    return v.fill_null(np.nan).to_numpy().astype(np.float64)


@dataclass
class _Users:
    """Per-user serving state as arrays (dense user order = ``user_ids``)."""

    user_ids: list[str]
    profiles: np.ndarray  # (n_users, d) float32, zero rows = no profile
    has_profile: np.ndarray  # (n_users,) bool
    hist_indptr: np.ndarray  # CSR over catalogue positions, ordered by first interaction
    hist_indices: np.ndarray
    activity: np.ndarray  # (n_users,) int64
    last_seen: np.ndarray  # (n_users,) float64 time of the latest interaction (NaN unknown)
    pos: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pos = {u: i for i, u in enumerate(self.user_ids)}


def _user_arrays(inter: pl.DataFrame, table: SongTable, half_life_days: float) -> _Users:
    """Profiles, histories and activity for every user of ``inter`` (columns _u, _s, ts_s, weight)."""
    users = sorted(inter["user_id"].unique().to_list())
    umap = pl.DataFrame({"user_id": pl.Series(users, dtype=pl.String), "_u": np.arange(len(users), dtype=np.int64)})
    j = inter.join(umap, on="user_id", how="left")
    u = j["_u"].to_numpy()
    s = j["_s"].to_numpy()
    w = j["weight"].cast(pl.Float64).to_numpy()
    ts = j["ts_s"].to_numpy()
    if half_life_days > 0:
        age = np.nan_to_num(np.maximum(0.0, table.now_s - ts) / 86400.0, nan=0.0)
        w = w * np.power(0.5, age / half_life_days)
    n_u, n_s = len(users), len(table)
    W = sp.csr_matrix((w, (u, s)), shape=(n_u, n_s))
    prof = np.asarray(W @ table.embeddings.astype(np.float64), dtype=np.float32)
    prof = l2_normalize(prof)
    has = np.linalg.norm(prof, axis=1) > 0
    if not has.all():  # all-zero recency weights: fall back to plain means
        W1 = sp.csr_matrix((np.ones(len(u)), (u, s)), shape=(n_u, n_s))
        prof[~has] = l2_normalize(np.asarray(W1[~has] @ table.embeddings, dtype=np.float32))
        has = np.linalg.norm(prof, axis=1) > 0
    # histories: unique songs per user in order of first interaction
    h = (
        j.select("_u", "_s", "ts_s")
        .with_row_index("_r")
        .sort(["_u", "ts_s", "_r"], nulls_last=True)
        .unique(["_u", "_s"], keep="first", maintain_order=True)
    )
    counts = np.bincount(h["_u"].to_numpy(), minlength=n_u)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    act = np.bincount(u, minlength=n_u).astype(np.int64)
    last = np.full(n_u, -np.inf)
    np.maximum.at(last, u, np.where(np.isfinite(ts), ts, -np.inf))
    last[~np.isfinite(last)] = np.nan
    return _Users(users, np.ascontiguousarray(prof), has, indptr, h["_s"].to_numpy().astype(np.int64), act, last)


def _label_rows(inter: pl.DataFrame, ts_s: np.ndarray, cfg: RecommenderConfig) -> np.ndarray:
    """(n,) bool: each user's latest ``rerank_share`` of rows label the reranker's groups.

    "Latest" is by ``ts`` (ties by row order) or, when a timestamp is missing, a seeded random
    order: per user, as the test period of a leave-latest-out protocol, so every user with a few
    interactions contributes a group (a global time cut keeps only the users active after it,
    with little history before it).
    """
    n = inter.height
    key = ts_s if np.isfinite(ts_s).all() else np.random.default_rng(cfg.seed).random(n)
    df = (
        pl.DataFrame({"u": inter["user_id"], "t": key, "r": np.arange(n, dtype=np.int64)})
        .sort(["u", "t", "r"])
        .with_columns(pl.int_range(pl.len()).over("u").alias("pos"), pl.len().over("u").alias("n_u"))
    )
    n_fit = np.floor(df["n_u"].to_numpy() * (1.0 - cfg.rerank_share) + 0.5)
    out = np.zeros(n, dtype=bool)
    out[df["r"].to_numpy()] = df["pos"].to_numpy() >= n_fit
    return out


def _simulated_new_songs(fit_part: pl.DataFrame, cfg: RecommenderConfig) -> np.ndarray:
    """A seeded ``cold_sim_share`` of the songs played in the fit part (sorted song positions)."""
    played = np.sort(fit_part["_s"].unique().to_numpy())
    if cfg.cold_sim_share <= 0 or played.size < 2:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(cfg.seed)
    n = int(round(cfg.cold_sim_share * played.size))
    return np.sort(rng.choice(played, n, replace=False)).astype(np.int64)


def _choose_cf(
    fit: pl.DataFrame, label: pl.DataFrame, cfg: RecommenderConfig, *, k: int = 10, max_users: int = 2000
) -> tuple[RecommenderConfig, list[dict[str, Any]]]:
    """Try ``cfg.cf_grid`` on the training side: NDCG@k of plain ALS on the label slice; keep the best.

    Relevant = a user's label-slice songs outside its fit history (binary); at most ``max_users``
    seeded users. Returns the config with the chosen ``cf`` and the trials for the build report.
    """
    if not cfg.cf_grid or cfg.cf.model != "als":
        return cfg, []
    seen = fit.select("user_id", "song_id").unique()
    rel = label.select("user_id", "song_id").unique().join(seen, on=["user_id", "song_id"], how="anti")
    rel = rel.filter(pl.col("user_id").is_in(seen["user_id"].unique().implode()))
    users = sorted(rel["user_id"].unique().to_list())
    if len(users) < 2:
        return cfg, []
    if len(users) > max_users:
        users = sorted(np.random.default_rng(cfg.seed).choice(np.asarray(users, dtype=object), max_users,
                                                            replace=False).tolist())
    rel_sets = {u: set(g) for u, g in zip(*rel.group_by("user_id").agg(pl.col("song_id")).to_dict().values())}
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    trials: list[dict[str, Any]] = []
    for point in cfg.cf_grid:
        cf = CFModel(replace(cfg.cf, **point)).fit(fit)
        hits, _ = cf.recommend_batch(users, k)
        ndcg = []
        for u, row in zip(users, hits):
            r = rel_sets[u]
            gain = np.asarray([x in r for x in row.tolist()], dtype=np.float64)
            ndcg.append(float(gain @ discount) / float(discount[: min(len(r), k)].sum()))
        trials.append({"params": dict(point), f"ndcg@{k}": float(np.mean(ndcg))})
        log.info("build: cf %s -> label-slice ndcg@%d %.4f", point, k, trials[-1][f"ndcg@{k}"])
    best = max(trials, key=lambda t: t[f"ndcg@{k}"])["params"]
    return replace(cfg, cf=replace(cfg.cf, **best)), trials


def _out_of_sample_priors(E: np.ndarray, priors: np.ndarray, held_out: np.ndarray, fit_on: np.ndarray) -> np.ndarray:
    """Priors with the ``held_out`` rows replaced by a ridge map E → priors fitted on ``fit_on``.

    The APEX predictor may have been trained on the simulated new songs' own popularity (it is,
    when build trains it on the way from interaction counts, and in the offline evaluation): its
    prior for them is then in-sample, far closer to their true popularity than the prior a real
    new song gets. A model distilled from the predictor on the other songs gives the held-out
    songs a prior as uninformed by their own plays as a new song's.
    """
    out = priors.copy()
    cols = np.flatnonzero(np.isfinite(priors[fit_on]).all(axis=0))
    if len(held_out) == 0 or len(cols) == 0 or fit_on.sum() < 2:
        return out
    ridge = ContentToCF(1.0).fit(E[fit_on], priors[fit_on][:, cols])
    out[np.ix_(held_out, cols)] = ridge.predict(E[held_out])
    return out


FLOOR_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
WARM_KEPT = 0.97  # share of the ALS order's warm-target NDCG a floor must keep


def _choose_cold_floor(reranker: Reranker, train_cold_fraction: float, base_rate: float) -> dict[str, Any]:
    """The minimum share of new songs in a list served without ``cold_share``, chosen on the
    reranker's validation groups: the largest of :data:`FLOOR_GRID` and ``base_rate`` that is at
    most ``base_rate`` (the share of the label slice's plays that went to new songs) and whose lists
    stay at least as good as the ALS order on the whole list and keep ``WARM_KEPT`` of its
    warm-target NDCG (0 when none does). Lists whose scores put more new songs in the top k
    keep them.

    Why a floor: exposure is how a new song gathers the plays that warm it up, and the
    NDCG-optimal list starves new songs whenever their best picks are played a little less
    often than the tenth warm song (MovieLens item-cold: 0.1% of slots).

    Why capped at the base rate: the validation margin over the ALS order is larger than the
    margin on later data (MovieLens item-cold: +35% on validation, +16% on the test), so the
    largest floor validation still calls costless spends more than the margin there is. Without
    the cap it chose 0.3 where new songs got 18% of the test plays, and warm-target NDCG fell
    from 0.258 (no floor) to 0.218, below plain ALS (0.223); at the base rate it is 0.233 and
    new-song targets still beat content alone (0.017 vs 0.011).
    It is chosen where new songs are ``train_cold_fraction`` of the catalogue and served scaled
    by the catalogue's own fraction (:meth:`Recommender.min_cold_share`): a catalogue with few
    new songs has few good ones.
    """
    trials = reranker.floors_on_validation(tuple(sorted({*FLOOR_GRID, round(min(base_rate, FLOOR_GRID[-1]), 4)})))
    als = trials[0]
    ok = [t["min_cold_share"] for t in trials[1:]
          if t["min_cold_share"] <= base_rate + 1e-9
          and t["ndcg_all"] >= als["ndcg_all"] and t["ndcg_warm"] >= WARM_KEPT * als["ndcg_warm"]]
    chosen = float(max(ok)) if ok else 0.0
    log.info("build: new-song floor %.2f at a new-song fraction %.3f, base rate %.3f (validation: %s)", chosen,
             train_cold_fraction, base_rate, trials)
    return {"min_cold_share": chosen, "train_cold_fraction": train_cold_fraction, "label_new_share": base_rate,
            "trials": trials}


def _label_new_share(fit: pl.DataFrame, label: pl.DataFrame, warm: np.ndarray, rankable: np.ndarray) -> float:
    """Share of the label slice's recommendable plays (user–song pairs outside the user's fit
    history, on songs that may be candidates) that went to songs without a CF factor."""
    pairs = (label.select("user_id", "_s").unique()
             .filter(pl.col("user_id").is_in(fit["user_id"].unique().implode()))
             .join(fit.select("user_id", "_s").unique(), on=["user_id", "_s"], how="anti"))
    s = pairs["_s"].to_numpy()
    s = s[rankable[s]]
    return float((~warm[s]).mean()) if s.size else 0.0


def _candidate_recall(frame: pl.DataFrame, n_positive: int) -> dict[str, float]:
    """Share of the label slice's recommendable positives that each source, and the union, returned."""
    pos = frame.filter(pl.col("label") > 0)
    out = {"union": pos.height / max(n_positive, 1)}
    for c in RANK_COLUMNS:
        out[c.removeprefix("rank_")] = pos[c].is_not_null().sum() / max(n_positive, 1)
    out["n_positive_pairs"] = n_positive
    return out


class Recommender:
    """Hybrid cold-start recommender (see module doc).

    Attributes
    ----------
    config: the :class:`RecommenderConfig`.
    songs: the :class:`SongTable` (catalogue, embeddings, factors, priors, popularity).
    cf: the fitted serving :class:`CFModel` (evaluation baselines use ``cf.recommend``/``cf.score``).
    reranker: the LightGBM :class:`Reranker`. apex: the :class:`ApexPredictor`.
    sources: the candidate sources (``als``, ``content``, ``pseudo_cf``, ``fresh``).
    report: build facts (row counts, unknown ids, timings, reranker validation NDCG).

    Example
    -------
    >>> # rec = Recommender.build(songs, embeddings, interactions)
    >>> # rec.recommend("u1", k=10).columns
    >>> # ['song_id', 'score', 'source', 'rank', 'is_cold', 'score_streams', ...]
    """

    def __init__(
        self,
        *,
        config: RecommenderConfig,
        songs: SongTable,
        users: _Users,
        cf: CFModel,
        content_map: ContentToCF,
        content_index: CandidateIndex,
        pseudo_index: CandidateIndex,
        reranker: Reranker,
        apex: ApexPredictor,
        report: dict[str, Any] | None = None,
        rankable: np.ndarray | None = None,
    ) -> None:
        self.config = config
        self.songs = songs
        self._users = users
        self.cf = cf
        self.content_map = content_map
        self.content_index = content_index
        self.pseudo_index = pseudo_index
        self.reranker = reranker
        self.apex = apex
        self.report: dict[str, Any] = report or {}
        self._rankable = rankable  # training side only: songs that may be candidates (None: all)
        self._make_sources()

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        songs: pl.DataFrame,
        embeddings: pl.DataFrame,
        interactions: pl.DataFrame,
        config: RecommenderConfig | None = None,
        apex: ApexPredictor | None = None,
    ) -> Recommender:
        """Build every component from tables (see module doc).

        Interactions naming songs outside the catalogue are dropped, counted in
        ``report["unknown_song_rows"]`` and logged as a warning. Negative/NaN/inf weights are a
        :class:`SchemaError`.
        """
        cfg = config or RecommenderConfig()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        validate_songs(songs)
        ids, E_raw = embedding_matrix(embeddings)
        check_id_column(embeddings, "song_id", "embeddings")  # the catalogue's ids
        emb_pos = {s: i for i, s in enumerate(ids)}
        no_emb = [s for s in songs["song_id"].to_list() if s not in emb_pos]
        if no_emb:
            raise SchemaError(f"{len(no_emb)} song(s) of the songs table have no embedding, e.g. song_id {no_emb[0]!r}")
        inter = validate_interactions(interactions)
        has_ts = "ts" in inter.columns
        report: dict[str, Any] = {"n_interactions_in": inter.height, "n_songs": len(ids)}
        smap = pl.DataFrame({"song_id": pl.Series(ids, dtype=pl.String), "_s": np.arange(len(ids), dtype=np.int64)})
        inter = inter.select(
            "user_id",
            "song_id",
            pl.col("weight").cast(pl.Float64),
            *([pl.col("ts")] if has_ts else []),
        ).join(smap, on="song_id", how="left", maintain_order="left")
        unknown = inter.filter(pl.col("_s").is_null())
        report["unknown_song_rows"] = unknown.height
        report["unknown_song_examples"] = unknown["song_id"].unique(maintain_order=True).head(5).to_list()
        if unknown.height:
            log.warning(
                "%d interaction rows name %d song ids outside the catalogue (e.g. %r); they are dropped "
                "(see report['unknown_song_rows'])",
                unknown.height,
                unknown["song_id"].n_unique(),
                report["unknown_song_examples"][0],
            )
            inter = inter.filter(pl.col("_s").is_not_null())
        if inter.height == 0:
            raise SchemaError("no interaction names a song of the catalogue")
        ts_s = _to_seconds(inter["ts"]) if has_ts else np.full(inter.height, np.nan)
        inter = inter.with_columns(pl.Series("ts_s", ts_s, dtype=pl.Float64))
        created = np.full(len(ids), np.nan)
        if "created_at" in songs.columns:
            c = _to_seconds(songs["created_at"])
            for sid, v in zip(songs["song_id"].to_list(), c):
                created[emb_pos[sid]] = v
        timings["validate"] = time.perf_counter() - t0

        # 1. APEX priors
        t0 = time.perf_counter()
        if apex is None:
            apex = cls._train_apex(songs, embeddings, inter, cfg)
        if apex.input_dim != E_raw.shape[1]:
            raise SchemaError(
                f"APEX predictor expects embeddings of width {apex.input_dim}, the table has {E_raw.shape[1]}"
            )
        priors = apex.predict(E_raw)
        pmean, pstd = _prior_stats(priors)
        timings["apex"] = time.perf_counter() - t0
        E = l2_normalize(E_raw)

        # 2. reranker labels: each user's latest rows; the earlier rest is the fit part
        is_label = _label_rows(inter, ts_s, cfg)
        fit_part = inter.filter(pl.Series(~is_label))
        label_part = inter.filter(pl.Series(is_label))
        report.update(n_fit_rows=fit_part.height, n_label_rows=label_part.height)
        if fit_part.height == 0 or label_part.height == 0:
            raise SchemaError(
                f"interactions cannot be split for reranker training ({fit_part.height} earlier rows, "
                f"{label_part.height} later rows); give more interactions or change rerank_share"
            )
        finite = ts_s[np.isfinite(ts_s)]
        now_all = float(finite.max()) if finite.size else float(np.nanmax(created, initial=0.0))
        # ages on the training side are taken at the start of the label period
        now_fit = float(np.quantile(finite, 1.0 - cfg.rerank_share)) if finite.size == ts_s.size else now_all

        # 3. training side: simulated new songs, CF settings chosen on the label slice, groups
        t0 = time.perf_counter()
        sim = _simulated_new_songs(fit_part, cfg)
        in_sim = pl.col("_s").is_in(pl.Series(sim, dtype=pl.Int64).implode())
        fit_t = fit_part.filter(~in_sim)
        # A user who played a simulated new song in the fit part stays able to get it as a
        # candidate, labelled by whether they play it again: new songs of an item-cold split (and
        # songs whose early plays were lost) meet such users too. Hiding these pairs made new
        # songs look twice as often played in training as in the test (31% of top-10 slots).
        cfg, report["cf_tuning"] = _choose_cf(fit_t, label_part, cfg)
        others = np.zeros(len(ids), dtype=bool)
        others[fit_t["_s"].unique().to_numpy()] = True
        priors_t = _out_of_sample_priors(E, priors, sim, others)
        cf_t, table_t, map_t = cls._fit_side(fit_t, ids, E, priors_t, created, now_fit, pmean, pstd, cfg)
        timings["cf_fit_train_side"] = cf_t.fit_seconds
        users_t = _user_arrays(fit_t, table_t, cfg.half_life_days)
        # a song nobody played in the build data says nothing about how new songs fare (it may
        # not be released yet): it is left out of the training groups, not taught as a negative
        played = np.zeros(len(ids), dtype=bool)
        played[inter["_s"].unique().to_numpy()] = True
        train_side = cls(
            config=cfg,
            songs=table_t,
            users=users_t,
            cf=cf_t,
            content_map=map_t,
            content_index=cls._content_index(table_t, cfg, subset=played),
            pseudo_index=cls._pseudo_index(table_t, cfg, subset=played),
            reranker=Reranker(cfg.reranker),
            apex=apex,
            rankable=played,
        )
        frame, recall = train_side._training_frame(label_part, cfg)
        report.update(
            n_fit_songs=int(fit_part["_s"].n_unique()),
            n_simulated_new_songs=int(len(sim)),
            n_naturally_new_songs=int((played & ~table_t.warm).sum() - len(sim)),
            n_never_played_songs=int((~played).sum()),
            candidate_recall=recall,
        )
        timings["rerank_frame"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        reranker = Reranker(cfg.reranker).fit(frame, label_col="label")
        report["exposure"] = _choose_cold_floor(
            reranker, float((played & ~table_t.warm).sum() / max(int(played.sum()), 1)),
            _label_new_share(fit_t, label_part, table_t.warm, played))
        timings["reranker_fit"] = time.perf_counter() - t0
        report.update(
            n_rerank_rows=frame.height,
            reranker_best_iteration=reranker.best_iteration,
            reranker_tree_weight=reranker.tree_weight,
            reranker_val_ndcg=reranker.best_score,
            als_order_val_ndcg=reranker.als_order_score,
            n_rerank_positives=int((frame["label"] > 0).sum()),
        )

        # 4. serving side
        t0 = time.perf_counter()
        if cfg.refit_on_all or len(sim):
            src = inter if cfg.refit_on_all else fit_part
            cf_b, table_b, map_b = cls._fit_side(src, ids, E, priors, created, now_all if cfg.refit_on_all else now_fit,
                                                 pmean, pstd, cfg)
            users_b = _user_arrays(src, table_b, cfg.half_life_days)
            timings["cf_fit_serving_side"] = cf_b.fit_seconds
        else:
            cf_b, table_b, map_b, users_b = cf_t, table_t, map_t, users_t
        content_index = cls._content_index(table_b, cfg)
        pseudo_index = cls._pseudo_index(table_b, cfg)
        timings["serving_side_total"] = time.perf_counter() - t0
        report.update(
            n_users=len(users_b.user_ids),
            n_warm_songs=int(table_b.warm.sum()),
            n_cold_songs=int((~table_b.warm).sum()),
            timings=timings,
        )
        log.info("recommender built: %s", report)
        return cls(
            config=cfg,
            songs=table_b,
            users=users_b,
            cf=cf_b,
            content_map=map_b,
            content_index=content_index,
            pseudo_index=pseudo_index,
            reranker=reranker,
            apex=apex,
            report=report,
        )

    @staticmethod
    def _train_apex(
        songs: pl.DataFrame, embeddings: pl.DataFrame, inter: pl.DataFrame, cfg: RecommenderConfig
    ) -> ApexPredictor:
        from apex_rank.features.apex_tables import build_apex_dataset, labels_from_interactions, train_apex

        counts = None
        if "streams" not in songs.columns or "likes" not in songs.columns:
            songs, counts = labels_from_interactions(songs, inter)  # played songs only (see there)
            log.info("songs table lacks streams/likes: APEX popularity labels from the interaction counts of the "
                     "%d played songs", songs.height)
        data = build_apex_dataset(songs, embeddings, seed=cfg.seed, popularity_counts=counts)
        encoder = embeddings["encoder"][0] if "encoder" in embeddings.columns else None
        predictor, metrics, _ = train_apex(data, cfg.apex.train_config(cfg.seed), encoder=encoder)
        log.info("APEX trained on the way: best epoch %s", metrics.get("best_epoch"))
        return predictor

    @staticmethod
    def _fit_side(
        inter: pl.DataFrame,
        ids: list[str],
        E: np.ndarray,
        priors: np.ndarray,
        created: np.ndarray,
        now_s: float,
        pmean: np.ndarray,
        pstd: np.ndarray,
        cfg: RecommenderConfig,
    ) -> tuple[CFModel, SongTable, ContentToCF]:
        cf = CFModel(cfg.cf).fit(inter)
        warm_idx = np.asarray([i for i in (pos for pos in _positions(ids, cf.song_ids))], dtype=np.int64)
        n = len(ids)
        f = cf.item_factors.shape[1]
        V = np.zeros((n, f), dtype=np.float32)
        V[warm_idx] = cf.item_factors
        warm = np.zeros(n, dtype=bool)
        warm[warm_idx] = True
        cmap = ContentToCF(cfg.content_map_regularization).fit(E[warm_idx], cf.item_factors)
        pseudo = cmap.predict(E)
        pop = np.bincount(inter["_s"].to_numpy(), minlength=n).astype(np.float32)
        table = SongTable(
            song_ids=list(ids),
            embeddings=E,
            cf_factors=V,
            warm=warm,
            pseudo_factors=pseudo,
            priors=np.ascontiguousarray(priors, dtype=np.float32),
            popularity=pop,
            created_s=created.copy(),
            quality=quality_score(priors, pop, pmean, pstd),
            now_s=now_s,
            prior_mean=pmean,
            prior_std=pstd,
        )
        return cf, table, cmap

    @staticmethod
    def _content_index(
        table: SongTable, cfg: RecommenderConfig, device: str = "auto", subset: np.ndarray | None = None
    ) -> CandidateIndex:
        idx = CandidateIndex(
            table.embeddings.shape[1],
            cfg.index.content_factory,
            nprobe=cfg.index.nprobe,
            ef_search=cfg.index.ef_search,
            device=device,
        )
        keep = np.arange(len(table)) if subset is None else np.flatnonzero(subset)
        idx.add([table.song_ids[i] for i in keep], table.embeddings[keep])
        return idx

    @staticmethod
    def _pseudo_index(
        table: SongTable, cfg: RecommenderConfig, device: str = "auto", subset: np.ndarray | None = None
    ) -> CandidateIndex:
        idx = CandidateIndex(
            table.pseudo_factors.shape[1],
            cfg.index.pseudo_factory,
            normalize=False,
            nprobe=cfg.index.nprobe,
            ef_search=cfg.index.ef_search,
            device=device,
        )
        cold = np.flatnonzero(~table.warm & (True if subset is None else subset))
        if len(cold):
            idx.add([table.song_ids[i] for i in cold], table.pseudo_factors[cold])
        return idx

    def _make_sources(self) -> None:
        t = self.songs
        cold = np.flatnonzero(~t.warm & (True if self._rankable is None else self._rankable))
        mo = self.config.candidates.max_overfetch
        self.sources: list[CandidateSource] = [
            FactorSource(self.cf.song_ids, self.cf.item_factors),  # the CF model's matrix, not a copy
            IndexSource("content", self.content_index, "profile", max_overfetch=mo),
            IndexSource("pseudo_cf", self.pseudo_index, "cf_factor", max_overfetch=mo),
            RankedListSource("fresh", [t.song_ids[i] for i in cold], t.quality[cold], max_overfetch=mo),
        ]
        self.fallback_source = RankedListSource("popular", t.song_ids, t.quality, max_overfetch=mo)

    def _training_frame(
        self, label_part: pl.DataFrame, cfg: RecommenderConfig
    ) -> tuple[pl.DataFrame, dict[str, float]]:
        """Candidates + features + graded labels for users with a state and later interactions,
        and each source's recall of the label positives outside their history (build report)."""
        lab = label_part.group_by(["user_id", "song_id"]).agg(pl.col("weight").sum().alias("_w"))
        users = sorted(set(lab["user_id"].unique().to_list()) & set(self._users.user_ids))
        rng = np.random.default_rng(cfg.reranker.seed)
        cap = cfg.reranker.max_train_users
        if len(users) > cap:
            users = sorted(rng.choice(np.asarray(users, dtype=object), cap, replace=False).tolist())
        frames = []
        n_positive = 0
        for start in range(0, len(users), cfg.batch_users):
            states = [self.user_state(u) for u in users[start : start + cfg.batch_users]]
            cands = generate_candidates(states, self.sources, cfg.candidates)
            frames.append(build_feature_frame(states, cands, self.songs))
            hidden = {(st.user_id, x) for st in states for x in st.history}
            chunk = lab.filter(pl.col("user_id").is_in(pl.Series([st.user_id for st in states]).implode()))
            n_positive += sum((u, x) not in hidden for u, x in chunk.select("user_id", "song_id").iter_rows())
        if not frames:
            raise SchemaError("no user has both earlier and later interactions: cannot train the reranker")
        frame = pl.concat(frames)
        frame = frame.join(lab, on=["user_id", "song_id"], how="left", maintain_order="left")
        labels = grade_labels(frame["_w"].fill_null(0.0).to_numpy(), cfg.reranker.max_grade)
        frame = frame.drop("_w").with_columns(pl.Series("label", labels, dtype=pl.Int32))
        return frame, _candidate_recall(frame, n_positive)

    # ------------------------------------------------------------------ per-user state
    @property
    def min_cold_share(self) -> float:
        """Minimum share of new songs in a list served without ``cold_share``: the floor
        ``build`` chose on its validation slice (``report["exposure"]``, see
        ``_choose_cold_floor``) times this catalogue's fraction of new songs over the training
        side's (capped at the floor itself)."""
        e = self.report.get("exposure") or {}
        floor, frac = float(e.get("min_cold_share") or 0.0), float(e.get("train_cold_fraction") or 0.0)
        if floor <= 0 or frac <= 0:
            return 0.0
        return floor * min(1.0, self.songs.cold_fraction / frac)

    @property
    def user_ids(self) -> list[str]:
        """Users with a stored state."""
        return list(self._users.user_ids)

    def has_user(self, user_id: str) -> bool:
        return user_id in self._users.pos

    def user_state(self, user_id: str) -> UserState:
        """The stored state of a user; an unknown user gets an empty state (→ fallback)."""
        i = self._users.pos.get(user_id)
        if i is None:
            return UserState(user_id, None, None, (), 0)
        U = self._users
        hist_idx = U.hist_indices[U.hist_indptr[i] : U.hist_indptr[i + 1]]
        hist = tuple(self.songs.song_ids[j] for j in hist_idx)
        factor = self.cf.user_factors[self.cf._upos[user_id]].copy() if self.cf.has_user(user_id) else None
        prof = U.profiles[i].copy() if U.has_profile[i] else None
        return UserState(user_id, factor, prof, hist, int(U.activity[i]), float(U.last_seen[i]))

    def state_from_history(
        self,
        user_id: str,
        song_ids: Sequence[str],
        *,
        ts: Sequence[float] | None = None,
        weights: Sequence[float] | None = None,
    ) -> UserState:
        """A state for a user unseen at build time, from their history (CF factor by the ALS user step).

        History entries naming songs outside the catalogue are ignored and counted in a warning.
        """
        from apex_rank.ranking.state import user_state_from_history

        unknown = [s for s in song_ids if s not in self.songs._pos]
        if unknown:
            log.warning(
                "history of user %r names %d song ids outside the catalogue (e.g. %r); ignored",
                user_id,
                len(unknown),
                unknown[0],
            )
        return user_state_from_history(
            user_id,
            song_ids,
            ts=ts,
            weights=weights,
            song_table=self.songs,
            cf_factor=self.cf.factor_from_history(song_ids, weights),
            half_life_days=self.config.half_life_days,
        )

    # ------------------------------------------------------------------ recommending
    def recommend(
        self, user_id: str, k: int = 20, exclude: Iterable[str] | None = None, *, cold_share: float | None = None
    ) -> pl.DataFrame:
        """Top-k songs for one user (columns ``RESULT_SCHEMA``); unknown users get the fallback.

        Fewer than k rows come back when fewer songs are rankable (k larger than the catalogue,
        or a history covering it: an empty frame).

        ``cold_share`` (exposure control for new songs): a number in [0, 1] gives
        ``round(cold_share · k)`` slots to the user's best-scored new songs, kept in score order
        among the rest (:func:`~apex_rank.ranking.reranker.select_top_k`); too few new
        candidates: warm songs fill the slots and the shortfall is logged (``is_cold`` counts
        what was served). None, the default, lets the model decide: its scores, with at least
        the share of new songs ``build`` found costless on its validation slice
        (:attr:`min_cold_share`).
        """
        out = self.recommend_states([self.user_state(user_id)], k, excludes=[set(exclude) if exclude else set()],
                                    cold_share=cold_share)
        out.drop_in_place("user_id")  # eager: a lazy drop costs a query per request
        return out

    def recommend_batch(self, user_ids: Sequence[str], k: int = 20, *, cold_share: float | None = None) -> pl.DataFrame:
        """Long frame (``user_id`` + ``RESULT_SCHEMA``), users in input order; a user id repeated in
        the batch is answered once (the repeat is logged). Equals per-user ``recommend``
        (``cold_share`` as there)."""
        seen: dict[str, None] = dict.fromkeys(user_ids)
        if len(seen) < len(user_ids):
            log.info("recommend_batch: %d duplicate user ids answered once", len(user_ids) - len(seen))
        return self.recommend_states([self.user_state(u) for u in seen], k, cold_share=cold_share)

    def recommend_states(
        self,
        states: Sequence[UserState],
        k: int = 20,
        *,
        excludes: Sequence[set[str]] | None = None,
        progress: bool = False,
        cold_share: float | None = None,
    ) -> pl.DataFrame:
        """Rank for explicit states (the path an online ranker shares): candidates → features → rerank."""
        check_k(k)
        check_cold_share(cold_share)
        ex = list(excludes) if excludes is not None else [set() for _ in states]
        out = []
        order = {s.user_id: i for i, s in enumerate(states)}
        known = [i for i, s in enumerate(states) if not s.is_unknown]
        unknown = [i for i, s in enumerate(states) if s.is_unknown]
        step = self.config.batch_users
        chunks = range(0, len(known), step)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="recommend", unit="chunk")
        for start in chunks:
            idx = known[start : start + step]
            out.append(
                rank_states(
                    [states[i] for i in idx],
                    k,
                    self.sources,
                    self.songs,
                    self.reranker,
                    self.config.candidates,
                    excludes=[ex[i] for i in idx],
                    cold_share=cold_share,
                    min_cold_share=self.min_cold_share,
                )
            )
        if unknown:
            out.append(self._fallback([states[i] for i in unknown], k, [ex[i] for i in unknown]))
        res = pl.concat(out) if out else pl.DataFrame(schema={"user_id": pl.String, **RESULT_SCHEMA})
        if cold_share is not None and known:
            served = res.filter(pl.col("source") != "fallback").group_by("user_id").agg(pl.col("is_cold").sum())
            short = np.maximum(0, round(cold_share * k) - served["is_cold"].to_numpy())
            if short.any():
                log.warning("cold_share=%.2f: %d of %d users got fewer new songs than asked (%d slots short, "
                            "too few new candidates; warm songs fill them)", cold_share, int((short > 0).sum()),
                            len(known), int(short.sum()))
        if len(states) == 1:  # one user: already in rank order
            return res
        return (
            res.with_columns(pl.col("user_id").replace_strict(order, return_dtype=pl.Int64).alias("_o"))
            .sort(["_o", "rank"])
            .drop("_o")
        )

    def rank_items(
        self,
        states: Sequence[UserState],
        k: int,
        excludes: Sequence[set[str]] | None = None,
        cold_share: float | None = None,
    ) -> list[list[tuple[str, float, str]]]:
        """``recommend_states`` without the frame, for serving: per state, its top-k as
        ``(song_id, score, source)`` tuples, best first. The same arrays the frame is built
        from, so the items equal the frame's rows."""
        check_k(k)
        check_cold_share(cold_share)
        ex = list(excludes) if excludes is not None else [set() for _ in states]
        out: list[list[tuple[str, float, str]]] = [[] for _ in states]
        known = [i for i, s in enumerate(states) if not s.is_unknown]
        if len({states[i].user_id for i in known}) < len(known):
            raise ConfigError("rank_items: a user id appears twice among the states")
        for start in range(0, len(known), self.config.batch_users):
            idx = known[start : start + self.config.batch_users]
            r = rank_arrays([states[i] for i in idx], k, self.sources, self.songs, self.reranker,
                            self.config.candidates, excludes=[ex[i] for i in idx], cold_share=cold_share,
                            min_cold_share=self.min_cold_share)
            for u, sid, sc, src in zip(r.user.tolist(), r.song_id.tolist(), r.score.tolist(),
                                       r.source.tolist(), strict=True):
                out[idx[u]].append((sid, sc, SOURCE_ORDER[src]))
        unknown = [i for i, s in enumerate(states) if s.is_unknown]
        if unknown:
            fb = self._fallback([states[i] for i in unknown], k, [ex[i] for i in unknown])
            pos = {states[i].user_id: i for i in unknown}
            for u, sid, sc, src in fb.select("user_id", "song_id", "score", "source").iter_rows():
                out[pos[u]].append((sid, sc, src))
        return out

    def _fallback(self, states: Sequence[UserState], k: int, excludes: Sequence[set[str]]) -> pl.DataFrame:
        """Popularity-and-quality ranking for users without a state (source ``fallback``)."""
        hits, D = self.fallback_source.retrieve_batch(states, k, [e | set(s.history) for s, e in zip(states, excludes)])
        r, c = np.nonzero(hits != "")
        frame = pl.DataFrame(
            {
                "user_id": pl.Series([states[int(i)].user_id for i in r], dtype=pl.String),
                "song_id": pl.Series(hits[r, c].tolist(), dtype=pl.String),
                "score": D[r, c].astype(np.float64),
                "source": pl.Series(["fallback"] * len(r), dtype=pl.String),
                "rank": (c + 1).astype(np.int32),
            }
        )
        return _attach_song_columns(frame, self.songs)

    def similar_songs(self, song_id: str, k: int = 20) -> pl.DataFrame:
        """Content neighbours of a catalogue song (itself excluded): song_id, score, rank, is_cold, priors."""
        check_k(k)
        i = self.songs._pos.get(song_id)
        if i is None:
            raise UnknownIdError(f"song_id {song_id!r} is not in the catalogue")
        D, hits = self.content_index.search(self.songs.embeddings[i], k + 1)
        keep = [(s, float(d)) for s, d in zip(hits[0], D[0]) if s and s != song_id][:k]
        frame = pl.DataFrame(
            {
                "song_id": pl.Series([s for s, _ in keep], dtype=pl.String),
                "score": np.asarray([d for _, d in keep], dtype=np.float64),
                "rank": np.arange(1, len(keep) + 1, dtype=np.int32),
            }
        )
        return _attach_song_columns(frame, self.songs)

    # ------------------------------------------------------------------ catalogue changes
    def add_songs(self, embeddings: pl.DataFrame, songs: pl.DataFrame | None = None, *,
                  priors: np.ndarray | None = None) -> int:
        """Add new (cold) songs: APEX priors, pseudo factors and index entries are computed now, so
        they are rankable at once. Ids already in the catalogue are a :class:`SchemaError`.
        Returns the number of songs added.

        ``priors`` ((n, 7) in ``APEX_TASKS`` order, rows in the order of ``embeddings``) are
        priors the APEX predictor already computed for these songs (the online store keeps them
        in the song record); given, the predictor is not run again. The columns of the tasks the
        predictor was trained for must be finite and the others NaN, as its ``predict`` returns
        them; anything else is a :class:`SchemaError`.
        """
        ids, E_raw = embedding_matrix(embeddings, expected_width=self.songs.embeddings.shape[1])
        check_id_column(embeddings, "song_id", "embeddings")
        dup = [s for s in ids if s in self.songs._pos]
        if dup:
            raise SchemaError(f"song_id {dup[0]!r} is already in the catalogue ({len(dup)} duplicates)")
        created = np.full(len(ids), np.nan)
        if songs is not None:
            validate_songs(songs)
            if "created_at" in songs.columns:
                m = dict(zip(songs["song_id"].to_list(), _to_seconds(songs["created_at"])))
                created = np.asarray([m.get(s, np.nan) for s in ids], dtype=np.float64)
        priors = self.apex.predict(E_raw) if priors is None else self._check_priors(priors, ids)
        E = l2_normalize(E_raw)
        f = self.songs.cf_factors.shape[1]
        pop = np.zeros(len(ids), dtype=np.float32)
        new = SongTable(
            song_ids=ids,
            embeddings=E,
            cf_factors=np.zeros((len(ids), f), np.float32),
            warm=np.zeros(len(ids), bool),
            pseudo_factors=self.content_map.predict(E),
            priors=priors,
            popularity=pop,
            created_s=created,
            quality=quality_score(priors, pop, self.songs.prior_mean, self.songs.prior_std),
            now_s=self.songs.now_s,
            prior_mean=self.songs.prior_mean,
            prior_std=self.songs.prior_std,
        )
        self.songs.append(new)
        self.content_index.add(ids, E)
        self.pseudo_index.add(ids, new.pseudo_factors)
        self._make_sources()
        log.info("added %d songs (catalogue now %d)", len(ids), len(self.songs))
        return len(ids)

    def _check_priors(self, priors: np.ndarray, ids: list[str]) -> np.ndarray:
        """Given priors as ``predict`` would return them for ``ids``, as float32 (n, 7)."""
        P = np.array(priors, dtype=np.float32)  # a copy: the caller's array is not kept
        if P.shape != (len(ids), len(APEX_TASKS)):
            raise SchemaError(f"priors must be ({len(ids)}, {len(APEX_TASKS)}) for {len(ids)} songs; "
                              f"got shape {P.shape}")
        bad = self.apex.bad_prior_rows(P)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SchemaError(f"priors of song {ids[i]!r} are {P[i].tolist()}: the tasks the APEX "
                              f"predictor was trained for ({', '.join(self.apex.tasks)}) must be "
                              f"finite and the others NaN ({int(bad.sum())} bad rows)")
        return P

    # ------------------------------------------------------------------ evaluation helpers
    @property
    def popularity(self) -> pl.DataFrame:
        """``song_id``, ``count``: interactions per song in the serving CF data."""
        return pl.DataFrame(
            {"song_id": pl.Series(self.songs.song_ids, dtype=pl.String), "count": self.songs.popularity}
        )

    @property
    def priors(self) -> pl.DataFrame:
        """``song_id`` + the seven APEX priors."""
        return self.songs.priors_frame()

    @property
    def content_embeddings(self) -> tuple[list[str], np.ndarray]:
        """``(song_ids, E)`` with E the (n, d) L2-normalised content embeddings."""
        return list(self.songs.song_ids), self.songs.embeddings

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> Path:
        """Write the bundle folder (see module doc) atomically; returns it.

        The bundle is written into a temporary sibling folder and renamed into place, so a save
        killed halfway leaves the previous bundle whole (never old manifest next to new files).
        An existing ``folder`` is replaced only when it is empty or an apex-rank bundle (a
        :class:`ConfigError` otherwise); between the two renames that replace it, the name is
        briefly absent, never mixed.
        """
        folder = Path(folder)
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"{folder} exists and is not a folder: cannot write a bundle there")
            if any(folder.iterdir()) and not _is_bundle(folder):
                raise ConfigError(f"{folder} holds files and is not an apex-rank bundle: refusing to replace it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        as_if_created(tmp)
        try:
            self._write_bundle(tmp)
            if folder.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
                os.replace(folder, old / "bundle")
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def _write_bundle(self, folder: Path) -> None:
        """Every component file and the manifest into ``folder`` (an empty folder)."""
        U = self._users
        users = {
            "user_ids": np.asarray(U.user_ids, dtype=str),
            "profiles": U.profiles,
            "has_profile": U.has_profile,
            "hist_indptr": U.hist_indptr,
            "hist_indices": U.hist_indices,
            "activity": U.activity,
            "last_seen": U.last_seen,
        }
        written = save_arrays(folder / "songs.npz", self.songs.to_arrays(), apart=LARGE_SONG_ARRAYS)
        written += save_arrays(folder / "users.npz", users, apart=LARGE_USER_ARRAYS)
        written += [folder / "cf.npz", *(apart_file(folder / "cf.npz", a) for a in CFModel.FACTOR_ARRAYS)]
        self.cf.save(folder / "cf.npz", factors_apart=True)
        assert self.content_map.W is not None  # fitted in build
        np.savez(
            folder / "content_map.npz", W=self.content_map.W, regularization=np.asarray(self.content_map.regularization)
        )
        files = [p.name for p in written] + ["content_map.npz", "reranker.txt"]
        files += [p.name for p in self.content_index.save(folder / "content.faiss")]
        files += [p.name for p in self.pseudo_index.save(folder / "pseudo_cf.faiss")]
        self.reranker.save(folder / "reranker.txt")
        self.apex.save(folder / "apex")
        files += ["apex/manifest.json", "apex/head.safetensors"]
        write_manifest(
            folder,
            kind=KIND,
            schema=SCHEMA,
            files=files,
            payload={
                "config": to_dict(self.config),
                "report": _jsonable(self.report),
                "feature_importance": self.reranker.feature_importance().to_dicts(),
            },
        )


def _is_bundle(folder: Path) -> bool:
    """True when ``folder/manifest.json`` says it is a recommender bundle (any schema)."""
    import json

    try:
        return json.loads((folder / "manifest.json").read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def _prior_stats(priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std over finite values (0 and 1 for untrained, all-NaN columns)."""
    ok = np.isfinite(priors)
    n = ok.sum(axis=0)
    x = np.where(ok, priors, 0.0).astype(np.float64)
    mean = x.sum(axis=0) / np.maximum(n, 1)
    var = (np.where(ok, (priors - mean) ** 2, 0.0)).sum(axis=0) / np.maximum(n, 1)
    std = np.sqrt(var)
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _positions(ids: list[str], subset: list[str]) -> list[int]:
    pos = {s: i for i, s in enumerate(ids)}
    return [pos[s] for s in subset]


def _attach_song_columns(frame: pl.DataFrame, table: SongTable) -> pl.DataFrame:
    """Add ``is_cold`` and the seven priors by song_id; order and dtypes as ``RESULT_SCHEMA``."""
    j = frame.join(table.index_frame(), on="song_id", how="left", maintain_order="left")
    s = j["_idx"].to_numpy() if j.height else np.zeros(0, dtype=np.int64)
    cols = {"is_cold": pl.Series(~table.warm[s], dtype=pl.Boolean)}
    for k, t in enumerate(APEX_TASKS):
        cols[t] = pl.Series(table.priors[s, k], dtype=pl.Float32).fill_nan(None)
    out = pl.concat([j.drop("_idx"), pl.DataFrame(cols)], how="horizontal")
    keep = (["user_id"] if "user_id" in out.columns else []) + [c for c in RESULT_SCHEMA if c in out.columns]
    return out.select(keep).cast({c: d for c, d in RESULT_SCHEMA.items() if c in out.columns})


class RankedArrays(NamedTuple):
    """Top-k of a batch as arrays, one row per recommended song, users in user-id order and
    best first within a user: ``user`` (position in ``states``), ``song_id`` (object),
    ``song`` (song-table index), ``score`` (float64), ``source`` (index into ``SOURCE_ORDER``),
    ``rank`` (1-based int32)."""

    user: np.ndarray
    song_id: np.ndarray
    song: np.ndarray
    score: np.ndarray
    source: np.ndarray
    rank: np.ndarray


def rank_arrays(
    states: Sequence[UserState],
    k: int,
    sources: Sequence[CandidateSource],
    song_table: SongTable,
    reranker: Reranker,
    candidate_config: CandidateConfig,
    *,
    excludes: Sequence[set[str]] | None = None,
    cold_share: float | None = None,
    min_cold_share: float = 0.0,
) -> RankedArrays:
    """The pure per-user path: candidates → features → reranker scores → top-k per user.

    ``cold_share`` (exposure control, see :func:`select_top_k`): exactly that share of new
    songs; None: the scores decide, with at least ``min_cold_share`` new songs.

    Runs on arrays of catalogue positions (:func:`~apex_rank.ranking.candidates.candidate_positions`,
    :func:`~apex_rank.ranking.features.feature_array`, ``Reranker.score_matrix``): the union and
    features ``generate_candidates`` / ``build_feature_frame`` compute, without frames; the
    histories are looked up once for the batch and ids are read only for the top-k. Ties within
    a user go to the smaller song id. :func:`rank_states` is its frame form.
    """
    hist = history_positions(states, song_table)
    excluded = Exclusions.of_states(states, song_table, excludes, history=hist)
    rows, s, best, R = candidate_positions(states, sources, candidate_config, song_table, excluded=excluded,
                                           min_per_source=k)
    if len(rows) == 0:
        e = np.zeros(0, np.int64)
        return RankedArrays(e, np.zeros(0, object), e, np.zeros(0), np.zeros(0, np.int8), np.zeros(0, np.int32))
    upos = {st.user_id: i for i, st in enumerate(states)}  # a repeated user id reads its last state
    last = np.asarray([upos[st.user_id] for st in states], dtype=np.int64)
    X = feature_array(states, last[rows], s, np.where(R > 0, R, np.nan).astype(np.float32), song_table, history=hist)
    scores = reranker.score_matrix(X)
    # users by user id, then score descending, ties by song id
    _, urank = sorted_codes(np.asarray([st.user_id for st in states], dtype=object))
    cold = ~song_table.warm[s]
    order = np.flatnonzero(_contenders(rows, scores, cold, k, len(states)))
    user_key = urank[rows[order]]
    order = order[np.lexsort((song_table.id_rank[s[order]], -scores[order], user_key))]
    if cold_share is None:
        keep, rank = select_top_k(urank[rows[order]], cold[order], k, min_cold_share, floor=True,
                                  draws=user_draws([st.user_id for st in states])[rows[order]])
    else:
        keep, rank = select_top_k(urank[rows[order]], cold[order], k, cold_share)
    keep = order[keep]
    return RankedArrays(rows[keep], song_table.id_array[s[keep]], s[keep], scores[keep].astype(np.float64), best[keep],
                        rank)


def _contenders(rows: np.ndarray, scores: np.ndarray, cold: np.ndarray, k: int, b: int) -> np.ndarray:
    """(n,) bool: the candidates that can make their state's top k, each state's k best new and
    k best warm songs by score (and any tied with the k-th). :func:`select_top_k` only ever
    takes a user's best new and best warm songs, at most k of each, so sorting these alone
    gives its answer, at every ``cold_share``. ``rows`` (the state of each candidate) ascending."""
    keep = np.zeros(len(rows), dtype=bool)
    for part in (np.flatnonzero(cold), np.flatnonzero(~cold)):
        r = rows[part]
        counts = np.bincount(r, minlength=b)
        if len(part) == 0 or counts.max() <= k:
            keep[part] = True
            continue
        M = np.full((b, int(counts.max())), -np.inf)
        M[r, np.arange(len(r)) - (np.cumsum(counts) - counts)[r]] = scores[part]
        kth = -np.partition(-M, k - 1, axis=1)[:, k - 1]  # -inf for a state with fewer than k
        keep[part] = scores[part] >= kth[r]
    return keep


MAX_K = 1000  # longest list the Python API and CLI rank (the HTTP service caps at its max_k, 500)


def check_k(k: object) -> None:
    """``k`` must be an int in [1, MAX_K]: a huge k makes every source fetch k candidates per user
    (``recommend -k 1000000000`` once grew to 22 GB before the kernel killed it)."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ConfigError(f"k must be an integer in [1, {MAX_K}], got {k!r}")


def cold_shortfall(song_table: SongTable, song_ids: Sequence[str], k: int, cold_share: float | None) -> int:
    """New-song slots asked for by ``cold_share`` that a served list could not fill."""
    if cold_share is None:
        return 0
    idx = song_table.index_of(song_ids)
    served = int((~song_table.warm[idx[idx >= 0]]).sum())
    return max(0, round(cold_share * k) - served)


def rank_states(
    states: Sequence[UserState],
    k: int,
    sources: Sequence[CandidateSource],
    song_table: SongTable,
    reranker: Reranker,
    candidate_config: CandidateConfig,
    *,
    excludes: Sequence[set[str]] | None = None,
    cold_share: float | None = None,
    min_cold_share: float = 0.0,
) -> pl.DataFrame:
    """:func:`rank_arrays` as a frame: ``user_id`` + ``RESULT_SCHEMA`` columns, best first per
    user (ties by song_id), users in user-id order."""
    r = rank_arrays(states, k, sources, song_table, reranker, candidate_config, excludes=excludes,
                    cold_share=cold_share, min_cold_share=min_cold_share)
    if len(r.user) == 0:
        return pl.DataFrame(schema={"user_id": pl.String, **RESULT_SCHEMA})
    uids = np.asarray([st.user_id for st in states], dtype=object)
    names = np.asarray(SOURCE_ORDER, dtype=object)
    cols: dict[str, pl.Series] = {
        "user_id": pl.Series(uids[r.user].tolist(), dtype=pl.String),
        "song_id": pl.Series(r.song_id.tolist(), dtype=pl.String),
        "score": pl.Series(r.score, dtype=pl.Float64),
        "source": pl.Series(names[r.source].tolist(), dtype=pl.String),
        "rank": pl.Series(r.rank, dtype=pl.Int32),
        "is_cold": pl.Series(~song_table.warm[r.song], dtype=pl.Boolean),
    }
    for j, t in enumerate(APEX_TASKS):
        cols[t] = pl.Series(t, song_table.priors[r.song, j], dtype=pl.Float32, nan_to_null=True)
    return pl.DataFrame(cols)


def _check_bundle(
    folder: Path,
    songs: SongTable,
    users: _Users,
    cf: CFModel,
    content_index: CandidateIndex,
    pseudo_index: CandidateIndex,
    apex: ApexPredictor,
) -> None:
    """Cross-check the loaded components (each file passed its checksum, but a bundle assembled
    from parts of several bundles, or written by a buggy build, must not serve): shapes agree
    with the catalogue, every index names catalogue songs, user histories point into it, and
    the arrays the features read are finite (a prior column may be all NaN: an untrained task)."""
    n, d = len(songs), content_index.dim  # the width the index was built with

    def bad(name: str, what: str) -> ArtifactError:
        return ArtifactError(f"{folder / name}: {what}; the bundle's files do not belong together, rebuild it")

    def file(attr: str) -> str:
        return f"songs.{attr}.npy" if attr in LARGE_SONG_ARRAYS else "songs.npz"

    for attr, width in (("embeddings", d), ("cf_factors", cf.item_factors.shape[1]),
                        ("pseudo_factors", cf.item_factors.shape[1]), ("priors", len(APEX_TASKS))):
        arr = getattr(songs, attr)
        if arr.shape != (n, width):
            raise bad(file(attr), f"{attr} has shape {arr.shape}, expected ({n}, {width})")
    for attr in ("warm", "popularity", "created_s", "quality"):
        if getattr(songs, attr).shape != (n,):
            raise bad("songs.npz", f"{attr} has shape {getattr(songs, attr).shape}, expected ({n},)")
    for attr in ("embeddings", "cf_factors", "pseudo_factors", "popularity", "quality"):
        if not np.isfinite(getattr(songs, attr)).all():
            raise bad(file(attr), f"{attr} holds NaN or infinite values")
    fin = np.isfinite(songs.priors)
    if not (fin.all(axis=0) | (~fin).all(axis=0)).all():
        raise bad("songs.npz", "priors hold NaN or infinite values in a trained task's column")
    if apex.input_dim != d:
        raise bad("apex", f"the APEX predictor reads embeddings of width {apex.input_dim}, the content index's are {d}")
    if content_index.ids != songs.song_ids:
        raise bad("content.faiss", "the content index does not hold exactly the songs of songs.npz, in order")
    cold = [songs.song_ids[i] for i in np.flatnonzero(~songs.warm)]
    if sorted(pseudo_index.ids) != sorted(cold):
        raise bad("pseudo_cf.faiss", "the pseudo-CF index does not hold exactly the cold songs of songs.npz")
    if not set(cf.song_ids) <= set(songs.song_ids):
        raise bad("cf.npz", "the CF model names songs outside the catalogue")
    n_u = len(users.user_ids)
    ip, ix = users.hist_indptr, users.hist_indices
    if (len(ip) != n_u + 1 or ip[0] != 0 or ip[-1] != len(ix) or (np.diff(ip) < 0).any()
            or (len(ix) and (ix.min() < 0 or ix.max() >= n))):
        raise bad("users.npz", "user histories point outside the catalogue")
    if users.profiles.shape != (n_u, d) or not np.isfinite(users.profiles).all():
        raise bad("users.profiles.npy", f"profiles are not finite ({n_u}, {d}) vectors")
    if users.last_seen.shape != (n_u,) or np.isinf(users.last_seen).any():
        raise bad("users.npz", f"last_seen is not ({n_u},) times (NaN for unknown)")


def load_recommender(folder: str | Path, device: str = "auto") -> Recommender:
    """Load a bundle written by :meth:`Recommender.save`.

    Raises :class:`~apex_rank.errors.ArtifactError` for a newer schema, a missing file or an
    unreadable component, naming the file.
    """
    folder = Path(folder)
    man = read_manifest(folder, kind=KIND, max_schema=SCHEMA)
    if man["schema"] < SCHEMA:
        raise ArtifactError(
            f"{folder}/manifest.json: bundle schema {man['schema']} was built by an older apex-rank "
            f"({_OLDER_SCHEMA.get(man['schema'], 'another format')}; this version reads schema {SCHEMA}); "
            "rebuild it with `apex-rank build`"
        )
    try:
        cfg = from_dict(RecommenderConfig, man["config"])
    except (KeyError, ConfigError) as err:
        raise ArtifactError(f"{folder}/manifest.json: invalid config: {err}") from err

    try:
        songs = SongTable.from_arrays(read_arrays(folder / "songs.npz", apart=LARGE_SONG_ARRAYS))
        u = read_arrays(folder / "users.npz", apart=LARGE_USER_ARRAYS)
        users = _Users(
            u["user_ids"].tolist(),
            u["profiles"],
            u["has_profile"].astype(bool),
            u["hist_indptr"],
            u["hist_indices"],
            u["activity"],
            u["last_seen"].astype(np.float64),
        )
        cm = read_arrays(folder / "content_map.npz")
    except KeyError as err:
        raise ArtifactError(f"bundle {folder}: an array is missing: {err}") from err
    cmap = ContentToCF(float(cm["regularization"]))
    cmap.W = cm["W"]
    cf = CFModel.load(folder / "cf.npz", mmap=True)
    content_index = CandidateIndex.load(folder / "content.faiss", device=device)
    pseudo_index = CandidateIndex.load(folder / "pseudo_cf.faiss", device=device)
    reranker = Reranker.load(folder / "reranker.txt", cfg.reranker)
    reranker.tree_weight = float((man.get("report") or {}).get("reranker_tree_weight", 1.0))
    apex = ApexPredictor.load(folder / "apex", device=device)
    _check_bundle(folder, songs, users, cf, content_index, pseudo_index, apex)
    return Recommender(
        config=cfg,
        songs=songs,
        users=users,
        cf=cf,
        content_map=cmap,
        content_index=content_index,
        pseudo_index=pseudo_index,
        reranker=reranker,
        apex=apex,
        report=man.get("report") or {},
    )
