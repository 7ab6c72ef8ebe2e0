"""New songs between publishes: ``ingest`` (and the checks of its inputs).

``ingest`` scores a new song with the APEX predictor, writes its record and embedding under
the current version, makes it rankable in this process and announces it on the catalogue
stream that every other ranker process follows. The priors are predicted once, here: this
process and every other one (the catalogue follower, a version loading its ingested songs,
the carry-over at publish, which copies the record) use the priors of the stored record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apex_rank.errors import RequestError, SchemaError, StoreError, VersionMovedError

from .keys import check_id, encode_song_record
from .ranker import OnlineRanker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """An ingested song: its id, APEX priors (7,), the version it joined, catalogue stream id."""

    song_id: str
    priors: np.ndarray
    version: int
    stream_id: str


def check_popularity(value: object) -> float:
    """``value`` as a popularity: a number >= 0 that stays finite as float32 (what the song
    record stores), else a :class:`RequestError` naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise RequestError(f"popularity must be a number, got {value!r}")
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.float32(value)
    if not np.isfinite(v) or v < 0:
        raise RequestError(f"popularity {value!r} is not a finite float32 number >= 0")
    return float(v)


def check_embedding(values: object, song_id: str, width: int | None = None) -> np.ndarray:
    """``values`` as a song's (d,) float32 embedding, else a :class:`RequestError` naming the
    field: the wrong width, a value that is NaN or inf after the float32 cast (3e38 passes as
    float64 and 1e39 does not fit), an all-zero vector or one whose norm overflows float32
    (L2-normalising it gives NaN, and the song's priors and every profile it joins with it)."""
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            emb = np.asarray(values, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as err:
            raise RequestError(f"embedding of song {song_id!r} is not a list of numbers") from err
        norm = np.linalg.norm(emb)
    if width is not None and emb.shape[0] != width:
        raise RequestError(f"embedding of song {song_id!r} has width {emb.shape[0]}, the bundle "
                           f"expects {width}")
    if not np.all(np.isfinite(emb)):
        raise RequestError(f"embedding of song {song_id!r} holds NaN or inf (as float32)")
    if not np.isfinite(norm):
        raise RequestError(f"embedding of song {song_id!r} has a norm that overflows float32")
    if norm == 0:
        raise RequestError(f"embedding of song {song_id!r} is all zeros")
    return emb


def ingest(ranker: OnlineRanker, song_id: str, *, embedding: np.ndarray | None = None,
           audio_path: str | Path | None = None, popularity: float = 0.0) -> IngestResult:
    """Add a new song: APEX priors, store record, this process's index, catalogue announcement.

    Give exactly one of ``embedding`` ((d,) float32, the bundle's encoder) or ``audio_path``
    (embedded with the bundle's encoder when the bundle carries one).

    Raises
    ------
    RequestError
        Malformed id, both or neither input, an embedding :func:`check_embedding` refuses, a
        popularity :func:`check_popularity` refuses, priors that come out non-finite, or a song
        id that already exists.
    StoreError
        Nothing is published or the store failed.
    """
    check_id(song_id, "song_id")
    if (embedding is None) == (audio_path is None):
        raise RequestError("give exactly one of embedding or audio_path")
    popularity = check_popularity(popularity)
    engine = ranker.engine
    if engine.has_song(song_id):  # before decoding a file only to refuse it
        raise RequestError(f"song_id {song_id!r} already exists in version {ranker.version}")
    if audio_path is not None:
        embedding = engine_embed_audio(engine, Path(audio_path))
    emb = check_embedding(embedding, song_id, engine.embedding_dim)
    if ranker.version is None:
        raise StoreError("the ranker serves no published version (store unreachable at start)")
    try:
        priors = engine.predict_priors(emb[None, :])[0].astype(np.float32)
    except SchemaError as err:
        raise RequestError(f"embedding of song {song_id!r}: {err}; the song is not added") from err
    rec = encode_song_record(priors, popularity, 0.0, True)
    ttl = ranker.config.version_ttl_s
    for _ in range(5):
        # The song joins the store's current version (which this process may not serve yet:
        # it switches within follow_interval_s and then loads the version's ingested songs).
        version = ranker.store.current_version()
        if version is None:
            raise StoreError(f"nothing is published under {ranker.store.keys.current}")
        try:
            stream_id = ranker.store.add_song(version, song_id, rec, emb, ttl)
            break
        except VersionMovedError as err:
            log.info("ingest of %s: %s; retrying on the new version", song_id, err)
    else:
        raise StoreError(f"song {song_id!r} not ingested: the published version kept moving")
    engine.add_song(song_id, emb, priors)
    log.info("ingested song %s into version %d (stream id %s)", song_id, version, stream_id)
    return IngestResult(song_id, priors, version, stream_id)


def engine_embed_audio(engine: object, path: Path) -> np.ndarray:
    """Embed an audio file with the engine's encoder; a clear error when it has none."""
    embed = getattr(engine, "embed_audio", None)
    if embed is None:
        raise RequestError(f"cannot ingest {path}: this bundle carries no audio encoder; "
                           "send the song's embedding instead")
    if not path.is_file():
        raise RequestError(f"audio file {path} does not exist or is not a regular file")
    return np.asarray(embed(path), dtype=np.float32)
