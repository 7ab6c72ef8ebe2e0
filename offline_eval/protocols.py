"""Evaluation protocols: top-k ranking with slices, APEX regression, Music Arena preference.

Ranking protocol (:func:`evaluate_ranking`)
-------------------------------------------
1. Split the interactions (:mod:`~apex_rank.offline_eval.splits`); carve the validation split
   from train.
2. Fit every model on train only (cold items are absent from it). APEX is trained on the
   training songs: popularity targets from training counts (``streams`` = training users,
   ``likes`` = training ratings ≥ 4 when a ``rating`` column exists) and, when ratings exist,
   the mean training rating as the auxiliary quality label (``musicality`` column, 1-5).
3. ALS and BPR are tuned on the validation split over a small grid (NDCG@10 on ``all``). The
   hybrid's CF takes the tuned ALS settings whether or not ``als`` itself is in the run.
4. For every test user (a user with training history), each model ranks the full catalogue
   minus the user's training history; the metrics of :mod:`~apex_rank.offline_eval.metrics`
   are computed per slice:

   - ``all``: relevant = every test item of the user;
   - ``warm``: relevant = the user's test items that have training interactions;
   - ``cold``: relevant = the user's test items in the cold set, ranked in the full catalogue;
   - ``cold_only``: relevant = the same cold items, ranking restricted to cold items.

   ``cold``/``cold_only`` exist only for the ``item-cold`` and ``new-releases`` splits. A user with no relevant item
   in a slice is left out of it; ``n_users`` and ``n_users_skipped`` say how many.
5. Paired significance over users of hybrid vs every baseline (per slice, NDCG at the first
   k), Holm-corrected (:mod:`~apex_rank.offline_eval.significance`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from apex_rank.errors import ConfigError, SchemaError
from apex_rank.offline_eval import baselines as bl
from apex_rank.offline_eval.datasets import EvalDataset
from apex_rank.offline_eval.metrics import cold_share, coverage, novelty, ranking_metrics
from apex_rank.offline_eval.significance import compare_to_reference
from apex_rank.offline_eval.splits import Split, make_split, validation_split

log = logging.getLogger(__name__)

REPORT_SCHEMA = 1
SLICES = ("all", "warm", "cold", "cold_only")

# Published numbers, same protocol as our ``random`` split (Recommenders project, ML-100K,
# 75/25 stratified per user, k = 10, all ratings implicit positives, binary relevance).
REFERENCE_ML100K = {
    "source": "Recommenders project benchmark table (MovieLens-100K, stratified 75/25, k=10)",
    "ndcg@10": {"BiVAE": 0.475, "BPR": 0.442, "LightGCN": 0.420, "NCF": 0.396, "SAR": 0.382},
    "recall@10": {"BiVAE": 0.219, "BPR": 0.213},
}


@dataclass(frozen=True)
class RankingEvalConfig:
    """Settings of :func:`evaluate_ranking`.

    Attributes
    ----------
    split: one of :data:`~apex_rank.offline_eval.splits.SPLIT_KINDS`. seed: seeds the split,
        models and tests.
    ks: cut-offs. models: which of :data:`~apex_rank.offline_eval.baselines.MODELS` to run.
    train_share, cold_share: split proportions.
    tune: tune ALS/BPR on the validation split (else the first grid point is used).
    als_grid, bpr_grid: candidate hyper-parameter dicts for the CF wrapper.
    apex_epochs: epochs for the APEX head trained on the training songs.
    hybrid: keyword overrides for the Recommender's config (``RecommenderConfig`` fields).
    hybrid_grid: candidate ``hybrid`` overrides tuned on the validation split (empty, the
        default: none; the Recommender makes its own choices inside ``build``).
    n_permutations, n_bootstrap: sizes of the randomization test and the bootstrap.
    """

    split: str = "random"
    seed: int = 42
    ks: tuple[int, ...] = (10, 20, 50)
    models: tuple[str, ...] = bl.MODELS
    train_share: float = 0.75
    cold_share: float = 0.2
    tune: bool = True
    als_grid: tuple[dict[str, Any], ...] = bl.ALS_GRID
    bpr_grid: tuple[dict[str, Any], ...] = bl.BPR_GRID
    apex_epochs: int = 25
    hybrid: dict[str, Any] = field(default_factory=dict)
    hybrid_grid: tuple[dict[str, Any], ...] = ()
    n_permutations: int = 10000
    n_bootstrap: int = 2000

    def __post_init__(self) -> None:
        if not self.ks or any(int(k) < 1 for k in self.ks):
            raise ConfigError(f"ks must be positive integers, got {list(self.ks)}")
        bl.model_names(self.models)


COLD_SPLITS = ("item-cold", "new-releases")


class Timer:
    """Wall-clock seconds per named stage (summed when a stage repeats)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0
            log.info("stage %s: %.2f s", name, time.perf_counter() - t0)


# ------------------------------------------------------------------------------ relevance
@dataclass
class Targets:
    """Test users (indices into the context's users) and their relevant items per slice."""

    users: dict[str, np.ndarray]
    relevant: dict[str, list[np.ndarray]]
    skipped: dict[str, int]


def build_targets(ctx: bl.EvalContext, test: pl.DataFrame, *, cold_slices: bool) -> Targets:
    """Relevant items per user and slice (see module doc)."""
    upos = {u: i for i, u in enumerate(ctx.user_ids)}
    ipos = {s: i for i, s in enumerate(ctx.item_ids)}
    unknown = [s for s in test["song_id"].unique().to_list() if s not in ipos]
    if unknown:
        raise SchemaError(f"test interactions mention song_id {unknown[0]!r}, absent from the songs table")
    t = test.select("user_id", "song_id").unique()
    u = np.fromiter((upos.get(x, -1) for x in t["user_id"].to_list()), dtype=np.int64, count=t.height)
    i = np.fromiter((ipos[x] for x in t["song_id"].to_list()), dtype=np.int64, count=t.height)
    keep = u >= 0
    u, i = u[keep], i[keep]
    hist = ctx.train[u, i].A1 > 0 if u.size else np.zeros(0, bool)
    u, i = u[~hist], i[~hist]  # a test pair already in the history can never be recommended
    in_train = np.asarray(ctx.train.sum(axis=0)).ravel() > 0
    masks = {"all": np.ones(u.size, bool), "warm": in_train[i]}
    if cold_slices:
        masks["cold"] = ctx.is_cold[i]
        masks["cold_only"] = ctx.is_cold[i]
    all_users = np.unique(u)
    users: dict[str, np.ndarray] = {}
    relevant: dict[str, list[np.ndarray]] = {}
    skipped: dict[str, int] = {}
    order = np.lexsort((i, u))
    u, i = u[order], i[order]
    for name, m in masks.items():
        m = m[order]
        us, start = np.unique(u[m], return_index=True)
        items = np.split(i[m], start[1:]) if us.size else []
        users[name] = us
        relevant[name] = items
        skipped[name] = int(all_users.size - us.size)
    return Targets(users, relevant, skipped)


def slice_metrics(
    ctx: bl.EvalContext, topk: np.ndarray, relevant: list[np.ndarray], ks: Sequence[int], n_train_users: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Mean metrics (plus coverage, novelty, cold share per k) and the per-user arrays."""
    per_user = ranking_metrics(topk, relevant, ks, ctx.n_items)
    out: dict[str, float] = {name: float(v.mean()) for name, v in per_user.items()}
    counts = ctx.user_counts()
    for k in ks:
        out[f"coverage@{k}"] = coverage(topk, k, ctx.n_items)
        out[f"novelty@{k}"] = novelty(topk, k, counts, n_train_users)
        out[f"cold_share@{k}"] = cold_share(topk, k, ctx.is_cold)
    out["n_users"] = int(topk.shape[0])
    return out, per_user


# ------------------------------------------------------------------------------ APEX
def apex_songs_table(ctx: bl.EvalContext) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    """Songs table of the training songs with APEX labels from training interactions only.

    Labels from :func:`~apex_rank.features.apex_tables.labels_from_interactions`: streams are the
    number of training users per song (played songs only), likes and musicality come from ratings
    when the interactions carry them; a seeded 90/10 train/val split by song.
    """
    from apex_rank.features.apex_tables import labels_from_interactions

    songs, pop = labels_from_interactions(ctx.songs.select("song_id"), ctx.train_df,
                                          plays=pl.col("user_id").n_unique(), likes_from_plays=False)
    rng = np.random.default_rng(ctx.seed)
    songs = songs.with_columns(pl.Series("split", np.where(rng.random(songs.height) < 0.9, "train", "val")))
    return songs, pop


def fit_apex(ctx: bl.EvalContext, *, epochs: int) -> Any:
    """Train an APEX predictor on the context's training songs (see module doc): the
    small-catalogue recipe (:class:`~apex_rank.ranking.recommender.ApexFitConfig`) with ``epochs``."""
    from apex_rank.features.apex_tables import build_apex_dataset, train_apex
    from apex_rank.ranking.recommender import ApexFitConfig

    songs, pop = apex_songs_table(ctx)
    emb = ctx.embeddings.filter(pl.col("song_id").is_in(songs["song_id"].implode()))
    data = build_apex_dataset(songs, emb, seed=ctx.seed, popularity_counts=pop)
    predictor, metrics, _ = train_apex(data, ApexFitConfig(epochs=epochs).train_config(ctx.seed), encoder=None)
    log.info("APEX trained on %d training songs (best epoch %s)", len(songs), metrics.get("best_epoch"))
    return predictor


def attach_priors(ctx: bl.EvalContext, predictor: Any) -> None:
    """Predict the 7 priors for every catalogue song (warm and cold) into ``ctx``."""
    ctx.apex = predictor
    ctx.priors = predictor.predict(_raw_X(ctx))


def _raw_X(ctx: bl.EvalContext) -> np.ndarray:
    from apex_rank.schemas import embedding_matrix

    ids, X = embedding_matrix(ctx.embeddings)
    pos = {s: i for i, s in enumerate(ids)}
    return X[[pos[s] for s in ctx.item_ids]]


# ------------------------------------------------------------------------------ ranking
GLOBAL_CUT_SPLITS = ("temporal", "new-releases")


def request_time(split: Split) -> float | None:
    """When the test's lists are asked for: the cut of a global time split (its first test
    timestamp, epoch seconds); None for splits whose test follows each user's own history."""
    if split.kind not in GLOBAL_CUT_SPLITS or split.test.height == 0:
        return None
    ts = split.test["ts"]
    if ts.dtype.is_temporal():
        return float(ts.cast(pl.Datetime("us")).dt.epoch("us").to_numpy().min()) / 1e6
    return float(ts.cast(pl.Float64).to_numpy().min())


def _fit_rank(
    name: str, params: dict[str, Any], ctx: bl.EvalContext, users: np.ndarray, k: int,
    allowed: np.ndarray | None = None,
) -> tuple[bl.Ranker, np.ndarray]:
    ranker = bl.make_ranker(name, params).fit(ctx)
    return ranker, ranker.rank(users, k, allowed=allowed)


def hybrid_params(cfg: RankingEvalConfig, als_params: dict[str, Any] | None) -> dict[str, Any]:
    """The Recommender config overrides for the hybrid.

    Its CF component takes the ALS hyper-parameters tuned on the validation split (unless
    ``cfg.hybrid`` sets ``cf`` itself). Under the ``random`` split the hybrid is built on the
    training interactions without ``ts`` (``drop_ts``): that protocol has no time order, and the
    Recommender then draws its reranker-label slice at random, like the test, instead of taking
    the latest quarter of a random sample.
    """
    out = dict(cfg.hybrid)
    if "cf" not in out and als_params:
        out["cf"] = {"model": "als", **als_params, "seed": cfg.seed}
        out.setdefault("cf_grid", [])  # tuned here, on the validation split: no second search in build
    if "seed" not in out:
        out["seed"] = cfg.seed
    out.setdefault("drop_ts", cfg.split == "random")
    return out


def tune_model(
    name: str, grid: Sequence[dict[str, Any]], vctx: bl.EvalContext, vtargets: Targets, k: int = 10
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick the grid point with the best validation NDCG@k on ``all``; returns (best, trials)."""
    users = vtargets.users["all"]
    trials: list[dict[str, Any]] = []
    for params in tqdm(grid, desc=f"tune {name}", leave=False):
        _, topk = _fit_rank(name, dict(params), vctx, users, k)
        ndcg = float(ranking_metrics(topk, vtargets.relevant["all"], [k], vctx.n_items)[f"ndcg@{k}"].mean())
        trials.append({"params": dict(params), f"val_ndcg@{k}": ndcg})
        log.info("tune %s %s: val ndcg@%d = %.4f", name, params, k, ndcg)
    best = max(trials, key=lambda t: t[f"val_ndcg@{k}"])
    return dict(best["params"]), trials


def evaluate_ranking(
    data: EvalDataset, config: RankingEvalConfig | None = None,
    *, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the ranking protocol (module doc) and return the ``report.json`` dict.

    Layout: ``{"schema": 1, "dataset", "split": {"kind", "seed", ...counts}, "k": [...],
    "models": {model: {slice: {"ndcg@10": ..., "n_users": ...}}}, "significance":
    {slice: {baseline: {...}}}, "timings_s": {stage: s}, "tuning": {...}, "params": {...},
    "skipped_users": {slice: n}, "reference": {...}}``.
    """
    cfg = config or RankingEvalConfig()
    say = progress or (lambda msg: log.info("%s", msg))
    ks = tuple(sorted(int(k) for k in cfg.ks))
    timer = Timer()
    cold = cfg.split in COLD_SPLITS
    slices = SLICES if cold else ("all", "warm")
    hybrid_grid = cfg.hybrid_grid if "hybrid" in cfg.models and cfg.tune else ()
    # the hybrid's CF takes the tuned ALS settings, whichever baselines are in the run
    tune_cf = {"als": "als" in cfg.models or "hybrid" in cfg.models, "bpr": "bpr" in cfg.models}
    with timer.stage("split"):
        split = make_split(data.interactions, cfg.split, seed=cfg.seed, train_share=cfg.train_share,
                           cold_share=cfg.cold_share)
        ctx = bl.build_context(data.songs, data.embeddings, split.train, split.cold_items, seed=cfg.seed)
        ctx.request_s = request_time(split)
        targets = build_targets(ctx, split.test, cold_slices=cold)
        need_val = cfg.tune and any(tune_cf.values()) or bool(hybrid_grid)
        if need_val:
            vsplit = validation_split(split, train_share=cfg.train_share, cold_share=cfg.cold_share)
            vctx = bl.build_context(data.songs, data.embeddings, vsplit.train,
                                    split.cold_items | vsplit.cold_items, seed=cfg.seed)
            vctx.request_s = request_time(vsplit)
            vtargets = build_targets(vctx, vsplit.test, cold_slices=cold)
    say(f"split {cfg.split}: {split.info}")
    needs_apex = any(m in cfg.models for m in ("apex_prior", "hybrid"))
    if needs_apex:
        with timer.stage("apex_train"):
            attach_priors(ctx, fit_apex(ctx, epochs=cfg.apex_epochs))
            if hybrid_grid:
                attach_priors(vctx, fit_apex(vctx, epochs=cfg.apex_epochs))
    params: dict[str, dict[str, Any]] = {m: {} for m in cfg.models}
    tuning: dict[str, Any] = {}
    for name, grid in (("als", cfg.als_grid), ("bpr", cfg.bpr_grid)):
        if not tune_cf[name]:
            continue
        if cfg.tune and len(grid) > 1:
            with timer.stage(f"tune_{name}"):
                params[name], tuning[name] = tune_model(name, grid, vctx, vtargets, k=ks[0])
            say(f"tuned {name}: {params[name]}")
        else:
            params[name] = dict(grid[0])
    if "hybrid" in cfg.models:
        params["hybrid"] = hybrid_params(cfg, params.get("als"))
        if hybrid_grid:
            with timer.stage("tune_hybrid"):
                hgrid = [{**params["hybrid"], **g} for g in hybrid_grid]
                params["hybrid"], tuning["hybrid"] = tune_model("hybrid", hgrid, vctx, vtargets, k=ks[0])
            say(f"tuned hybrid: {params['hybrid']}")
    kmax = max(ks)
    n_train_users = len(ctx.user_ids)
    models: dict[str, dict[str, dict[str, float]]] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {s: {} for s in slices}
    fitted_params: dict[str, Any] = {}
    all_users = targets.users["all"]
    for name in tqdm(cfg.models, desc="models", leave=False):
        with timer.stage(f"fit_rank_{name}"):
            ranker, topk_all = _fit_rank(name, params[name], ctx, all_users, kmax)
            row = {int(u): r for r, u in enumerate(all_users)}
            res: dict[str, dict[str, float]] = {}
            for s in slices:
                us = targets.users[s]
                if us.size == 0:
                    continue
                if s == "cold_only":
                    topk = ranker.rank(us, kmax, allowed=ctx.is_cold)
                else:
                    topk = topk_all[[row[int(u)] for u in us]]
                res[s], pu = slice_metrics(ctx, topk, targets.relevant[s], ks, n_train_users)
                per_user[s][name] = pu[f"ndcg@{ks[0]}"]
            models[name] = res
            fitted_params[name] = ranker.params()
        say(f"{name}: " + ", ".join(f"{s} ndcg@{ks[0]}={v[f'ndcg@{ks[0]}']:.4f}" for s, v in res.items()))
    significance: dict[str, Any] = {}
    if "hybrid" in cfg.models and len(cfg.models) > 1:
        with timer.stage("significance"):
            for s in slices:
                if "hybrid" in per_user[s]:
                    significance[s] = compare_to_reference(
                        per_user[s], "hybrid", n_permutations=cfg.n_permutations,
                        n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
            significance["metric"] = f"ndcg@{ks[0]}"
            significance["test"] = "two-sided paired randomization (sign-flip) test, Holm-corrected; t-test also given"
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "dataset": data.name,
        "split": {"kind": split.kind, "seed": split.seed, **split.info},
        "k": list(ks),
        "models": models,
        "significance": significance,
        "timings_s": {k: round(v, 3) for k, v in timer.stages.items()},
        "tuning": tuning,
        "params": fitted_params,
        "skipped_users": targets.skipped,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("als_grid", "bpr_grid")},
    }
    if data.name == "movielens-100k" and cfg.split == "random":
        report["reference"] = REFERENCE_ML100K
    return report


def evaluate_ranking_seeds(
    data: EvalDataset, config: RankingEvalConfig, seeds: Sequence[int],
    *, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_ranking` once per seed (split, tuning and models all reseeded).

    The report is the first seed's, with ``models`` replaced by the mean over seeds and
    ``models_sd`` (sample sd, ddof=1), ``per_seed`` ({seed: models}) and ``seeds`` added;
    ``significance`` stays the first seed's (per-user pairs do not pool across splits).
    """
    if not seeds:
        raise ConfigError("seeds: give at least one seed")
    reports = [evaluate_ranking(data, replace(config, seed=int(s)), progress=progress) for s in seeds]
    out = dict(reports[0])
    mean: dict[str, dict[str, dict[str, float]]] = {}
    sd: dict[str, dict[str, dict[str, float]]] = {}
    for m, res in reports[0]["models"].items():
        mean[m], sd[m] = {}, {}
        for s, vals in res.items():
            runs = [r["models"][m][s] for r in reports if s in r["models"].get(m, {})]
            mean[m][s] = {k: float(np.mean([r[k] for r in runs])) for k in vals}
            sd[m][s] = {k: float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0
                        for k in vals if k != "n_users"}
    out.update(models=mean, models_sd=sd, seeds=[int(s) for s in seeds],
               per_seed={str(s): r["models"] for s, r in zip(seeds, reports, strict=True)},
               split_per_seed={str(s): r["split"] for s, r in zip(seeds, reports, strict=True)})
    return out


def with_overrides(cfg: RankingEvalConfig, **kw: Any) -> RankingEvalConfig:
    """``dataclasses.replace`` that skips ``None`` values (CLI overrides)."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})


# ------------------------------------------------------------------------------ APEX regression
def evaluate_apex(predictor: Any, songs: pl.DataFrame, embeddings: pl.DataFrame, *,
                  gamma: float = 1.0) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """APEX protocol 1: per-task MSE, MAE, Pearson r, Spearman ρ of ``predictor`` on ``songs``.

    Labels: the five aesthetic columns as they are (null = unlabelled, left out of that task);
    ``score_streams``/``score_likes`` = ``100 · p^γ`` of the ``streams``/``likes`` counts, with
    the percentile mapping the predictor was trained with (its ``target_transform``) or, when it
    carries none, one fitted on these songs. Metrics via :func:`apex_rank.metrics.regression_metrics`.

    Returns ``(metrics, labels (n, 7), predictions (n, 7))`` with ``metrics`` =
    ``{"n_songs", "tasks": {task: {"mse", "mae", "pearson", "spearman", "n"}}}``.
    """
    from apex_rank.features.targets import PopularityTransform
    from apex_rank.metrics import regression_metrics
    from apex_rank.schemas import embedding_matrix, validate_songs
    from apex_rank.tasks import AESTHETIC_TASKS, APEX_TASKS

    validate_songs(songs)
    ids, X = embedding_matrix(embeddings, expected_width=getattr(predictor, "input_dim", None))
    pos = {s: i for i, s in enumerate(ids)}
    song_ids = songs["song_id"].to_list()
    missing = [s for s in song_ids if s not in pos]
    if missing:
        raise SchemaError(f"{len(missing)} song(s) have no embedding, e.g. song_id {missing[0]!r}")
    X = X[[pos[s] for s in song_ids]]
    Y = np.full((len(song_ids), len(APEX_TASKS)), np.nan)
    platforms = songs["platform"].to_list() if "platform" in songs.columns else None
    tf = getattr(predictor, "target_transform", {}) or {}
    for task, col in (("score_streams", "streams"), ("score_likes", "likes")):
        if col not in songs.columns:
            continue
        counts = songs[col].cast(pl.Float64).fill_null(np.nan).to_numpy()
        t = (PopularityTransform.from_dict(tf[task]) if task in tf
             else PopularityTransform(gamma=gamma).fit(counts, platforms, name=f"songs.{col}"))
        Y[:, APEX_TASKS.index(task)] = t.transform(counts, platforms)
    for task in AESTHETIC_TASKS:
        if task in songs.columns:
            Y[:, APEX_TASKS.index(task)] = songs[task].cast(pl.Float64).fill_null(np.nan).to_numpy()
    P = np.asarray(predictor.predict(X), dtype=np.float64)
    tasks = [t for j, t in enumerate(APEX_TASKS) if np.isfinite(P[:, j]).all() and np.isfinite(Y[:, j]).any()]
    if not tasks:
        raise SchemaError("no task has both a label in the songs table and a prediction from the model")
    cols = [APEX_TASKS.index(t) for t in tasks]
    metrics = regression_metrics(Y[:, cols], P[:, cols], tasks)
    return {"n_songs": len(song_ids), "tasks": metrics}, Y, P


# ------------------------------------------------------------------------------ preference
PREF_FEATURES_ALL = ("score_streams", "score_likes", "coherence", "musicality", "memorability", "clarity",
                     "naturalness")
PREF_FEATURES_POP = ("score_streams", "score_likes")


def battle_table(battles: pl.DataFrame, predictions: pl.DataFrame) -> pl.DataFrame:
    """Join battles with predictions for both sides; keep decisive battles (A or B).

    ``battles`` needs ``preference`` (A, B, TIE, BOTH_BAD), ``is_instrumental`` (bool) and the
    clip keys ``song_a``/``song_b`` (or ``audio_a``/``audio_b``), matched against the
    predictions' ``song_id`` (or ``audio_path`` when the predictions have that column).
    Returns one row per kept battle with ``y`` (1 = A preferred), ``is_instrumental`` and
    ``<task>_a`` / ``<task>_b`` columns.
    """
    from apex_rank.schemas import check_column

    check_column(battles, "preference", "str", "battles")
    if "is_instrumental" not in battles.columns:
        raise SchemaError("battles table: required column 'is_instrumental' is missing")
    if "song_a" in battles.columns and "song_b" in battles.columns:
        ka, kb = "song_a", "song_b"
    elif "audio_a" in battles.columns and "audio_b" in battles.columns:
        ka, kb = "audio_a", "audio_b"
    else:
        raise SchemaError("battles table: needs clip key columns 'song_a'/'song_b' or 'audio_a'/'audio_b'")
    key = "audio_path" if ka == "audio_a" and "audio_path" in predictions.columns else "song_id"
    check_column(predictions, key, "str", "predictions")
    missing = [t for t in PREF_FEATURES_ALL if t not in predictions.columns]
    if len(missing) == len(PREF_FEATURES_ALL):
        raise SchemaError(f"predictions table has none of the APEX task columns {list(PREF_FEATURES_ALL)}")
    prefs = battles["preference"].str.to_uppercase()
    bad = [p for p in prefs.unique().to_list() if p not in ("A", "B", "TIE", "BOTH_BAD")]
    if bad:
        raise SchemaError(f"battles table: preference {bad[0]!r} is not one of A, B, TIE, BOTH_BAD")
    b = battles.with_columns(prefs.alias("preference")).filter(pl.col("preference").is_in(["A", "B"]))
    tasks = [t for t in PREF_FEATURES_ALL if t in predictions.columns]
    pred = predictions.select(key, *[pl.col(t).cast(pl.Float64) for t in tasks]).unique(subset=[key])
    out = b.select(pl.col(ka).cast(pl.String).alias("_a"), pl.col(kb).cast(pl.String).alias("_b"),
                   pl.col("is_instrumental").cast(pl.Boolean),
                   (pl.col("preference") == "A").cast(pl.Int64).alias("y"))
    out = out.join(pred.rename({key: "_a", **{t: f"{t}_a" for t in tasks}}), on="_a", how="left")
    out = out.join(pred.rename({key: "_b", **{t: f"{t}_b" for t in tasks}}), on="_b", how="left")
    lost = out.filter(pl.col(f"{tasks[0]}_a").is_null() | pl.col(f"{tasks[0]}_b").is_null())
    if lost.height:
        row = lost.row(0, named=True)
        clip = row["_a"] if row[f"{tasks[0]}_a"] is None else row["_b"]
        raise SchemaError(f"{lost.height} battle(s) refer to clips without predictions, e.g. {clip!r}")
    return out


def preference_features(table: pl.DataFrame, tasks: Sequence[str]) -> np.ndarray:
    """Per battle: ``a - b`` and ``log((a + ε) / (b + ε))`` per task (ε = 1), ``is_instrumental``
    and its products with the differences → (n, 3·T + 1) float64."""
    inst = table["is_instrumental"].cast(pl.Float64).to_numpy()[:, None]
    A = np.column_stack([table[f"{t}_a"].to_numpy() for t in tasks]).astype(np.float64)
    B = np.column_stack([table[f"{t}_b"].to_numpy() for t in tasks]).astype(np.float64)
    diff = A - B
    ratio = np.log((A + 1.0) / (B + 1.0))
    return np.hstack([diff, ratio, inst, inst * diff])


def _binary_scores(y: np.ndarray, score: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    out = {"n": float(y.size), "accuracy": float(accuracy_score(y, pred)) if y.size else float("nan"),
           "f1": float(f1_score(y, pred, zero_division=0.0)) if y.size else float("nan")}
    out["auc"] = float(roc_auc_score(y, score)) if np.unique(y).size == 2 else float("nan")
    return out


def _by_group(y: np.ndarray, score: np.ndarray, pred: np.ndarray, inst: np.ndarray) -> dict[str, dict[str, float]]:
    return {"overall": _binary_scores(y, score, pred),
            "instrumental": _binary_scores(y[inst], score[inst], pred[inst]),
            "vocal": _binary_scores(y[~inst], score[~inst], pred[~inst])}


def evaluate_preference(battles: pl.DataFrame, predictions: pl.DataFrame, *, n_folds: int = 10,
                        seed: int = 42) -> dict[str, Any]:
    """The Music Arena preference protocol (``APEX_SPEC.md``, protocol 2).

    - Direct rules, correct direction: predict A iff ``p_A > p_B`` for one task's prediction
      (score = ``p_A - p_B`` for the AUC); one rule per task plus ``mean_aesthetic`` (mean of
      the five aesthetic predictions) when present. Ties predict B.
    - Classifiers with 10-fold stratified CV (seeded): logistic regression and an RBF SVM,
      both after standardisation, on :func:`preference_features`, once with all seven
      predictions (``with_aesthetic``) and once with the two popularity ones
      (``without_aesthetic``). Out-of-fold scores give accuracy, AUC and F1.

    Everything is reported overall and for instrumental / vocal battles.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    table = battle_table(battles, predictions)
    y = table["y"].to_numpy().astype(np.int64)
    inst = table["is_instrumental"].to_numpy().astype(bool)
    if y.size < 2 * n_folds or np.bincount(y, minlength=2).min() < n_folds:
        raise SchemaError(f"preference protocol needs at least {n_folds} decisive battles of each outcome "
                          f"for {n_folds}-fold CV; found A={int(y.sum())}, B={int((1 - y).sum())}")
    tasks = [t for t in PREF_FEATURES_ALL if f"{t}_a" in table.columns]
    direct: dict[str, Any] = {}
    rules = {t: (table[f"{t}_a"].to_numpy(), table[f"{t}_b"].to_numpy()) for t in tasks}
    aest = [t for t in tasks if t not in PREF_FEATURES_POP]
    if aest:
        rules["mean_aesthetic"] = (np.mean([rules[t][0] for t in aest], axis=0),
                                   np.mean([rules[t][1] for t in aest], axis=0))
    for name, (a, b) in rules.items():
        s = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        direct[name] = _by_group(y, s, (s > 0).astype(np.int64), inst)
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    classifiers: dict[str, Any] = {}
    feature_sets = {"with_aesthetic": tasks, "without_aesthetic": [t for t in tasks if t in PREF_FEATURES_POP]}
    for fs_name, fs in feature_sets.items():
        if not fs:
            continue
        X = preference_features(table, fs)
        models = {
            "logistic_regression": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
            "svm": lambda: make_pipeline(StandardScaler(), SVC(kernel="rbf", C=1.0, gamma="scale")),
        }
        for m_name, factory in models.items():
            score = np.zeros(y.size)
            for tr, te in skf.split(X, y):
                clf = factory().fit(X[tr], y[tr])
                score[te] = clf.decision_function(X[te])
            classifiers[f"{m_name}/{fs_name}"] = _by_group(y, score, (score > 0).astype(np.int64), inst)
    return {"n_battles": int(battles.height), "n_decisive": int(y.size), "n_instrumental": int(inst.sum()),
            "share_A": float(y.mean()), "n_folds": n_folds, "seed": seed, "direct": direct,
            "classifiers": classifiers,
            "reference": {"source": "APEX authors' notebook, 1,259 Music Arena battles, 10-fold CV",
                          "logistic_regression_auc": 0.600, "svm_auc": 0.614,
                          "direct_rule_accuracy": "0.45-0.50 (direction inverted)"}}
