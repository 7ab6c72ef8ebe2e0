"""Building a recommender from tables: :func:`build_parts` (what ``Recommender.build`` runs).

Steps (DESIGN.md, "Cold start: how the pieces fit", with the changes of the blend work):

1. APEX priors for every catalogue song (a given :class:`~apex_rank.predictor.ApexPredictor`, or
   one trained on the way from the songs table's labels; without labels, from the play counts
   of the played songs only).
2. Each user's latest ``rerank_share`` of interactions labels the reranker's training groups; the
   earlier rest is the fit part (:func:`_label_rows`). A ``cold_sim_share`` of the played songs
   (half the latest to arrive, half a seeded draw, :func:`_simulated_new_songs`) is held out of
   the training side as simulated new songs (their label plays stay), songs
   nobody played stay out of the groups, ALS settings are chosen on the label slice
   (``cf_grid``, :func:`_choose_cf`).
3. Training side: CF, content map, user states and candidates on the fit part
   (:func:`_fit_side`, :func:`user_arrays`, :func:`training_frame`); LightGBM learns corrections
   to the ALS order (``init_score``); a minimum share of new songs, held at every depth of the
   list, is chosen on its validation groups (:func:`_choose_cold_floor`, ``report["exposure"]``).
4. Serving side: CF, map, states and indexes refitted on all interactions (``refit_on_all``).

Only the ``Recommender`` facade imports this module (the layering test holds it to that):
serving, the online engine and bundle I/O never need the build.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from apex_rank.errors import SchemaError
from apex_rank.predictor import ApexPredictor
from apex_rank.ranking.bundle import RecommenderParts, UserArrays
from apex_rank.ranking.candidates import RANK_COLUMNS, CandidateSource, generate_candidates
from apex_rank.ranking.cf import CFModel
from apex_rank.ranking.config import RecommenderConfig
from apex_rank.ranking.content_map import ContentToCF
from apex_rank.ranking.index import CandidateIndex, l2_normalize
from apex_rank.ranking.pipeline import make_sources
from apex_rank.ranking.rerank_features import FEATURES, build_feature_frame, feature_matrix
from apex_rank.ranking.reranker import Reranker, grade_labels, group_ndcg
from apex_rank.ranking.state import SongTable, quality_score, recency_weights
from apex_rank.schemas import check_id_column, embedding_matrix, validate_interactions, validate_songs

log = logging.getLogger(__name__)


def build_parts(
    songs: pl.DataFrame,
    embeddings: pl.DataFrame,
    interactions: pl.DataFrame,
    config: RecommenderConfig | None = None,
    apex: ApexPredictor | None = None,
) -> RecommenderParts:
    """Build every part of a recommender from tables (see module doc).

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
    ts_s = to_seconds(inter["ts"]) if has_ts else np.full(inter.height, np.nan)
    inter = inter.with_columns(pl.Series("ts_s", ts_s, dtype=pl.Float64))
    created = np.full(len(ids), np.nan)
    if "created_at" in songs.columns:
        c = to_seconds(songs["created_at"])
        for sid, v in zip(songs["song_id"].to_list(), c):
            created[emb_pos[sid]] = v
    timings["validate"] = time.perf_counter() - t0

    # 1. APEX priors
    t0 = time.perf_counter()
    if apex is None:
        apex = _train_apex(songs, embeddings, inter, cfg)
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
    cf_t, table_t, map_t = _fit_side(fit_t, ids, E, priors_t, created, now_fit, pmean, pstd, cfg)
    timings["cf_fit_train_side"] = cf_t.fit_seconds
    users_t = user_arrays(fit_t, table_t, cfg.half_life_days)
    # a song nobody played in the build data says nothing about how new songs fare (it may
    # not be released yet): it is left out of the training groups, not taught as a negative
    played = np.zeros(len(ids), dtype=bool)
    played[inter["_s"].unique().to_numpy()] = True
    sources_t, _ = make_sources(table_t, cf_t, _content_index(table_t, cfg, subset=played),
                                _pseudo_index(table_t, cfg, subset=played), cfg.candidates, rankable=played)
    if cfg.reranker.engine == "dask":  # issue 16: the frame built per partition of users on the Dask workers
        from apex_rank.ranking.dask_reranker import training_frame_on_dask

        frame, recall = training_frame_on_dask(training_frame, label_part, users_t, table_t, cf_t, sources_t, cfg=cfg)
    else:
        frame, recall = training_frame(label_part, users_t, table_t, cf_t, sources_t, cfg)
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
    reranker.max_gap_s, report["returning_users"] = _max_gap(fit_part, label_part, reranker, frame)
    report["max_gap_s"] = reranker.max_gap_s if np.isfinite(reranker.max_gap_s) else None
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
        cf_b, table_b, map_b = _fit_side(src, ids, E, priors, created, now_all if cfg.refit_on_all else now_fit,
                                             pmean, pstd, cfg)
        users_b = user_arrays(src, table_b, cfg.half_life_days)
        timings["cf_fit_serving_side"] = cf_b.fit_seconds
    else:
        cf_b, table_b, map_b, users_b = cf_t, table_t, map_t, users_t
    content_index = _content_index(table_b, cfg)
    pseudo_index = _pseudo_index(table_b, cfg)
    timings["serving_side_total"] = time.perf_counter() - t0
    report.update(
        n_users=len(users_b.user_ids),
        n_warm_songs=int(table_b.warm.sum()),
        n_cold_songs=int((~table_b.warm).sum()),
        timings=timings,
    )
    log.info("recommender built: %s", report)
    return RecommenderParts(
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


def to_seconds(s: pl.Series) -> np.ndarray:
    """Datetime/Date/int-seconds column → float64 epoch seconds (NaN for null)."""
    if isinstance(s.dtype, pl.Datetime):
        v = s.dt.epoch("us").cast(pl.Float64) / 1e6
    elif s.dtype == pl.Date:
        v = s.cast(pl.Datetime("us")).dt.epoch("us").cast(pl.Float64) / 1e6
    else:
        v = s.cast(pl.Float64)
    return v.fill_null(np.nan).to_numpy().astype(np.float64)


def user_arrays(inter: pl.DataFrame, table: SongTable, half_life_days: float) -> UserArrays:
    """Profiles, histories and activity for every user of ``inter`` (columns _u, _s, ts_s, weight):
    the batch entry point of the profile algorithm of :mod:`~apex_rank.ranking.state` (the
    half-life mean, ages from the table's ``now_s``), equal to folding each user's events with
    ``apply_event``."""
    users = sorted(inter["user_id"].unique().to_list())
    umap = pl.DataFrame({"user_id": pl.Series(users, dtype=pl.String), "_u": np.arange(len(users), dtype=np.int64)})
    j = inter.join(umap, on="user_id", how="left")
    u = j["_u"].to_numpy()
    s = j["_s"].to_numpy()
    w = j["weight"].cast(pl.Float64).to_numpy()
    ts = j["ts_s"].to_numpy()
    n_u, n_s = len(users), len(table)
    last = np.full(n_u, -np.inf)
    np.maximum.at(last, u, np.where(np.isfinite(ts), ts, -np.inf))
    last[~np.isfinite(last)] = np.nan
    ref = np.full(n_u, table.now_s)
    W = sp.csr_matrix((recency_weights(ts, w, table.now_s, half_life_days), (u, s)), shape=(n_u, n_s))
    total = np.asarray(W @ table.embeddings.astype(np.float64))
    mass = np.linalg.norm(total, axis=1)
    prof = l2_normalize(total.astype(np.float32))
    has = mass > 0  # no event of positive weight: no profile
    # histories: unique songs per user in order of first interaction, with their summed weights
    h = (
        j.select("_u", "_s", "ts_s", "weight")
        .with_row_index("_r")
        .sort(["_u", "ts_s", "_r"], nulls_last=True)
        .with_columns(pl.col("weight").cast(pl.Float64).sum().over(["_u", "_s"]).alias("_w"))
        .unique(["_u", "_s"], keep="first", maintain_order=True)
    )
    counts = np.bincount(h["_u"].to_numpy(), minlength=n_u)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    act = np.bincount(u, minlength=n_u).astype(np.int64)
    return UserArrays(users, np.ascontiguousarray(prof), has, indptr, h["_s"].to_numpy().astype(np.int64), act, last,
                      h["_w"].to_numpy().astype(np.float64), np.where(has, mass, 0.0), ref)


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
    """A ``cold_sim_share`` of the songs played in the fit part (sorted song positions): half of
    them the songs that reached the catalogue last (latest first play), half a seeded random
    draw among the rest; all random without timestamps.

    Songs lack plays for two reasons, and serving meets both: a new release, and a song whose
    history was lost or never logged (the item-cold protocols). A random draw simulates only the
    second: old songs, which the users who played them before will rarely play again. Half new
    releases raised the whole list and warm targets on the four data sets tried (before → after,
    NDCG@10, the default build otherwise unchanged): a synthetic world whose new releases took
    34% of the test plays, whole list 0.138 → 0.146, warm targets 0.136 → 0.142, new-song
    targets 0.063 → 0.070; its 23% twin 0.095 → 0.102, 0.069 → 0.076, 0.097 → 0.097; MovieLens
    item-cold (seed 44) 0.229 → 0.239, 0.230 → 0.242, 0.0095 → 0.0102; MovieLens new releases
    0.211 → 0.212, 0.210 → 0.213, and new-song targets 0.017 → 0 (35 users hold one).
    """
    played = np.sort(fit_part["_s"].unique().to_numpy())
    if cfg.cold_sim_share <= 0 or played.size < 2:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(cfg.seed)
    n = int(round(cfg.cold_sim_share * played.size))
    latest = np.zeros(0, dtype=np.int64)
    if np.isfinite(fit_part["ts_s"].to_numpy()).all():
        first = (fit_part.group_by("_s").agg(pl.col("ts_s").min().alias("first"))
                 .sort(["first", "_s"], descending=[True, False]))
        latest = first["_s"].to_numpy()[: n // 2].astype(np.int64)
    rest = np.setdiff1d(played, latest)
    return np.sort(np.r_[latest, rng.choice(rest, n - len(latest), replace=False)]).astype(np.int64)


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


FLOOR_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
MARGIN_KEPT = 0.5  # share of the reranker's validation margin over the ALS order a floor must keep


def _choose_cold_floor(reranker: Reranker, train_cold_fraction: float, base_rate: float) -> dict[str, Any]:
    """The minimum share of new songs in a list served without ``cold_share``, chosen on the
    reranker's validation groups: the largest of :data:`FLOOR_GRID` whose lists keep at least
    ``MARGIN_KEPT`` of the reranker's margin over the ALS order, on warm targets and on the whole
    list (0 when no floor does). The floor holds at every depth of the list (see
    :func:`~apex_rank.ranking.reranker.select_top_k`), lists whose scores put more new songs in
    the top k keep them, and serving scales it by the catalogue's fraction of new songs over
    the training side's ``train_cold_fraction`` (:meth:`Recommender.min_cold_share`): a
    catalogue with few new songs has few good ones.

    Why a floor: exposure is how a new song gathers the plays that warm it up, and the
    NDCG-optimal list starves new songs whenever their best picks are played a little less
    often than the tenth warm song (MovieLens item-cold: 0.1% of slots). A content-only list,
    blind to plays, gives new songs about their share of the catalogue, at every depth of the
    list; the floor lets the hybrid do the same where its margin over the ALS order pays for it.

    Why half the margin: the validation margin over the ALS order is larger than the margin on
    later data, whose CF is refitted on every play (MovieLens item-cold: +29% on validation,
    +11% on the test; a synthetic world whose releases surge after the cut: +75% and +59%),
    while what a spread floor costs is about the same on both (-17% and -16% of warm-target
    NDCG at 0.2 on MovieLens). Half the margin gave MovieLens item-cold floors of 0.1–0.15 and
    warm targets 0.99–1.11 × ALS in three seeds; "warm ≥ 0.97 × the ALS order on validation"
    alone chose 0.3 there and fell below ALS. The margin does not always carry over: in a
    synthetic world with 17% of test plays on new songs it was +66% on validation and -1% on the
    test, and the floor (0.3) took warm targets to 0.95 × ALS. The older cap at ``base_rate``
    (the label slice's share of new-song plays, still reported) kept the surge world's floor
    at 0.26, too low for its new songs to reach content-only quality (26% of label plays, 34%
    of test plays).
    """
    trials = reranker.floors_on_validation(FLOOR_GRID)
    als, trees = trials[0], trials[1]  # the ALS order; the reranker without a floor

    def keeps_margin(t: dict[str, Any]) -> bool:
        return all(t[m] >= als[m] + MARGIN_KEPT * max(trees[m] - als[m], 0.0) for m in ("ndcg_all", "ndcg_warm"))

    ok = [t["min_cold_share"] for t in trials[1:] if keeps_margin(t)]
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


GAP_QUANTILE = 0.9
MIN_GAP_S = 86400.0
MIN_RETURNING_USERS = 30


def _max_gap(fit: pl.DataFrame, label: pl.DataFrame, reranker: Reranker,
             frame: pl.DataFrame) -> tuple[float, dict[str, Any]]:
    """How long after a user's latest play the reranker's trees may rank (``Reranker.max_gap_s``),
    and the evidence for it (the build report's ``returning_users``).

    The gap of a training user is the time from their latest fit-part play to their first
    label play. When at least ``MIN_RETURNING_USERS`` validation users come back after more
    than ``MIN_GAP_S`` and the trees beat the ALS order for them by the reranker's
    ``min_val_gain``, the trees rank at any gap (inf). Otherwise they rank up to the
    ``GAP_QUANTILE`` of the gaps (at least ``MIN_GAP_S``): beyond the range they were trained
    on, with no evidence that their corrections carry over. Inf without timestamps.

    Why: the labels are each user's latest plays, which follow the fit part within a day for
    98.7% of MovieLens users (the same rating session). Trees trained on such groups learn what
    a user plays next in a session (``recent_cf_sim`` ranks second by gain) and lost to the ALS
    order for users who come back weeks later: new-releases split (a global cut; the median
    test user returns after 34 days), NDCG@10 0.183 against 0.216, with validation calling the
    trees 29% better. In a synthetic world without sessions the trees kept helping returning
    users (0.114 for everyone against 0.106 with the ALS order for them); its validation holds
    139 returning users (trees NDCG@10 0.172, ALS order 0.081), MovieLens's holds 2.
    """
    last = fit.group_by("user_id").agg(pl.col("ts_s").max().alias("a"))
    first = label.group_by("user_id").agg(pl.col("ts_s").min().alias("b"))
    gaps = (last.join(first, on="user_id").select("user_id", (pl.col("b") - pl.col("a")).alias("gap"))
            .filter(pl.col("gap").is_finite()))
    if gaps.height == 0:
        return float("inf"), {}
    covered = float(max(np.quantile(np.maximum(gaps["gap"].to_numpy(), 0.0), GAP_QUANTILE), MIN_GAP_S))
    back = gaps.filter((pl.col("gap") > MIN_GAP_S) & pl.col("user_id").is_in(list(reranker.validation_users)))
    val = frame.filter(pl.col("user_id").is_in(back["user_id"].implode())).sort("user_id", maintain_order=True)
    info: dict[str, Any] = {"n_validation_users": int(val["user_id"].n_unique()), "covered_gap_s": covered}
    if info["n_validation_users"] < MIN_RETURNING_USERS:
        return covered, info
    X = feature_matrix(val)
    y = val["label"].to_numpy()
    groups = val.group_by("user_id", maintain_order=True).len()["len"].to_numpy()
    k = reranker.config.eval_at
    info["ndcg_trees"] = group_ndcg(y, reranker.score_matrix(X), groups, k)
    info["ndcg_als_order"] = group_ndcg(y, -np.nan_to_num(X[:, FEATURES.index("rank_als")], nan=np.inf), groups, k)
    trusted = info["ndcg_trees"] >= (1.0 + reranker.config.min_val_gain) * info["ndcg_als_order"]
    return (float("inf") if trusted else covered), info


def _candidate_recall(frame: pl.DataFrame, n_positive: int) -> dict[str, float]:
    """Share of the label slice's recommendable positives that each source, and the union, returned."""
    pos = frame.filter(pl.col("label") > 0)
    out = {"union": pos.height / max(n_positive, 1)}
    for c in RANK_COLUMNS:
        out[c.removeprefix("rank_")] = int(pos[c].is_not_null().sum()) / max(n_positive, 1)
    out["n_positive_pairs"] = n_positive
    return out


def _train_apex(
    songs: pl.DataFrame, embeddings: pl.DataFrame, inter: pl.DataFrame, cfg: RecommenderConfig
) -> ApexPredictor:
    from apex_rank.features.apex_tables import (
        build_apex_dataset,
        embedding_recipe,
        labels_from_interactions,
        train_apex,
    )

    counts = None
    if "streams" not in songs.columns or "likes" not in songs.columns:
        songs, counts = labels_from_interactions(songs, inter)  # played songs only (see there)
        log.info("songs table lacks streams/likes: APEX popularity labels from the interaction counts of the "
                 "%d played songs", songs.height)
    data = build_apex_dataset(songs, embeddings, seed=cfg.seed, popularity_counts=counts)
    encoder, segmenting = embedding_recipe(embeddings)
    predictor, metrics, _ = train_apex(data, cfg.apex.train_config(cfg.seed), encoder=encoder, segmenting=segmenting)
    log.info("APEX trained on the way: best epoch %s", metrics.get("best_epoch"))
    return predictor


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


def _song_index(table: SongTable, cfg: RecommenderConfig, factory: str, vectors: np.ndarray, rows: np.ndarray,
                *, normalize: bool = True) -> CandidateIndex:
    """A FAISS candidate index over the songs at table positions ``rows``."""
    idx = CandidateIndex(vectors.shape[1], factory, normalize=normalize, nprobe=cfg.index.nprobe,
                         ef_search=cfg.index.ef_search, device="auto")
    if len(rows):
        idx.add([table.song_ids[i] for i in rows], vectors[rows])
    return idx


def _content_index(table: SongTable, cfg: RecommenderConfig, subset: np.ndarray | None = None) -> CandidateIndex:
    """Embeddings of every song (of ``subset``)."""
    rows = np.arange(len(table)) if subset is None else np.flatnonzero(subset)
    return _song_index(table, cfg, cfg.index.content_factory, table.embeddings, rows)


def _pseudo_index(table: SongTable, cfg: RecommenderConfig, subset: np.ndarray | None = None) -> CandidateIndex:
    """Pseudo CF factors of the songs without a CF factor (of ``subset``)."""
    rows = np.flatnonzero(~table.warm & (True if subset is None else subset))
    return _song_index(table, cfg, cfg.index.pseudo_factory, table.pseudo_factors, rows, normalize=False)


def training_frame(
    label_part: pl.DataFrame,
    users: UserArrays,
    songs: SongTable,
    cf: CFModel,
    sources: list[CandidateSource],
    cfg: RecommenderConfig,
) -> tuple[pl.DataFrame, dict[str, float]]:
    """The reranker's training frame: candidates (from ``sources``) + features + graded labels
    (``label``, from the summed ``weight`` of ``label_part``) for the users of ``users`` with
    later interactions in ``label_part`` (at most ``cfg.reranker.max_train_users``, seeded),
    and each source's recall of the label positives outside their history (build report)."""
    lab = label_part.group_by(["user_id", "song_id"]).agg(pl.col("weight").sum().alias("_w"))
    group_users = sorted(set(lab["user_id"].unique().to_list()) & set(users.user_ids))
    rng = np.random.default_rng(cfg.reranker.seed)
    cap = cfg.reranker.max_train_users
    if len(group_users) > cap:
        group_users = sorted(rng.choice(np.asarray(group_users, dtype=object), cap, replace=False).tolist())
    frames = []
    n_positive = 0
    for start in range(0, len(group_users), cfg.batch_users):
        states = [users.state(u, songs, cf) for u in group_users[start : start + cfg.batch_users]]
        cands = generate_candidates(states, sources, cfg.candidates)
        frames.append(build_feature_frame(states, cands, songs))
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


def _prior_stats(priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std over finite values (0 and 1 for untrained, all-NaN columns)."""
    ok = np.isfinite(priors)
    n = ok.sum(axis=0)
    x = np.where(ok, priors, 0.0).astype(np.float64)
    mean = x.sum(axis=0) / np.maximum(n, 1)
    var = (np.where(ok, (priors - mean) ** 2, 0.0)).sum(axis=0) / np.maximum(n, 1)
    std = np.sqrt(var)
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def _positions(ids: list[str], subset: list[str]) -> list[int]:
    pos = {s: i for i, s in enumerate(ids)}
    return [pos[s] for s in subset]


