"""Audio ingest: a new song's file → its embedding, with the bundle's own encoder, off the
serving process.

The bundle records the encoder its embeddings came from: the APEX predictor's manifest holds
the ``encoder`` id (``"<name>:<config hash>"``, the ``encoder`` column of the embeddings table
it was trained on). :class:`AudioEmbedder` rebuilds that encoder from the registry
(:data:`~apex_rank.features.encoders.ENCODERS`, default options, nothing downloaded) in a small
process pool and embeds with the same functions as ``apex-rank embed``
(:func:`~apex_rank.features.embed._worker_init` / ``_worker_embed``) and cuts the audio by the
rule the catalogue was cut by (the embeddings table's ``segmenting`` column, which the predictor
records next to the encoder id; the default rule for a bundle without one), so an ingested
song's vector equals the offline pipeline's vector of the same file. An encoder that cannot be
rebuilt, or rebuilds to another id, is refused with one error naming the bundle and the
encoder.

Invariants the tests check:

- Decoding runs in a worker process (spawned lazily, one by default): a decoder that hangs is
  killed after ``timeout_s``, one that crashes takes down only its worker; the serving process
  answers 422 and starts a fresh pool for the next file.
- A file is bounded before it is decoded: ``max_bytes`` on disk (uploads are capped at the
  same size by the HTTP layer) and ``max_duration_s`` by its header; reading stops at
  ``max_duration_s`` even when the header lies.
- A path is read only under the allow-list ``root`` (:func:`resolve_audio_path`): absolute or
  relative, after every symbolic link is resolved; with no root no path is read at all.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apex_rank.errors import ConfigError, RequestError

if TYPE_CHECKING:
    from apex_rank.features.audio import AudioConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioIngestConfig:
    """Limits of audio ingest (TOML ``[online.audio]``).

    Attributes
    ----------
    root:
        Folder under which ``POST /songs`` may name audio files by path (``apex-rank serve
        --audio-root``); ``None``: no path is accepted, only uploads.
    max_bytes:
        Largest audio file, on disk or uploaded (``POST /songs/{song_id}/audio``).
    max_duration_s:
        Longest audio, by the file's header; reading stops there in any case.
    timeout_s:
        A file not embedded within this many seconds is refused and its worker killed.
    workers:
        Worker processes embedding files (each holds one copy of the encoder).
    """

    root: str | None = None
    max_bytes: int = 64 * 1024 * 1024
    max_duration_s: float = 900.0
    timeout_s: float = 120.0
    workers: int = 1

    def __post_init__(self) -> None:
        for name in ("max_bytes", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"online.audio.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_duration_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"online.audio.{name} must be > 0, got {getattr(self, name)}")


class AudioPathForbidden(RequestError):
    """A path outside the allow-list root, or any path when no root is configured (HTTP 403)."""


def resolve_audio_path(path: str, root: str | None) -> Path:
    """The real path of ``path`` (relative paths are taken from ``root``), refused unless it
    lies under ``root`` once every symbolic link is resolved.

    Raises
    ------
    AudioPathForbidden
        No root is configured, or the path escapes it (``..``, an absolute path elsewhere, a
        link pointing out of it).
    """
    if root is None:
        raise AudioPathForbidden("audio paths are not accepted: the server has no audio root "
                                 "(apex-rank serve --audio-root DIR); upload the file to "
                                 "POST /songs/{song_id}/audio instead")
    base = Path(os.path.realpath(root))
    real = Path(os.path.realpath(base / path))  # an absolute ``path`` replaces ``base``
    if not real.is_relative_to(base):
        raise AudioPathForbidden(f"audio path {path!r} is outside the audio root {root} "
                                 "(after resolving links)")
    return real


# ----------------------------------------------------------------------------- worker side

_INIT_ERROR: list[str] = []


def _init(spec: Any, audio: Any) -> None:
    """Build the encoder once per worker; a failure is kept and reported by :func:`_encoder_id`
    (an initializer that raises only leaves a broken pool, without the reason)."""
    from apex_rank.features.embed import _worker_init

    try:
        _worker_init(spec, audio, 1)
    except Exception as err:  # noqa: BLE001 - reported to the parent as text
        _INIT_ERROR.append(f"{type(err).__name__}: {err}")


def _encoder_id() -> str | tuple[str]:
    """The worker encoder's id, or ``(reason,)`` when it could not be built."""
    from apex_rank.features.embed import _WORKER

    return (_INIT_ERROR[0],) if _INIT_ERROR else str(_WORKER["encoder"].id)


def _embed(path: str, max_duration_s: float) -> np.ndarray | str:
    """The song vector of one file, or the reason it cannot be embedded (the message names it)."""
    from apex_rank.errors import AudioError
    from apex_rank.features.audio import audio_info
    from apex_rank.features.embed import FileFailure, SongSource, _worker_embed

    try:
        info = audio_info(path)
    except AudioError as err:
        return str(err)
    if info.duration_s > max_duration_s:
        return f"{path}: is {info.duration_s:.0f} s long; the limit is {max_duration_s:g} s"
    res = _worker_embed(SongSource("upload", path))
    return res.reason if isinstance(res, FileFailure) else res.vector


# ----------------------------------------------------------------------------- serving side


class AudioEmbedder:
    """Embeds audio files with a bundle's encoder in a lazily started worker pool.

    Parameters
    ----------
    bundle_dir:
        The bundle (named in errors).
    encoder_id:
        The encoder its embeddings came from (``None``: the bundle records none).
    dim:
        The bundle's embedding width.
    config:
        Limits (:class:`AudioIngestConfig`).

    Example
    -------
    >>> emb = AudioEmbedder("bundle/", "spectral:0123abcd", 238, AudioIngestConfig())  # doctest: +SKIP
    >>> emb.embed("song.wav").shape                                                     # doctest: +SKIP
    (238,)
    >>> emb.close()                                                                     # doctest: +SKIP
    """

    def __init__(self, bundle_dir: str, encoder_id: str | None, dim: int,
                 config: AudioIngestConfig, segmenting: str | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.encoder_id = encoder_id
        self.segmenting = segmenting  # how the bundle's songs were cut (None: the default rule)
        self.dim = int(dim)
        self.config = config
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()  # one pool, however many requests start it at once

    def _refuse(self, why: str) -> RequestError:
        return RequestError(f"bundle {self.bundle_dir} embeds with encoder {self.encoder_id!r}, "
                            f"which this server cannot rebuild ({why}); send the song's embedding "
                            "instead")

    def audio_config(self) -> AudioConfig:
        """The rule the bundle's songs were cut by (its APEX predictor's ``segmenting`` record;
        the default rule for a bundle without one), read no further than ``max_duration_s``."""
        from apex_rank.features.audio import AudioConfig

        rule = (AudioConfig.from_segmenting(self.segmenting, f"bundle {self.bundle_dir}") if self.segmenting
                else AudioConfig())
        cut = [d for d in (rule.max_duration_s, self.config.max_duration_s) if d is not None]
        return replace(rule, max_duration_s=min(cut) if cut else None,
                       min_duration_s=min([rule.min_duration_s, *cut]))

    def _start(self) -> ProcessPoolExecutor:
        """The pool, started on first use with the bundle's encoder (checked by its id)."""
        if self._pool is not None:
            return self._pool
        from apex_rank.features.encoders import ENCODERS, EncoderSpec

        if self.encoder_id is None:
            raise self._refuse("the bundle records no encoder")
        name = self.encoder_id.split(":", 1)[0]
        if name not in ENCODERS or name == "precomputed":
            raise self._refuse(f"{name!r} is not an audio encoder of the registry")
        spec = EncoderSpec.of(name)
        audio = self.audio_config()
        pool = ProcessPoolExecutor(self.config.workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init, initargs=(spec, audio))
        try:
            got = pool.submit(_encoder_id).result(timeout=max(self.config.timeout_s, 300.0))
        except (BrokenProcessPool, FutureTimeout) as err:
            _kill(pool)
            raise self._refuse(f"its worker did not start: {type(err).__name__}") from err
        if isinstance(got, tuple):
            _kill(pool)
            raise self._refuse(got[0])
        if ":" in self.encoder_id and got != self.encoder_id:
            _kill(pool)
            raise self._refuse(f"built from the registry with default options it is {got!r}")
        self._pool = pool
        return pool

    def embed(self, path: str | Path) -> np.ndarray:
        """(dim,) float32 song vector of the file at ``path``.

        Raises
        ------
        RequestError
            The file is too large, too long, not decodable, slower than ``timeout_s``, or its
            decoder crashed (each message names the file); or the encoder cannot be rebuilt.
        """
        p = Path(path)
        try:
            size = p.stat().st_size
        except OSError as err:
            raise RequestError(f"audio file {p}: cannot be read: {err.strerror or err}") from err
        if size > self.config.max_bytes:
            raise RequestError(f"audio file {p} is {size} bytes; the limit is {self.config.max_bytes}")
        with self._lock:
            pool = self._start()
            try:
                fut = pool.submit(_embed, str(p), self.config.max_duration_s)
            except BrokenProcessPool:  # a worker died after an earlier file: not this file's fault
                self._reset()
                pool = self._start()
                fut = pool.submit(_embed, str(p), self.config.max_duration_s)
        try:
            out = fut.result(timeout=self.config.timeout_s)
        except FutureTimeout as err:
            self._reset()
            raise RequestError(f"audio file {p}: not embedded within {self.config.timeout_s:g} s; "
                               "its worker was stopped") from err
        except BrokenProcessPool as err:
            self._reset()
            raise RequestError(f"audio file {p}: the decoder's worker process died "
                               "(a crash in the decoder or out of memory)") from err
        if isinstance(out, str):
            raise RequestError(out)
        vec = np.ascontiguousarray(out, dtype=np.float32)
        if vec.shape != (self.dim,):
            raise self._refuse(f"it gave width {vec.shape[-1]}, the bundle has {self.dim}")
        return vec

    def _reset(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            _kill(pool)

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`embed` starts new ones)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _kill(pool: ProcessPoolExecutor) -> None:
    """Stop a pool whose worker may be stuck in native code: ``shutdown`` alone would wait for
    it (Python 3.14 has ``terminate_workers``; before, the processes are killed directly)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)
