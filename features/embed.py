"""The embedding pipeline: a folder or manifest of songs → an embeddings table (polars).

Flow: collect sources (:func:`collect_sources`) → hash each file's content → look up the cache
→ embed the misses (:func:`embed_files`, in this process or in worker processes) → write each
result to the cache as soon as it exists → one table in input order.

- Song id: the file's path relative to the input folder without its extension, with ``/``
  separators (``calm/calm_acoustic_1``); a manifest table may give its own ``song_id``.
- Song vector: the mean of its segment vectors; the segment vectors are kept on request
  (``segment_embeddings`` column).
- Cache: ``cache_dir/<encoder id + audio config hash>/`` holds a JSON ``manifest.json`` and one
  ``.npz`` per file content hash (``allow_pickle=False``), written atomically. A re-run embeds
  only new or changed files; an interrupted run resumes where it stopped.
- A bad file is skipped and reported with its path and reason (:class:`FileFailure`); the
  others complete.

:func:`embed_files` is the pure batch step (sources + picklable specs in, arrays out) that an
engine such as Ray can run unchanged.

Example
-------
>>> result = embed_audio("music/", EmbedConfig(cache_dir=".emb-cache"))  # doctest: +SKIP
>>> result.table.columns                                                  # doctest: +SKIP
['song_id', 'embedding', 'encoder', 'n_segments', 'duration_s', 'audio_path', 'segmenting']
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from apex_rank.config import to_dict
from apex_rank.errors import ArtifactError, AudioError, ConfigError, SchemaError
from apex_rank.features.audio import (
    AUDIO_EXTENSIONS,
    AudioConfig,
    SegmentStream,
    check_min_duration,
    scan_audio_folder,
)
from apex_rank.features.encoders import Encoder, EncoderSpec, PrecomputedEncoder, _hash
from apex_rank.manifest import as_if_created, read_manifest, write_manifest
from apex_rank.schemas import check_id_column, embeddings_frame, read_table

log = logging.getLogger(__name__)

CACHE_KIND = "embedding-cache"
CACHE_SCHEMA = 1
_MANIFEST_SUFFIXES = (".parquet", ".csv")


@dataclass(frozen=True)
class SongSource:
    """One song to embed: its id and audio file."""

    song_id: str
    path: str


@dataclass(frozen=True)
class FileResult:
    """A file embedded: song vector (dim,), segment vectors (k, dim), k, seconds of audio."""

    song_id: str
    path: str
    vector: np.ndarray
    segments: np.ndarray
    n_segments: int
    duration_s: float
    cached: bool = False


@dataclass(frozen=True)
class FileFailure:
    """A file skipped, with the reason (the message of the error, which names the file)."""

    song_id: str
    path: str
    reason: str


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of :func:`embed_audio` (picklable; no model or file handle inside).

    Attributes
    ----------
    encoder: registry name (see :data:`~apex_rank.features.encoders.ENCODERS`) or a model folder.
    encoder_options: config options of that encoder (e.g. ``{"device": "cuda"}``).
    audio: segmenting rule (:class:`~apex_rank.features.audio.AudioConfig`).
    keep_segments: add a ``segment_embeddings`` column with every segment's vector.
    workers: worker processes; ``0`` or ``1`` embeds in this process.
    cache_dir: folder of the content-hash cache (``None``: no cache).
    """

    encoder: str = "spectral"
    encoder_options: Mapping[str, Any] = field(default_factory=dict)
    audio: AudioConfig = field(default_factory=AudioConfig)
    keep_segments: bool = False
    workers: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec.of(self.encoder, self.encoder_options)


@dataclass(frozen=True)
class EmbedProgress:
    """Passed to the progress callback after every file, and after every entry a folder scan
    passed over (``total`` counts both)."""

    done: int
    total: int
    audio_s: float
    elapsed_s: float
    cached: int
    skipped: int
    last: FileResult | FileFailure

    @property
    def speed_x(self) -> float:
        """Seconds of audio handled per second of wall time (× real time)."""
        return self.audio_s / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class EmbedResult:
    """What :func:`embed_audio` returns: the table, the skipped files and counts."""

    table: pl.DataFrame
    skipped: list[FileFailure]
    encoder_id: str
    n_embedded: int
    n_cached: int
    audio_s: float
    embed_audio_s: float
    wall_s: float

    @property
    def speed_x(self) -> float:
        """Seconds of newly embedded audio per second of wall time (× real time)."""
        return self.embed_audio_s / self.wall_s if self.wall_s > 0 else 0.0


# ------------------------------------------------------------------------------------ sources


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.:@/+\-]")


def _song_id(path: Path, root: Path) -> str:
    """A file's id: its path under ``root`` (the full path if outside) without the extension,
    every character the id rule (:data:`~apex_rank.schemas.ID_RULE`) does not allow replaced by
    ``_`` (``Live at 5.mp3`` → ``Live_at_5``), so build and the online API accept what embed writes."""
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    return _ID_UNSAFE.sub("_", rel.with_suffix("").as_posix())


def collect_sources(source: str | Path) -> list[SongSource]:
    """Songs to embed from a folder (recursive), a manifest table (parquet/CSV) or a glob
    pattern (``music/**/*.flac``; ids are the paths under the folder before the first wildcard).

    A manifest needs an ``audio_path`` column (relative paths are taken from the manifest's
    folder) and may have ``song_id``; without it ids are derived from the paths. Duplicate ids
    are a :class:`SchemaError` naming both files. Entries a folder scan passes over (see
    :func:`~apex_rank.features.audio.scan_audio_folder`) are logged as warnings;
    :func:`embed_audio` lists them in its ``skipped``.
    """
    sources, passed_over = _collect(source)
    for f in passed_over:
        log.warning("skipped %s", f.reason)
    return sources


def _collect(source: str | Path) -> tuple[list[SongSource], list[FileFailure]]:
    src = Path(source)
    passed_over: list[FileFailure] = []
    if src.is_dir() or (not src.exists() and glob.has_magic(str(source))):
        if src.is_dir():
            scan = scan_audio_folder(src)
            root, files = src, scan.files
            passed_over = [FileFailure(_song_id(p, src), str(p), f"{p}: {why}") for p, why in scan.skipped]
        else:  # a glob: ids are the paths under the folder before the first wildcard
            parts = src.parts
            first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            root = Path(*parts[:first]) if first else Path(".")
            files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
            if not files:
                raise SchemaError(f"{source}: the pattern matches no file")
        sources = [SongSource(_song_id(p, root), str(p)) for p in files]
        passed_over += [FileFailure(s.song_id, s.path, f"{s.path}: its id {s.song_id!r} is longer than 128 characters")
                        for s in sources if len(s.song_id) > 128]
        sources = [s for s in sources if len(s.song_id) <= 128]
    elif src.is_file() and src.suffix.lower() in _MANIFEST_SUFFIXES:
        table = read_table(src, "manifest")
        if "audio_path" not in table.columns:
            raise SchemaError(f"manifest table {src}: required column 'audio_path' is missing (found {table.columns})")
        root = src.parent
        paths = [Path(p) if Path(p).is_absolute() else root / p for p in table["audio_path"].cast(pl.String).to_list()]
        if "song_id" in table.columns:
            check_id_column(table.with_columns(pl.col("song_id").cast(pl.String)), "song_id", f"manifest {src}")
            ids = table["song_id"].cast(pl.String).to_list()
        else:
            ids = [_song_id(p, root) for p in paths]
            long = [(i, p) for i, p in zip(ids, paths, strict=True) if len(i) > 128]
            if long:
                raise SchemaError(f"manifest {src}: the id derived from {long[0][1]} is longer than 128 characters; "
                                  "give a song_id column")
        sources = [SongSource(i, str(p)) for i, p in zip(ids, paths, strict=True)]
    elif src.is_file():
        raise SchemaError(
            f"{src}: expected a folder of audio files or a manifest table ({', '.join(_MANIFEST_SUFFIXES)}); "
            f"audio files are found by extension ({', '.join(AUDIO_EXTENSIONS)})"
        )
    else:
        raise SchemaError(f"{src}: no such folder or manifest table (nor a glob pattern)")
    seen: dict[str, str] = {}
    for s in sources:
        if s.song_id in seen:
            raise SchemaError(f"song_id {s.song_id!r} is given to two files: {seen[s.song_id]} and {s.path}")
        seen[s.song_id] = s.path
    return sources, passed_over


def content_hash(path: str | Path) -> str:
    """BLAKE2b of the file's bytes (hex, 32 chars): the cache key of its audio."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ pure batch step


def embed_one(source: SongSource, encoder: Encoder, audio: AudioConfig) -> FileResult:
    """Stream one file through ``encoder``; segments are embedded ``batch_size`` at a time,
    so a long file never has all its segments in memory (or on the GPU) at once."""
    stream = SegmentStream(source.path, sample_rate=encoder.sample_rate, config=audio)
    vecs = [encoder.embed(batch).numpy() for batch in stream.batches(int(getattr(encoder, "batch_size", 8)))]
    if not vecs:
        raise AudioError(f"{source.path}: produced no segments")
    segs = np.ascontiguousarray(np.concatenate(vecs), dtype=np.float32)
    if not np.isfinite(segs).all():
        raise AudioError(f"{source.path}: the encoder produced NaN/inf values")
    return FileResult(
        song_id=source.song_id,
        path=source.path,
        vector=segs.mean(axis=0).astype(np.float32),
        segments=segs,
        n_segments=int(segs.shape[0]),
        duration_s=float(stream.duration_s),
    )


def embed_files(
    sources: Sequence[SongSource], spec: EncoderSpec, audio: AudioConfig, *, encoder: Encoder | None = None
) -> list[FileResult | FileFailure]:
    """Embed a batch of files: the pure step (picklable specs in, arrays out).

    A file that cannot be decoded or embedded becomes a :class:`FileFailure` (see
    :func:`_embed_or_fail`); everything is returned in input order. ``encoder`` may be passed
    to reuse a loaded model.
    """
    enc = encoder if encoder is not None else spec.build()
    out: list[FileResult | FileFailure] = []
    for s in sources:
        out.append(_embed_or_fail(s, enc, audio))
    return out


def _embed_or_fail(source: SongSource, encoder: Encoder, audio: AudioConfig) -> FileResult | FileFailure:
    """:func:`embed_one`, with any failure of this one file turned into a :class:`FileFailure`.

    Besides :class:`AudioError` and ``OSError``, that is whatever a decoder, the resampler or
    an encoder raises for one input (``RuntimeError`` such as torch's ``LinAlgError`` or a CUDA
    out-of-memory, ``MemoryError``, ``ValueError``): the file is listed and the batch goes on.
    ``KeyboardInterrupt``, ``SystemExit`` and programming errors (``TypeError``, ...) still stop it.
    """
    try:
        return embed_one(source, encoder, audio)
    except AudioError as err:
        return FileFailure(source.song_id, source.path, str(err))
    except OSError as err:
        return FileFailure(source.song_id, source.path, f"{source.path}: cannot be read: {err}")
    except (RuntimeError, MemoryError, ValueError) as err:
        log.debug("embedding %s failed", source.path, exc_info=True)
        kind = type(err).__name__.lstrip("_")  # torch's LinAlgError is named _LinAlgError
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else "(no message)"
        return FileFailure(source.song_id, source.path, f"{source.path}: embedding failed with {kind}: {first_line}")


# worker-process state: the encoder is built once per process from its picklable spec
_WORKER: dict[str, Any] = {}


def _worker_init(spec: EncoderSpec, audio: AudioConfig, threads: int) -> None:
    from apex_rank.threads import configure_threads

    configure_threads(threads)
    _WORKER["encoder"] = spec.build()
    _WORKER["audio"] = audio


def _worker_embed(source: SongSource) -> FileResult | FileFailure:
    return _embed_or_fail(source, _WORKER["encoder"], _WORKER["audio"])


# ------------------------------------------------------------------------------------- cache


class EmbeddingCache:
    """Pickle-free, content-addressed store of per-file results for one encoder + audio config.

    Layout: ``root/<key>/manifest.json`` and ``root/<key>/<hh>/<content hash>.npz``, where
    ``key`` combines the encoder id (which includes its config hash) and the audio config.
    Entries are written through a temporary file and a rename, so an interrupted run leaves
    only complete entries behind.
    """

    def __init__(self, root: str | Path, encoder_id: str, audio: AudioConfig) -> None:
        # the read block size does not change any sample (the resampler is exact across blocks);
        # the minimum duration changes none either: it is checked on every hit (embed_audio)
        audio_cfg = {k: v for k, v in to_dict(audio).items() if k not in ("block_s", "min_duration_s")}
        self.key = f"{encoder_id.replace(':', '-')}-{_hash(audio_cfg)[:8]}"
        self.folder = Path(root) / self.key
        if (self.folder / "manifest.json").is_file():
            data = read_manifest(self.folder, kind=CACHE_KIND, max_schema=CACHE_SCHEMA)
            if data.get("encoder_id") != encoder_id:
                raise ArtifactError(
                    f"{self.folder}: cache holds encoder {data.get('encoder_id')!r}, expected {encoder_id!r}"
                )
        else:
            write_manifest(
                self.folder,
                kind=CACHE_KIND,
                schema=CACHE_SCHEMA,
                files=[],
                payload={"encoder_id": encoder_id, "audio": audio_cfg},
            )

    def _path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.npz"

    def get(self, digest: str, source: SongSource) -> FileResult | None:
        """The cached result of a file content, or ``None`` (a damaged entry counts as absent)."""
        p = self._path(digest)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                segs = np.ascontiguousarray(z["segments"], dtype=np.float32)
                duration = float(z["duration_s"])
        except (OSError, ValueError, KeyError) as err:
            log.warning("cache entry %s is unreadable (%s); embedding %s again", p, err, source.path)
            return None
        return FileResult(
            source.song_id, source.path, segs.mean(axis=0).astype(np.float32), segs, int(segs.shape[0]), duration, True
        )

    def put(self, digest: str, result: FileResult) -> None:
        """Store a result atomically."""
        p = self._path(digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.stem, suffix=".tmp.npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, segments=result.segments, duration_s=np.float64(result.duration_s))
            as_if_created(tmp)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------------------------- pipeline


def embed_audio(
    source: str | Path | Sequence[SongSource],
    config: EmbedConfig | None = None,
    *,
    progress: Callable[[EmbedProgress], None] | None = None,
    encoder: Encoder | None = None,
) -> EmbedResult:
    """Embed every song of a folder, manifest table or source list into an embeddings table.

    Parameters
    ----------
    source:
        A folder of audio files, a manifest table (parquet/CSV with ``audio_path`` and optional
        ``song_id``), or a list of :class:`SongSource`.
    config:
        Encoder, segmenting, cache and worker settings.
    progress:
        Called after every file with an :class:`EmbedProgress` (the CLI draws its bar from it).
    encoder:
        An already built encoder to use in this process (``workers`` is then ignored).

    Returns
    -------
    EmbedResult
        ``table`` has ``song_id``, ``embedding`` (list[f32]), ``encoder`` (id with config
        hash), ``n_segments``, ``duration_s``, ``audio_path`` and, with ``keep_segments``,
        ``segment_embeddings``; rows in input order, skipped files left out and listed in
        ``skipped``.
    """
    cfg = config or EmbedConfig()
    t0 = time.perf_counter()
    sources, passed_over = _collect(source) if isinstance(source, (str, Path)) else (list(source), [])
    spec = cfg.spec
    spec.config()  # validate options before any work
    if spec.name == "precomputed":
        result = _from_precomputed(sources, cfg, t0)
        result.skipped[:0] = passed_over
        return result
    workers = cfg.workers if encoder is None else 0
    local_encoder = encoder if encoder is not None else (spec.build() if workers <= 1 else None)
    encoder_id = local_encoder.id if local_encoder is not None else _probe_id(spec)
    cache = EmbeddingCache(cfg.cache_dir, encoder_id, cfg.audio) if cfg.cache_dir else None

    results: dict[str, FileResult] = {}
    skipped: list[FileFailure] = []
    state: dict[str, Any] = {"done": 0, "audio": 0.0, "cached": 0}
    n_total = len(sources) + len(passed_over)

    def record(item: FileResult | FileFailure, digest: str | None) -> None:
        state["done"] += 1
        if isinstance(item, FileResult):
            results[item.song_id] = item
            state["audio"] += item.duration_s
            if item.cached:
                state["cached"] += 1
            elif cache is not None and digest is not None:
                cache.put(digest, item)
        else:
            skipped.append(item)
            log.warning("skipped %s", item.reason)
        if progress is not None:
            progress(
                EmbedProgress(
                    state["done"],
                    n_total,
                    state["audio"],
                    time.perf_counter() - t0,
                    state["cached"],
                    len(skipped),
                    item,
                )
            )

    for failure in passed_over:
        record(failure, None)
    todo: list[tuple[SongSource, str | None]] = []
    for s in sources:
        digest = None
        if cache is not None and Path(s.path).is_file():  # hashing a FIFO would block; embedding lists it
            try:
                digest = content_hash(s.path)
            except OSError as err:
                record(FileFailure(s.song_id, s.path, f"{s.path}: cannot be read: {err}"), None)
                continue
            hit = cache.get(digest, s)
            if hit is not None:
                try:
                    check_min_duration(s.path, hit.duration_s, cfg.audio.min_duration_s)
                except AudioError as err:
                    record(FileFailure(s.song_id, s.path, str(err)), None)
                    continue
                record(hit, digest)
                continue
        todo.append((s, digest))

    t_embed = time.perf_counter()
    embedded_audio_before = state["audio"]
    if todo and local_encoder is not None:
        for s, digest in todo:
            record(_embed_or_fail(s, local_encoder, cfg.audio), digest)
    elif todo:
        _run_workers(todo, spec, cfg, record)
    embed_wall = time.perf_counter() - t_embed

    rows = [results[s.song_id] for s in sources if s.song_id in results]
    table = _table(rows, encoder_id, cfg.audio, keep_segments=cfg.keep_segments)
    n_new = len(rows) - state["cached"]
    if skipped:
        log.warning("%d of %d file(s) skipped", len(skipped), n_total)
    return EmbedResult(
        table=table,
        skipped=skipped,
        encoder_id=encoder_id,
        n_embedded=n_new,
        n_cached=state["cached"],
        audio_s=state["audio"],
        embed_audio_s=state["audio"] - embedded_audio_before,
        wall_s=embed_wall if todo else time.perf_counter() - t0,
    )


def _probe_id(spec: EncoderSpec) -> str:
    # the id needs a built encoder; for MERT this loads the model once in the parent as well
    return spec.build().id


def _run_workers(
    todo: list[tuple[SongSource, str | None]],
    spec: EncoderSpec,
    cfg: EmbedConfig,
    record: Callable[[FileResult | FileFailure, str | None], None],
) -> None:
    import multiprocessing as mp

    from apex_rank.threads import thread_count

    n = min(cfg.workers, len(todo))
    threads = max(1, thread_count() // n)
    # spawn, not fork: a forked child of a process that already ran torch can deadlock
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init, initargs=(spec, cfg.audio, threads)) as pool:
        futures: list[tuple[Future[FileResult | FileFailure], str | None]] = [
            (pool.submit(_worker_embed, s), d) for s, d in todo
        ]
        try:
            for fut, digest in futures:
                record(fut.result(), digest)
        except BaseException:
            for fut, _ in futures:
                fut.cancel()
            raise


def _table(rows: list[FileResult], encoder_id: str, audio: AudioConfig, *, keep_segments: bool) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame(
            schema={
                "song_id": pl.String,
                "embedding": pl.List(pl.Float32),
                "encoder": pl.String,
                "n_segments": pl.Int64,
                "duration_s": pl.Float64,
                "audio_path": pl.String,
                "segmenting": pl.String,
            }
        )
    X = np.stack([r.vector for r in rows])
    df = embeddings_frame([r.song_id for r in rows], X, encoder=encoder_id, n_segments=[r.n_segments for r in rows])
    df = df.with_columns(
        pl.Series("duration_s", [r.duration_s for r in rows], dtype=pl.Float64),
        pl.Series("audio_path", [r.path for r in rows], dtype=pl.String),
        pl.lit(audio.segmenting(), dtype=pl.String).alias("segmenting"),  # the rule online ingest repeats
    )
    if keep_segments:
        df = df.with_columns(
            pl.Series("segment_embeddings", [r.segments.tolist() for r in rows], dtype=pl.List(pl.List(pl.Float32)))
        )
    return df


def _from_precomputed(sources: list[SongSource], cfg: EmbedConfig, t0: float) -> EmbedResult:
    enc = cfg.spec.build()
    if not isinstance(enc, PrecomputedEncoder):
        raise ConfigError("internal: the precomputed spec did not build a PrecomputedEncoder")
    table = enc.table
    if sources:
        wanted = [s.song_id for s in sources]
        found, _, missing = enc.lookup(wanted)
        skipped = [
            FileFailure(s.song_id, s.path, f"song_id {s.song_id!r} is not in {enc.config.path}")
            for s in sources
            if s.song_id in set(missing)
        ]
        table = table.filter(pl.col("song_id").is_in(found))
    else:
        skipped = []
    table = table.with_columns(pl.lit(enc.id).alias("encoder"))
    return EmbedResult(table, skipped, enc.id, 0, table.height, 0.0, 0.0, time.perf_counter() - t0)


def write_embeddings(table: pl.DataFrame, path: str | Path) -> Path:
    """Write an embeddings table to parquet atomically (temporary file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
    os.close(fd)
    try:
        table.write_parquet(tmp)
        as_if_created(tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def iter_failures_summary(skipped: Iterable[FileFailure]) -> list[str]:
    """One line per skipped file: ``path: reason`` (the reason already names the file)."""
    return [f.reason if f.path in f.reason else f"{f.path}: {f.reason}" for f in skipped]


__all__ = [
    "EmbedConfig",
    "EmbedProgress",
    "EmbedResult",
    "EmbeddingCache",
    "FileFailure",
    "FileResult",
    "SongSource",
    "collect_sources",
    "content_hash",
    "embed_audio",
    "embed_files",
    "embed_one",
    "write_embeddings",
    "iter_failures_summary",
]

