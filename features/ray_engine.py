"""Embedding and APEX scoring on Ray Data: ``apex-rank embed|predict --engine ray``.

Needs the ``scale`` extra (``pip install 'apex-rank[scale]'``). Both commands run the local
engine's pure batch step inside a pool of Ray actors through ``Dataset.map_batches``:

- embedding: :func:`~apex_rank.features.embed.embed_files`, with one encoder per actor built
  from its picklable :class:`~apex_rank.features.encoders.EncoderSpec` (one actor per GPU for
  a model encoder when the cluster has GPUs, one per CPU otherwise);
- scoring: :meth:`~apex_rank.predictor.ApexPredictor.score_embeddings`, one predictor per actor.

The driver receives each finished batch and writes it as one parquet part under the output
folder (a temporary name, then a rename), so:

- the folder is a parquet dataset: ``pl.read_parquet(DIR)`` and ``apex-rank predict
  --embeddings DIR`` read it whole;
- an interrupted run leaves whole parts only, and the next run skips every song already in
  them (it resumes); a part records the settings it was made with, and a run with other
  settings is refused rather than mixed in;
- each song is written once (a song id the run meets twice is an error naming it);
- bad files are listed with the same reasons as on one machine (the same ``FileFailure``);
- the rows are those of the local engine, bit for bit on CPU: the same functions, and the
  same table builder on the driver.

The audio files must be readable by the workers at the paths the manifest gives (a shared
file system on a real cluster); the output folder is written by the driver only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from apex_rank.config import to_dict
from apex_rank.errors import ApexRankError, ConfigError, SchemaError
from apex_rank.features.audio import AudioConfig
from apex_rank.features.embed import (
    EmbedConfig,
    EmbedProgress,
    FileFailure,
    FileResult,
    SongSource,
    _collect,
    _table,
    embed_files,
)
from apex_rank.features.encoders import EncoderSpec
from apex_rank.manifest import as_if_created

log = logging.getLogger(__name__)

META_KEY = "apex_rank.run"  # parquet key-value metadata of every part: the settings it was made with
_MAX_BLOCKS = 10_000  # input blocks handed to Ray (bounds its bookkeeping for 10^7 songs)


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'apex-rank[scale]'") from None
    return ray


@dataclass
class RayRunResult:
    """What a Ray run did: rows written now, rows already in the folder, files skipped."""

    out_dir: Path
    n_written: int
    n_resumed: int
    skipped: list[FileFailure]
    encoder_id: str | None
    audio_s: float
    wall_s: float

    @property
    def speed_x(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


# ------------------------------------------------------------------------ output folder


def _parts(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("*.parquet"))


def _resume(out_dir: Path, settings: dict[str, Any], what: str) -> set[str]:
    """Song ids already in ``out_dir``; a part made with other ``settings`` is a ConfigError."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: --out must be a folder for --engine ray (it holds one parquet part per batch)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-*"):  # a part a killed run was writing
        stale.unlink(missing_ok=True)
    want = _stamp(settings, what)
    done: set[str] = set()
    for part in _parts(out_dir):
        try:
            meta = pl.read_parquet_metadata(part).get(META_KEY)
            ids = pl.read_parquet(part, columns=["song_id"])["song_id"].to_list()
        except Exception as err:  # polars raises several types for unreadable files
            raise SchemaError(f"{part}: cannot be read ({err}); remove it and run again to redo its songs") from err
        if meta != want:
            raise ConfigError(
                f"{part} was made with other settings ({meta}) than this run ({want}); "
                "write to another folder, or remove it to start over"
            )
        done.update(ids)
    return done


def _stamp(settings: dict[str, Any], what: str) -> str:
    return json.dumps({"what": what, **settings}, sort_keys=True, default=list)


def _write_part(table: pl.DataFrame, out_dir: Path, name: str, settings: dict[str, Any], what: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    try:
        table.write_parquet(tmp, metadata={META_KEY: _stamp(settings, what)})
        as_if_created(tmp)
        os.replace(tmp, out_dir / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _blocks(table: pa.Table, batch_size: int) -> list[pa.Table]:
    rows = max(batch_size, math.ceil(table.num_rows / _MAX_BLOCKS))
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


class _Session:
    """``ray.init`` unless Ray is already running in this process (then that cluster is used)."""

    def __init__(self, address: str | None) -> None:
        self.ray = _require_ray()
        self.started = not self.ray.is_initialized()
        if self.started:
            kw: dict[str, Any] = {"address": address} if address else {"include_dashboard": False}
            self.ray.init(**kw)
        ctx = self.ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the CLI draws its own bar, per file
        ctx.verbose_progress = False
        if not log.isEnabledFor(logging.INFO):  # Ray Data's plan and timing lines only with -v
            logging.getLogger("ray.data").setLevel(logging.WARNING)

    def resources(self) -> tuple[int, int]:
        res = self.ray.cluster_resources()
        return max(1, int(res.get("CPU", 1))), int(res.get("GPU", 0))

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _batches(ds: Any) -> Iterator[pa.Table]:
    """The pipeline's output blocks; a block holding an ``_error`` (an apex-rank error an actor
    met, which Ray would otherwise pass on as a traceback text) raises that error here."""
    from apex_rank import errors

    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if "_error" in batch.column_names:
            kind, message = batch["_error"][0].as_py(), batch["_message"][0].as_py()
            cls = getattr(errors, kind, errors.ApexRankError)
            raise cls(message)
        yield batch


def _error_block(err: Exception, where: str) -> pa.Table:
    message = str(err) if str(err).startswith(where) else f"{where}: {err}"
    return pa.table({"_error": [type(err).__name__], "_message": [message]})


# ------------------------------------------------------------------------------- embed


class _EmbedActor:
    """One encoder per actor; each call embeds a batch of (song_id, audio_path) rows."""

    def __init__(self, spec: EncoderSpec, audio: AudioConfig, keep_segments: bool, threads: int) -> None:
        from apex_rank.threads import configure_threads

        configure_threads(threads)
        self.spec, self.audio, self.keep_segments = spec, audio, keep_segments
        self.encoder = spec.build()

    def __call__(self, batch: pa.Table) -> pa.Table:
        sources = [SongSource(i, p) for i, p in zip(batch["song_id"].to_pylist(), batch["audio_path"].to_pylist())]
        results = embed_files(sources, self.spec, self.audio, encoder=self.encoder)
        ok = [isinstance(r, FileResult) for r in results]
        # arrays travel as raw float32 bytes: the driver rebuilds them exactly
        return pa.table(
            {
                "song_id": [r.song_id for r in results],
                "audio_path": [r.path for r in results],
                "encoder": [self.encoder.id] * len(results),
                "reason": [None if isinstance(r, FileResult) else r.reason for r in results],
                "vector": [r.vector.tobytes() if isinstance(r, FileResult) else None for r in results],
                "segments": [
                    r.segments.tobytes() if isinstance(r, FileResult) and self.keep_segments else None for r in results
                ],
                "n_segments": [r.n_segments if isinstance(r, FileResult) else 0 for r in results],
                "duration_s": [r.duration_s if isinstance(r, FileResult) else 0.0 for r in results],
                "ok": ok,
            },
            schema=pa.schema(
                [
                    ("song_id", pa.string()),
                    ("audio_path", pa.string()),
                    ("encoder", pa.string()),
                    ("reason", pa.string()),
                    ("vector", pa.binary()),
                    ("segments", pa.binary()),
                    ("n_segments", pa.int64()),
                    ("duration_s", pa.float64()),
                    ("ok", pa.bool_()),
                ]
            ),
        )


def _unpack(batch: pa.Table) -> list[FileResult | FileFailure]:
    out: list[FileResult | FileFailure] = []
    for row in batch.to_pylist():
        if not row["ok"]:
            out.append(FileFailure(row["song_id"], row["audio_path"], row["reason"]))
            continue
        vector = np.frombuffer(row["vector"], dtype=np.float32)
        segs = (
            np.frombuffer(row["segments"], dtype=np.float32).reshape(row["n_segments"], vector.size)
            if row["segments"] is not None
            else np.empty((0, vector.size), np.float32)
        )
        out.append(FileResult(row["song_id"], row["audio_path"], vector, segs, row["n_segments"], row["duration_s"]))
    return out


def embed_on_ray(
    source: str | Path,
    config: EmbedConfig,
    out_dir: str | Path,
    *,
    address: str | None = None,
    batch_size: int = 8,
    actors: int | None = None,
    progress: Callable[[EmbedProgress], None] | None = None,
) -> RayRunResult:
    """Embed a folder, manifest table or glob of audio files on Ray into ``out_dir``.

    Parameters
    ----------
    source: what :func:`~apex_rank.features.embed.embed_audio` takes, or a glob of audio files.
    config: encoder and segmenting settings (``workers`` and ``cache_dir`` are local-only).
    out_dir: the parquet dataset folder; songs already in it are skipped (resume).
    address: Ray cluster address (``"auto"``); ``None`` starts a local one unless Ray is running.
    batch_size: files per ``map_batches`` call (and per part file).
    actors: actor pool size (default: one per GPU for a model encoder on a GPU cluster, else one per CPU).
    progress: called after every file, as the local engine does.
    """
    if config.workers > 1 or config.cache_dir:
        raise ConfigError("--workers and --cache are for the local engine; Ray runs one encoder per actor and "
                          "resumes from the output folder")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    spec = config.spec
    spec.config()  # validate the options before starting anything
    if spec.name == "precomputed":
        raise ConfigError("--encoder precomputed reads a table; it needs no Ray (use the local engine)")
    sources, passed_over = _collect(source)
    out = Path(out_dir)
    # what changes a row (as in the cache key): not the read block size, the minimum duration,
    # the device or the encoder's batch size
    audio_cfg = {k: v for k, v in to_dict(config.audio).items() if k not in ("block_s", "min_duration_s")}
    options = {k: v for k, v in spec.options if k not in ("device", "batch_size")}
    settings = {"encoder": spec.name, "options": options, "audio": audio_cfg, "keep_segments": config.keep_segments}
    done = _resume(out, settings, "embeddings")
    todo = [s for s in sources if s.song_id not in done]
    n_resumed = len(sources) - len(todo)
    total = len(todo) + len(passed_over)
    skipped: list[FileFailure] = []
    n_done, audio_s = 0, 0.0

    def record(item: FileResult | FileFailure) -> None:
        nonlocal n_done, audio_s
        n_done += 1
        if isinstance(item, FileResult):
            audio_s += item.duration_s
        else:
            skipped.append(item)
            log.warning("skipped %s", item.reason)
        if progress is not None:
            progress(EmbedProgress(n_done, total, audio_s, time.perf_counter() - t0, 0, len(skipped), item))

    for failure in passed_over:
        record(failure)
    encoder_id: str | None = None
    n_written = 0
    if todo:
        session = _Session(address)
        try:
            cpus, gpus = session.resources()
            use_gpu = gpus > 0 and spec.name != "spectral"
            table = pa.table({"song_id": [s.song_id for s in todo], "audio_path": [s.path for s in todo]})
            blocks = _blocks(table, batch_size)
            n_actors = min(actors or (gpus if use_gpu else cpus), len(blocks))
            threads = 1 if use_gpu else max(1, cpus // n_actors)
            ds = session.ray.data.from_arrow(blocks).map_batches(
                _EmbedActor,
                fn_constructor_args=(spec, config.audio, config.keep_segments, threads),
                batch_size=batch_size,
                batch_format="pyarrow",
                compute=session.ray.data.ActorPoolStrategy(size=n_actors),
                num_cpus=0 if use_gpu else threads,
                num_gpus=1 if use_gpu else 0,
            )
            log.info("embedding %d file(s) on %d Ray actor(s) (%s)", len(todo), n_actors, "GPU" if use_gpu else "CPU")
            run = uuid.uuid4().hex[:8]
            written: set[str] = set()
            for i, batch in enumerate(_batches(ds)):
                items = _unpack(batch)
                rows = [r for r in items if isinstance(r, FileResult)]
                for r in items:
                    if r.song_id in written:
                        raise SchemaError(f"song_id {r.song_id!r} came back twice from Ray; nothing of it was "
                                          "written twice")
                    written.add(r.song_id)
                if rows:
                    batch_encoder = batch["encoder"][0].as_py()
                    if encoder_id is None:
                        encoder_id = batch_encoder
                    _write_part(_table(rows, batch_encoder, config.audio, keep_segments=config.keep_segments), out,
                                f"part-{run}-{i:06d}.parquet", settings, "embeddings")
                    n_written += len(rows)
                for r in items:
                    record(r)
        finally:
            session.close()
    if skipped:
        log.warning("%d of %d file(s) skipped", len(skipped), total)
    if encoder_id is None and n_resumed:  # nothing new embedded: the id the folder's parts hold
        encoder_id = pl.read_parquet(_parts(out)[0], columns=["encoder"])["encoder"][0]
    return RayRunResult(out, n_written, n_resumed, skipped, encoder_id, audio_s, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- predict


class _ScoreActor:
    """One predictor per actor; each call scores one block of ``rows`` embedding rows, cut at the
    same row offsets as :meth:`~apex_rank.predictor.ApexPredictor.predict` cuts the table read
    whole (the scores of a row depend on its block's size). Each actor reads its own rows."""

    def __init__(self, model_dir: str, device: str, done: set[str], rows: int, threads: int) -> None:
        from apex_rank.predictor import ApexPredictor
        from apex_rank.threads import configure_threads

        configure_threads(threads)
        self.predictor = ApexPredictor.load(model_dir, device=device)
        self.done, self.rows = done, rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        (unit,) = batch["slices"].to_pylist()
        frames = [pl.scan_parquet(s["path"]).slice(s["offset"], s["length"]).collect() for s in unit]
        emb = pl.concat(frames, how="vertical_relaxed")
        if "song_id" in emb.columns and emb["song_id"].is_in(list(self.done)).all():
            scores = self.predictor.score_songs([], np.empty((0, self.predictor.input_dim), np.float32))
        else:
            source = ", ".join(f"{s['path']} rows {s['offset']}-{s['offset'] + s['length'] - 1}" for s in unit)
            try:
                scores = self.predictor.score_embeddings(emb, source=source, batch_size=self.rows)
            except ApexRankError as err:  # bad rows: the driver raises it, naming the file and song
                return _error_block(err, source)
            scores = scores.filter(~pl.col("song_id").is_in(list(self.done)))  # whole blocks scored: same bits
        return scores.to_arrow()


def _row_blocks(paths: list[Path], rows: int) -> list[list[dict[str, Any]]]:
    """The table the files make, read in order, cut into blocks of ``rows``: each block is a list
    of (file, offset, length) slices."""
    import pyarrow.parquet as pq

    blocks: list[list[dict[str, Any]]] = [[]]
    room = rows
    for p in paths:
        try:
            n = pq.ParquetFile(p).metadata.num_rows
        except Exception as err:  # pyarrow raises several types for a file that is not parquet
            raise SchemaError(f"embeddings table {p} cannot be read: {err}") from err
        offset = 0
        while offset < n:
            if room == 0:
                blocks.append([])
                room = rows
            take = min(room, n - offset)
            blocks[-1].append({"path": str(p), "offset": offset, "length": take})
            offset += take
            room -= take
    return [b for b in blocks if b]


def predict_on_ray(
    model_dir: str | Path,
    embeddings: str | Path,
    out_dir: str | Path,
    *,
    address: str | None = None,
    device: str = "auto",
    actors: int | None = None,
    rows: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> RayRunResult:
    """Score an embeddings parquet file or folder of parts on Ray into ``out_dir`` (``song_id``
    + 7 task columns, one part per block of ``rows``, default
    :data:`~apex_rank.predictor.PREDICT_ROWS`); songs already in ``out_dir`` are skipped.
    ``progress`` gets the number of songs scored after every part."""
    from apex_rank.predictor import PREDICT_ROWS, ApexPredictor

    t0 = time.perf_counter()
    rows = rows or PREDICT_ROWS
    src = Path(embeddings)
    if not src.exists():
        raise SchemaError(f"embeddings table {src} does not exist")
    paths = _parts(src) if src.is_dir() else [src]
    if not paths:
        raise SchemaError(f"embeddings folder {src} holds no parquet file")
    blocks = _row_blocks(paths, rows)
    if not blocks:
        raise SchemaError(f"embeddings table {src} is empty")
    predictor = ApexPredictor.load(model_dir, device="cpu")  # fails here, before any Ray work, on a bad folder
    out = Path(out_dir)
    settings = {"model": str(Path(model_dir).resolve()), "encoder": predictor.encoder, "tasks": list(predictor.tasks)}
    done = _resume(out, settings, "apex-scores")
    session = _Session(address)
    n_written = 0
    try:
        cpus, gpus = session.resources()
        use_gpu = gpus > 0 and device != "cpu"
        n_actors = min(actors or (gpus if use_gpu else cpus), len(blocks))
        threads = 1 if use_gpu else max(1, cpus // n_actors)
        ds = session.ray.data.from_items([{"slices": b} for b in blocks], override_num_blocks=len(blocks))
        ds = ds.map_batches(
            _ScoreActor,
            fn_constructor_args=(str(model_dir), device, done, rows, threads),
            batch_size=1,
            batch_format="pyarrow",
            compute=session.ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=0 if use_gpu else threads,
            num_gpus=1 if use_gpu else 0,
        )
        run = uuid.uuid4().hex[:8]
        written: set[str] = set()
        for i, batch in enumerate(_batches(ds)):
            scores = pl.from_arrow(batch)
            assert isinstance(scores, pl.DataFrame)
            if scores.height == 0:
                continue
            repeated = written.intersection(scores["song_id"].to_list())
            if repeated:
                raise SchemaError(f"{src}: song_id {sorted(repeated)[0]!r} appears in more than one row")
            written.update(scores["song_id"].to_list())
            _write_part(scores, out, f"part-{run}-{i:06d}.parquet", settings, "apex-scores")
            n_written += scores.height
            if progress is not None:
                progress(n_written)
    finally:
        session.close()
    return RayRunResult(out, n_written, len(done), [], predictor.encoder, 0.0, time.perf_counter() - t0)


__all__ = ["META_KEY", "RayRunResult", "embed_on_ray", "predict_on_ray"]
