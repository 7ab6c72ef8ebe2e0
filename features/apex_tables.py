"""From tables to a trained APEX predictor: join songs and embeddings, build labels, split, train.

Labels: ``score_streams`` / ``score_likes`` from the ``streams`` / ``likes`` counts through a
:class:`~apex_rank.features.targets.PopularityTransform` fitted on the training split only
(per platform when a ``platform`` column exists); the five aesthetic columns as they are (null
= unlabelled, masked out of the loss). When the songs table has no ``streams`` column, callers
may pass ``popularity_counts`` instead: :func:`labels_from_interactions` derives them from
interaction counts (the recommender's build and the offline evaluation both use it).

Split: the songs table's ``split`` column (``train``/``val``/``test``) when present, otherwise a
seeded 80/10/10 split by song.

Modes: *song* mode takes one embedding per song (the mean of its segments, the paper's best
setting). *Segment* mode takes a segments table (``song_id``, ``segment`` int, ``embedding``;
one row per 30 s segment); every segment carries its song's labels and split (so no song is on
both sides of a split), and metrics average segment predictions per song first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from apex_rank.errors import SchemaError
from apex_rank.features.targets import PopularityTransform
from apex_rank.metrics import aggregate_by_song, regression_metrics
from apex_rank.predictor import ApexPredictor
from apex_rank.schemas import embedding_matrix, embeddings_frame, validate_songs
from apex_rank.tasks import AESTHETIC_TASKS, APEX_TASKS
from apex_rank.training import ApexTrainer, TrainConfig, TrainResult

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class ApexDataset:
    """Aligned arrays for APEX: ids, X (n, d), Y (n, 7) in APEX_TASKS order (NaN = missing), split."""

    song_ids: list[str]
    X: np.ndarray
    Y: np.ndarray
    split: np.ndarray
    transforms: dict[str, PopularityTransform] = field(default_factory=dict)
    mode: str = "song"

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        m = self.split == name
        return self.X[m], self.Y[m]


def assign_split(n: int, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """A seeded random train/val/test assignment of ``n`` rows."""
    rng = np.random.default_rng(seed)
    r = rng.random(n)
    a, b = fractions[0], fractions[0] + fractions[1]
    return np.where(r < a, "train", np.where(r < b, "val", "test"))


def build_apex_dataset(
    songs: pl.DataFrame,
    embeddings: pl.DataFrame,
    *,
    gamma: float = 1.0,
    seed: int = 42,
    popularity_counts: dict[str, np.ndarray] | None = None,
) -> ApexDataset:
    """Join ``songs`` and ``embeddings`` on song_id and build labels (see module doc).

    Songs without an embedding are an error naming the first one; embeddings without a song row
    are ignored with a log line. ``popularity_counts`` maps ``streams``/``likes`` to count arrays
    aligned with ``songs`` rows, used where the table lacks that column.
    """
    validate_songs(songs)
    if "segment_embeddings" in embeddings.columns:  # an embedding table kept with its segments
        embeddings = explode_segments(embeddings)
    if "segment" in embeddings.columns:
        return _segment_dataset(songs, embeddings, gamma=gamma, seed=seed, popularity_counts=popularity_counts)
    ids, X = embedding_matrix(embeddings)
    pos = {s: i for i, s in enumerate(ids)}
    missing = [s for s in songs["song_id"].to_list() if s not in pos]
    if missing:
        raise SchemaError(f"{len(missing)} song(s) have no embedding, e.g. song_id {missing[0]!r}")
    extra = len(ids) - songs.height
    if extra > 0:
        log.info("%d embeddings have no row in the songs table and are not used", extra)
    song_ids = songs["song_id"].to_list()
    X = X[[pos[s] for s in song_ids]]
    if "split" in songs.columns:
        split = np.asarray(songs["split"].cast(pl.String).to_list(), dtype=object)
        bad = [s for s in set(split.tolist()) if s not in SPLITS]
        if bad:
            raise SchemaError(f"songs table: column 'split' has value {bad[0]!r}; allowed {SPLITS}")
    else:
        split = assign_split(len(song_ids), seed).astype(object)
    if not (split == "train").any() or not (split == "val").any():
        raise SchemaError("APEX training needs at least one 'train' and one 'val' song")
    Y = np.full((len(song_ids), len(APEX_TASKS)), np.nan, dtype=np.float32)
    platforms = songs["platform"].to_list() if "platform" in songs.columns else None
    train = split == "train"
    transforms: dict[str, PopularityTransform] = {}
    for task, col in (("score_streams", "streams"), ("score_likes", "likes")):
        if col in songs.columns:
            counts = songs[col].cast(pl.Float64).fill_null(np.nan).to_numpy()
        elif popularity_counts is not None and col in popularity_counts:
            counts = np.asarray(popularity_counts[col], dtype=np.float64)
        else:
            continue
        plat_train = None if platforms is None else [p for p, t in zip(platforms, train) if t]
        tf = PopularityTransform(gamma=gamma).fit(counts[train], plat_train, name=f"songs.{col}")
        Y[:, APEX_TASKS.index(task)] = tf.transform(counts, platforms)
        transforms[task] = tf
    for task in AESTHETIC_TASKS:
        if task in songs.columns:
            Y[:, APEX_TASKS.index(task)] = songs[task].cast(pl.Float64).fill_null(np.nan).to_numpy()
    if np.isnan(Y).all():
        raise SchemaError("songs table has no label column (streams, likes or an aesthetic score)")
    return ApexDataset(song_ids, X, Y, split, transforms)


def labels_from_interactions(
    songs: pl.DataFrame,
    interactions: pl.DataFrame,
    *,
    plays: pl.Expr | None = None,
    likes_from_plays: bool = True,
) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    """APEX popularity labels from interactions: the played rows of ``songs`` and their counts.

    Returns ``(played_songs, popularity_counts)``, the arguments :func:`build_apex_dataset` takes.
    ``plays`` is the per-song aggregate over ``interactions`` grouped by ``song_id`` (default:
    the sum of ``weight``). ``popularity_counts["streams"]`` is that count, aligned with
    ``played_songs``; ``likes`` is the number of ratings >= 4 when ``interactions`` has a
    ``rating`` column (which also gives ``musicality``, the mean rating clipped to [1, 5], to a
    table without one), otherwise the play count again when ``likes_from_plays``.

    Only played songs (a count above zero) are kept: a song nobody played yet has an unknown
    popularity, not a popularity of zero, and training on zeros for a catalogue's new songs
    would teach APEX that exactly those songs are unpopular.
    """
    aggs = [(pl.col("weight").sum() if plays is None else plays).cast(pl.Float64).alias("_plays")]
    rated = "rating" in interactions.columns
    if rated:
        aggs += [pl.col("rating").mean().alias("_mean_rating"), (pl.col("rating") >= 4).sum().alias("_likes")]
    per_song = songs.select("song_id").join(
        interactions.group_by("song_id").agg(aggs), on="song_id", how="left", maintain_order="left"
    )
    n = per_song["_plays"].fill_null(0.0).to_numpy()
    played = n > 0
    out = songs.filter(pl.Series(played))
    counts: dict[str, np.ndarray] = {"streams": n[played]}
    if rated:
        rated_played = per_song.filter(pl.Series(played))
        counts["likes"] = rated_played["_likes"].cast(pl.Float64).to_numpy()
        if "musicality" not in out.columns:
            out = out.with_columns(rated_played["_mean_rating"].clip(1.0, 5.0).alias("musicality"))
    elif likes_from_plays:
        counts["likes"] = n[played]
    return out, counts


def explode_segments(table: pl.DataFrame) -> pl.DataFrame:
    """An embeddings table with a ``segment_embeddings`` column → one row per segment
    (``song_id``, ``segment``, ``embedding``), the input of segment mode."""
    if "segment_embeddings" not in table.columns:
        raise SchemaError("embeddings table has no 'segment_embeddings' column (embed with keep_segments)")
    return (
        table.select("song_id", pl.col("segment_embeddings").alias("embedding"))
        .explode("embedding")
        .with_columns(pl.int_range(pl.len()).over("song_id").alias("segment"))
    )


def _segment_dataset(
    songs: pl.DataFrame, segments: pl.DataFrame, *, gamma: float, seed: int,
    popularity_counts: dict[str, np.ndarray] | None,
) -> ApexDataset:
    """Segment mode: build the song-level dataset on segment means, then broadcast to segments."""
    keyed = segments.with_columns((pl.col("song_id") + "#" + pl.col("segment").cast(pl.String)).alias("_key"))
    _, X_seg = embedding_matrix(keyed.select(pl.col("_key").alias("song_id"), "embedding"), table="segments")
    seg_song = keyed["song_id"].to_list()
    uniq, mean_X = aggregate_by_song(X_seg, np.asarray(seg_song, dtype=object))
    means = embeddings_frame([str(u) for u in uniq], mean_X.astype(np.float32), encoder="segment-mean")
    song_level = build_apex_dataset(songs, means, gamma=gamma, seed=seed, popularity_counts=popularity_counts)
    row = {s: i for i, s in enumerate(song_level.song_ids)}
    keep = np.array([s in row for s in seg_song])
    idx = np.array([row[s] for s, k in zip(seg_song, keep) if k], dtype=np.int64)
    return ApexDataset(
        [s for s, k in zip(seg_song, keep) if k], X_seg[keep], song_level.Y[idx], song_level.split[idx],
        song_level.transforms, mode="segment",
    )


def embedding_recipe(emb: pl.DataFrame, source: str = "embeddings") -> tuple[str | None, str | None]:
    """``(encoder id, segmenting record)`` of an embeddings table (None where the table lacks the
    column): how its vectors were made, which the APEX predictor records so that a song embedded
    later (online ingest) is made the same way. Rows cut by different rules are a
    :class:`SchemaError` naming ``source`` and two of the rules."""
    if emb.height == 0:
        return None, None
    encoder = emb["encoder"][0] if "encoder" in emb.columns else None
    if "segmenting" not in emb.columns:
        return encoder, None
    rules = emb["segmenting"].drop_nulls().unique(maintain_order=True).to_list()
    if len(rules) > 1:
        raise SchemaError(f"{source}: rows were cut by different audio rules ({rules[0]} and {rules[1]}); "
                          "embed every song with the same settings")
    return encoder, (rules[0] if rules else None)


def train_apex(
    data: ApexDataset, config: TrainConfig | None = None, *, encoder: str | None = None,
    segmenting: str | None = None, callbacks: tuple[Any, ...] = (),
) -> tuple[ApexPredictor, dict[str, Any], TrainResult]:
    """Train on ``data``'s train split with early stopping on val; metrics on val and test.
    ``encoder`` and ``segmenting``: how the embeddings were made (:func:`embedding_recipe`).

    Tasks without any label are left out of the head. Returns ``(predictor, metrics, result)``;
    ``metrics`` is ``{"val": {task: {...}}, "test": {...}, "best_epoch": int, "log_sigma": {...}}``.
    """
    cfg = config or TrainConfig()
    tasks = tuple(t for j, t in enumerate(APEX_TASKS) if np.isfinite(data.Y[data.split == "train", j]).any())
    if not tasks:
        raise SchemaError("no task has a label in the training split")
    cols = [APEX_TASKS.index(t) for t in tasks]
    if isinstance(cfg.tasks, str) and cfg.tasks == "full":
        from dataclasses import replace

        cfg = replace(cfg, tasks=tasks)
    Xtr, Ytr = data.part("train")
    Xva, Yva = data.part("val")
    result = ApexTrainer(cfg, callbacks=callbacks).fit(Xtr, Ytr[:, cols], Xva, Yva[:, cols])
    predictor = ApexPredictor(
        result.model, encoder=encoder, segmenting=segmenting, device="cpu",
        target_transform={t: tf.to_dict() for t, tf in data.transforms.items()},
    )
    metrics: dict[str, Any] = {"best_epoch": result.best_epoch, "log_sigma": result.log_sigma, "tasks": list(tasks)}
    metrics["mode"] = data.mode
    ids = np.asarray(data.song_ids, dtype=object)
    for part in ("val", "test"):
        X, Y = data.part(part)
        if X.shape[0]:
            P = predictor.predict(X)
            if data.mode == "segment":  # average segment rows per song before scoring
                songs_in_part = ids[data.split == part]
                _, P = aggregate_by_song(P, songs_in_part)
                _, Y = aggregate_by_song(Y, songs_in_part)
            metrics[part] = regression_metrics(Y[:, cols], P[:, cols], tasks)
    return predictor, metrics, result
