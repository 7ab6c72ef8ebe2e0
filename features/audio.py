"""Audio front end: decode, mono, resample, segment, streamed so long files stay small in memory.

The official APEX release reads a file with soundfile as float32, averages the channels,
resamples to the encoder's rate and cuts non-overlapping 30 s segments from t = 0, zero-padding
the last one (see ``APEX_SPEC.md``, "Audio front end"). This module does the same, with the
segment length, hop and a policy for a very short last segment configurable, and it does it as
a stream: a file is read in blocks of ``AudioConfig.block_s`` seconds, resampled block by block
with enough context on each side that the result equals a whole-file resample, and segments are
emitted as soon as they are complete. Memory is bounded by a few segments, whatever the length
of the file, and the resampling kernel by :data:`MAX_RATIO_TERM`, whatever its sample rate.

Decoding uses ``soundfile`` (libsndfile) only: WAV, FLAC, AIFF, OGG/Vorbis, OGG/Opus and MP3
(MP3 needs libsndfile >= 1.1; :func:`supported_formats` says what the installed one reads).
Every failure is an :class:`~apex_rank.errors.AudioError` that names the file and the reason.

Example
-------
>>> cfg = AudioConfig(segment_s=30.0)                                   # doctest: +SKIP
>>> stream = SegmentStream("song.opus", sample_rate=24_000, config=cfg)  # doctest: +SKIP
>>> for batch in stream.batches(8):  # (b, 720_000) float32 tensors     # doctest: +SKIP
...     ...
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch

from apex_rank.compat import torchaudio_functional
from apex_rank.errors import AudioError, ConfigError

AF = torchaudio_functional()  # a mismatched torch/torchaudio pair fails here with one clear line

log = logging.getLogger(__name__)

#: File extensions that :func:`find_audio_files` picks up in a folder.
AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aif", ".aiff")
_RAW_EXTENSIONS = (".raw", ".pcm")


SEGMENTING_FIELDS = ("segment_s", "hop_s", "min_last_s", "max_duration_s")  # the AudioConfig fields a vector depends on


@dataclass(frozen=True)
class AudioConfig:
    """How a file becomes fixed-length segments.

    Attributes
    ----------
    segment_s:
        Segment length in seconds (official: 30).
    hop_s:
        Distance between segment starts; ``None`` means ``segment_s`` (official: no overlap).
    min_last_s:
        A last segment holding less than this many seconds of audio is dropped when the file has
        other segments (a 2 s tail padded with 28 s of zeros would weigh as much as a full
        segment in the song mean). ``0`` is the official rule: the remainder is always kept,
        zero-padded; :meth:`official` gives that.
    block_s:
        Seconds of source audio decoded per read; bounds memory for long files.
    max_duration_s:
        Read at most this many seconds of each file (``None``: all of it).
    min_duration_s:
        A file holding less audio than this (as decoded) is an :class:`AudioError` naming the
        file and its duration: a 1-sample WAV or a cut-off download, zero-padded to a whole
        segment, would otherwise embed like a song. ``0`` embeds every file that has a sample.
    silence_dbfs:
        A file whose peak is below this level (dBFS) counts as silent.
    on_silence:
        ``"skip"``: a silent file is an :class:`AudioError` (a broken generation, nothing to
        embed); ``"keep"``: embed it anyway.
    """

    segment_s: float = 30.0
    hop_s: float | None = None
    min_last_s: float = 5.0
    block_s: float = 60.0
    max_duration_s: float | None = None
    min_duration_s: float = 1.0
    silence_dbfs: float = -90.0
    on_silence: Literal["skip", "keep"] = "skip"

    def __post_init__(self) -> None:
        if not self.segment_s > 0:
            raise ConfigError(f"segment_s must be > 0, got {self.segment_s}")
        if self.hop_s is not None and not self.hop_s > 0:
            raise ConfigError(f"hop_s must be > 0, got {self.hop_s}")
        if not self.min_last_s >= 0:
            raise ConfigError(f"min_last_s must be >= 0, got {self.min_last_s}")
        if not self.block_s > 0:
            raise ConfigError(f"block_s must be > 0, got {self.block_s}")
        if self.max_duration_s is not None and not self.max_duration_s > 0:
            raise ConfigError(f"max_duration_s must be > 0, got {self.max_duration_s}")
        if not self.min_duration_s >= 0:
            raise ConfigError(f"min_duration_s must be >= 0, got {self.min_duration_s}")
        if self.max_duration_s is not None and self.min_duration_s > self.max_duration_s:
            raise ConfigError(
                f"min_duration_s ({self.min_duration_s}) must be <= max_duration_s ({self.max_duration_s}), "
                "or every file is too short"
            )
        if self.on_silence not in ("skip", "keep"):
            raise ConfigError(f"on_silence must be 'skip' or 'keep', got {self.on_silence!r}")

    def segmenting(self) -> str:
        """The settings that shape a song's vector (:data:`SEGMENTING_FIELDS`) as compact JSON:
        the ``segmenting`` column of an embeddings table, recorded with the APEX predictor, from
        which online ingest rebuilds the same rule (:meth:`from_segmenting`)."""
        return json.dumps({k: getattr(self, k) for k in SEGMENTING_FIELDS}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_segmenting(cls, text: str, where: str) -> AudioConfig:
        """The rule a ``segmenting`` record describes (other settings default). A record that
        is not such JSON is a :class:`ConfigError` naming ``where``."""
        try:
            value = json.loads(text)
            if not isinstance(value, dict) or set(value) != set(SEGMENTING_FIELDS):
                raise ValueError(f"expected the keys {sorted(SEGMENTING_FIELDS)}")
            short = value["max_duration_s"]  # a shorter cut than the default minimum duration
            return cls(**value, min_duration_s=min(1.0, short) if short is not None else 1.0)
        except (ValueError, TypeError, ConfigError) as err:
            raise ConfigError(f"{where}: segmenting record {text!r} is not valid: {err}") from err

    @classmethod
    def official(cls) -> AudioConfig:
        """The APEX release's rule exactly: 30 s, no overlap, every remainder zero-padded."""
        return cls(segment_s=30.0, hop_s=None, min_last_s=0.0)

    def segment_frames(self, sample_rate: int) -> int:
        """Samples per segment at ``sample_rate``."""
        return max(1, round(self.segment_s * sample_rate))

    def min_last_frames(self, sample_rate: int) -> int:
        """Samples a last segment needs to be kept (capped at one segment)."""
        return round(min(self.min_last_s, self.segment_s) * sample_rate)

    def hop_frames(self, sample_rate: int) -> int:
        """Samples between segment starts at ``sample_rate``."""
        return max(1, round((self.hop_s if self.hop_s is not None else self.segment_s) * sample_rate))


@dataclass(frozen=True)
class AudioInfo:
    """What the file's header says (``frames`` may be an estimate for MP3)."""

    path: str
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def supported_formats() -> dict[str, str]:
    """Container formats the installed libsndfile reads (e.g. ``"MP3"``, ``"OGG"``)."""
    return dict(sf.available_formats())


def _mp3_hint() -> str:
    if "MP3" in supported_formats():
        return ""
    return (
        f" (the installed libsndfile {sf.__libsndfile_version__} cannot read MP3; it needs "
        "libsndfile >= 1.1 built with mpg123: upgrade the soundfile wheel or convert to FLAC)"
    )


def audio_info(path: str | Path) -> AudioInfo:
    """Read a file's header, with an :class:`AudioError` naming the file and reason on failure."""
    p = Path(path)
    if not p.is_file():
        if p.is_dir():
            raise AudioError(f"{p}: is a folder, not an audio file")
        raise AudioError(f"{p}: no such file" if not p.exists() else f"{p}: not a regular file (a FIFO or device?)")
    size = p.stat().st_size
    if size == 0:
        raise AudioError(f"{p}: file is empty (0 bytes)")
    if p.suffix.lower() in _RAW_EXTENSIONS:
        raise AudioError(
            f"{p}: headerless raw PCM has no sample rate, channel count or sample format to read; "
            "convert it to WAV or FLAC (e.g. sox -r RATE -c CH -e signed -b 16 in.raw out.wav)"
        )
    try:
        info = sf.info(str(p))
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        hint = _mp3_hint() if p.suffix.lower() == ".mp3" else ""
        raise AudioError(f"{p}: cannot be decoded as audio: {err}{hint}") from err
    if info.format == "RAW":
        raise AudioError(f"{p}: headerless raw PCM is not supported; convert it to WAV or FLAC")
    if info.format == "OGG" and not _ogg_has_eos(p):
        raise AudioError(
            f"{p}: truncated Ogg stream: its last page lacks the end-of-stream flag (incomplete download or copy?)"
        )
    return AudioInfo(str(p), int(info.samplerate), int(info.channels), int(info.frames), info.format, info.subtype)


def _ogg_has_eos(path: Path) -> bool:
    # an Ogg page is at most 65,307 bytes: the last page header lies within that tail
    size = path.stat().st_size
    with path.open("rb") as fh:
        fh.seek(max(0, size - 65_307))
        tail = fh.read()
    pos = tail.rfind(b"OggS")
    return pos >= 0 and pos + 5 < len(tail) and bool(tail[pos + 5] & 0x04)


def to_mono(x: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) → (frames,) float32, by the mean of the channels."""
    if x.ndim == 1:
        return np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[1] == 1:
        return np.ascontiguousarray(x[:, 0], dtype=np.float32)
    # a matrix-vector product is several times faster than numpy's strided mean over axis 1
    weights = np.full(x.shape[1], 1.0 / x.shape[1], dtype=np.float32)
    return np.ascontiguousarray(x.astype(np.float32, copy=False) @ weights)


#: Largest term of the reduced ratio ``p:q`` the resampler works with (see :func:`resample`).
MAX_RATIO_TERM = 1000
#: Largest relative rate error accepted when an odd ratio is replaced by a nearby small one.
MAX_RATE_ERROR = 1e-3


def resample_ratio(orig_rate: int, new_rate: int) -> tuple[int, int]:
    """The ratio ``(p, q)`` that :func:`resample` uses for ``orig_rate`` → ``new_rate``.

    The exact reduced ratio ``orig/g : new/g`` when both terms are at most
    :data:`MAX_RATIO_TERM` (every common rate pair: 44,100:24,000 is 147:80, 22,050:16,000 is
    441:320); otherwise the closest ratio whose terms both are. That treats the source as if
    it had a rate at most 0.051 % away for any rate from 4 to 200 kHz (44,101 Hz → 24 kHz
    uses 509:277, an error of 0.0002 %), far below audible pitch or timing changes. A ratio
    with no such neighbour within :data:`MAX_RATE_ERROR` (only ratios beyond several hundred
    to one, such as 1 Hz → 24 kHz) is an :class:`AudioError`.
    """
    if orig_rate < 1 or new_rate < 1:
        raise AudioError(f"sample rates must be >= 1 Hz, got {orig_rate} Hz -> {new_rate} Hz")
    g = math.gcd(orig_rate, new_rate)
    p, q = orig_rate // g, new_rate // g
    if max(p, q) <= MAX_RATIO_TERM:
        return p, q
    if p > q:  # the larger term p is bounded by bounding the denominator of q/p
        near = Fraction(new_rate, orig_rate).limit_denominator(MAX_RATIO_TERM)
        p, q = near.denominator, near.numerator
    else:
        near = Fraction(orig_rate, new_rate).limit_denominator(MAX_RATIO_TERM)
        p, q = near.numerator, near.denominator
    if p == 0 or q == 0 or abs(p * new_rate - q * orig_rate) > MAX_RATE_ERROR * q * orig_rate:
        raise AudioError(
            f"cannot resample {orig_rate} Hz to {new_rate} Hz: no ratio with terms <= {MAX_RATIO_TERM} "
            f"lies within {MAX_RATE_ERROR:.1%} of it"
        )
    return p, q


def _check_rates(path: Path, orig_rate: int, new_rate: int) -> None:
    """Fail early, naming the file, when its rate has no bounded ratio to the target rate."""
    try:
        p, q = resample_ratio(orig_rate, new_rate)
    except AudioError as err:
        raise AudioError(f"{path}: {err}") from err
    if p * new_rate != q * orig_rate:
        off = 100 * abs(p * new_rate - q * orig_rate) / (q * orig_rate)
        log.debug("%s: %d Hz -> %d Hz by the ratio %d:%d (rate off by %.4f %%)", path, orig_rate, new_rate, p, q, off)


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resample the last axis with torchaudio's windowed-sinc resampler (identity if equal).

    torchaudio builds a kernel of ``q * (p + 2 * width)`` coefficients for the reduced ratio
    ``p:q`` (``width`` = 6 zero crossings of the lower rate), whatever the signal's length: for
    44,101 Hz → 24 kHz (ratio 44,101:24,000) that is a billion coefficients and a peak over 12 GB.
    Resampling by :func:`resample_ratio` keeps ``p, q <= 1000``, which bounds the kernel at
    1,014,000 coefficients (4 MB in float32, about 25 MB with torchaudio's temporaries) for
    any pair of rates; common rates keep their exact ratio and their output.
    """
    p, q = resample_ratio(int(orig_rate), int(new_rate))
    if p == q:
        return wave
    return AF.resample(wave, p, q)


class StreamingResampler:
    """Resample a signal delivered in blocks so that the output equals a whole-signal resample.

    Each block is resampled together with ``context`` input frames on both sides, which covers
    the sinc kernel; output for the block alone is kept. Context and block sizes are multiples
    of ``p`` of the ratio ``p:q`` that :func:`resample` uses (:func:`resample_ratio`), so block
    boundaries fall on exact output samples. One block is held back as look-ahead, so memory is
    about three blocks plus the bounded kernel.
    """

    def __init__(self, orig_rate: int, new_rate: int, *, block_frames: int) -> None:
        self.orig, self.new = int(orig_rate), int(new_rate)
        self._step_in, self._step_out = resample_ratio(self.orig, self.new)
        # torchaudio's kernel spans lowpass_filter_width (6) periods of the lower rate on each side
        need = 6 * math.ceil(self._step_in / min(self._step_in, self._step_out)) + 16
        self.context = self._step_in * math.ceil(need / self._step_in)
        self.block = self._step_in * max(1, math.ceil(block_frames / self._step_in))
        self._buf = np.zeros(0, dtype=np.float32)  # input frames from index self._base
        self._base = 0
        self._done = 0  # input frames already turned into output
        self.peak_buffer = 0

    def push(self, x: np.ndarray) -> list[torch.Tensor]:
        """Add input frames; return the output pieces that are complete."""
        self._buf = np.concatenate([self._buf, x]) if self._buf.size else x
        self.peak_buffer = max(self.peak_buffer, self._buf.size)
        out = []
        while self._base + self._buf.size >= self._done + self.block + self.context:
            out.append(self._emit(self._done + self.block, final=False))
        return out

    def flush(self) -> list[torch.Tensor]:
        """Return the output for all input pushed so far (call once, at the end)."""
        end = self._base + self._buf.size
        return [self._emit(end, final=True)] if end > self._done else []

    def _emit(self, stop: int, *, final: bool) -> torch.Tensor:
        if self._step_in == self._step_out:
            y = torch.from_numpy(self._buf[self._done - self._base : stop - self._base].copy())
        else:
            lo = max(0, self._done - self.context)
            hi = self._base + self._buf.size if final else stop + self.context
            window = torch.from_numpy(self._buf[lo - self._base : hi - self._base])
            full = AF.resample(window, self._step_in, self._step_out)
            skip = (self._done - lo) // self._step_in * self._step_out
            if final:
                n_out = -(-(stop - self._done) * self._step_out // self._step_in)  # ceil(n * q / p), in integers
            else:
                n_out = (stop - self._done) // self._step_in * self._step_out
            y = full[skip : skip + n_out].clone()
        self._done = stop
        keep_from = max(0, self._done - self.context)
        if keep_from > self._base:
            self._buf = self._buf[keep_from - self._base :]
            self._base = keep_from
        return y


def segment(wave: torch.Tensor, sample_rate: int, config: AudioConfig) -> torch.Tensor:
    """Cut a mono waveform (n,) into segments (k, L) by the rule of :class:`AudioConfig`.

    Segments start at 0, hop, 2·hop, ...; the first segment that reaches the end of the audio
    is the last one and is zero-padded to L. It is dropped when it holds less than
    ``min_last_s`` of audio and an earlier segment exists. An empty waveform gives (0, L).
    """
    L, H = config.segment_frames(sample_rate), config.hop_frames(sample_rate)
    n = int(wave.shape[-1])
    starts = _segment_starts(n, L, H, config.min_last_frames(sample_rate))
    out = torch.zeros((len(starts), L), dtype=torch.float32)
    for i, s in enumerate(starts):
        piece = wave[s : s + L]
        out[i, : piece.shape[0]] = piece
    return out


def check_min_duration(path: str | Path, duration_s: float, min_duration_s: float) -> None:
    """An :class:`AudioError` naming the file and its duration when it is shorter than allowed."""
    if duration_s < min_duration_s:
        raise AudioError(
            f"{path}: too short: {duration_s:.3f} s of audio, under the minimum of {min_duration_s:g} s "
            "(min_duration_s, --min-duration)"
        )


def _segment_starts(n: int, L: int, H: int, min_last: int) -> list[int]:
    starts: list[int] = []
    s = 0
    while s < n:
        starts.append(s)
        if s + L >= n:
            break
        s += H
    if len(starts) > 1 and n - starts[-1] < min_last:
        starts.pop()
    return starts


class SegmentStream:
    """Stream one file as mono segments at ``sample_rate``, reading it block by block.

    Iterate over :meth:`batches` to get (b, L) float32 tensors. After iteration the attributes
    ``duration_s`` (seconds of source audio decoded), ``n_segments``, ``n_reads`` (blocks read)
    and ``peak_buffer_frames`` (largest number of samples held at once, source plus output
    buffers) describe what happened. Decoding failures, NaN/inf samples, zero-length audio and
    (by default) silence raise :class:`AudioError` naming the file.
    """

    def __init__(self, path: str | Path, *, sample_rate: int, config: AudioConfig | None = None) -> None:
        self.path = Path(path)
        self.sample_rate = int(sample_rate)
        self.config = config or AudioConfig()
        self.info = audio_info(self.path)
        _check_rates(self.path, self.info.sample_rate, self.sample_rate)
        self.duration_s = 0.0
        self.n_segments = 0
        self.n_reads = 0
        self.peak_buffer_frames = 0
        self.peak = 0.0

    def _blocks(self) -> Iterator[np.ndarray]:
        sr = self.info.sample_rate
        block = max(1, round(self.config.block_s * sr))
        limit = None if self.config.max_duration_s is None else round(self.config.max_duration_s * sr)
        total = 0
        try:
            with sf.SoundFile(str(self.path)) as fh:
                while limit is None or total < limit:
                    want = block if limit is None else min(block, limit - total)
                    x = fh.read(want, dtype="float32", always_2d=True)
                    if x.shape[0] == 0:
                        break
                    self.n_reads += 1
                    total += x.shape[0]
                    yield x
                    if x.shape[0] < want:
                        break
        except (sf.LibsndfileError, RuntimeError) as err:
            raise AudioError(
                f"{self.path}: decoding failed in the block starting at {total / sr:.2f} s: {err}"
            ) from err

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield (b, L) segment batches, b <= ``batch_size``, in time order."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        cfg, sr_in = self.config, self.info.sample_rate
        L, H = cfg.segment_frames(self.sample_rate), cfg.hop_frames(self.sample_rate)
        min_last = cfg.min_last_frames(self.sample_rate)
        res = StreamingResampler(sr_in, self.sample_rate, block_frames=round(cfg.block_s * sr_in))
        buf = torch.zeros(0)  # output samples from index buf_start
        buf_start = 0
        next_start = 0
        pending: list[torch.Tensor] = []
        frames_in = 0

        def full_segments(final_n: int | None) -> Iterator[torch.Tensor]:
            nonlocal buf, buf_start, next_start
            avail = buf_start + buf.shape[0]
            while True:
                if final_n is None:
                    # strictly more audio must follow, or this could be the (padded) last segment
                    if next_start + L >= avail:
                        return
                elif next_start >= final_n:
                    return
                s = next_start - buf_start
                seg = buf[s : s + L]
                last = final_n is not None and next_start + L >= final_n
                if last and seg.shape[0] < L:
                    seg = torch.nn.functional.pad(seg, (0, L - seg.shape[0]))
                if last and final_n is not None and self.n_segments > 0 and final_n - next_start < min_last:
                    return
                self.n_segments += 1
                yield seg
                next_start += H
                if last and final_n is not None:
                    next_start = final_n
                drop = min(next_start, buf_start + buf.shape[0]) - buf_start
                if drop > 0:
                    buf = buf[drop:]
                    buf_start += drop

        def grow(pieces: list[torch.Tensor]) -> None:
            nonlocal buf
            if pieces:
                buf = torch.cat([buf, *pieces])
            self.peak_buffer_frames = max(self.peak_buffer_frames, res.peak_buffer + buf.shape[0])

        for block in self._blocks():
            mono = to_mono(block)
            finite = np.isfinite(mono)
            if not finite.all():
                first = frames_in + int(np.flatnonzero(~finite)[0])
                raise AudioError(
                    f"{self.path}: holds {int((~finite).sum())} NaN/inf sample(s) in a block, "
                    f"the first at {first / sr_in:.3f} s"
                )
            self.peak = max(self.peak, float(np.abs(mono).max(initial=0.0)))
            frames_in += mono.shape[0]
            grow(res.push(mono))
            for seg in full_segments(None):
                pending.append(seg)
                if len(pending) == batch_size:
                    yield torch.stack(pending)
                    pending = []
        if frames_in == 0:
            raise AudioError(f"{self.path}: has no audio samples (zero duration)")
        self.duration_s = frames_in / sr_in
        expected = self.info.frames
        if cfg.max_duration_s is not None:
            expected = min(expected, round(cfg.max_duration_s * sr_in))
        if frames_in < expected - max(2048, 0.01 * expected):
            raise AudioError(
                f"{self.path}: truncated or corrupt: the header promises {expected / sr_in:.2f} s but only "
                f"{frames_in / sr_in:.2f} s could be decoded"
            )
        check_min_duration(self.path, self.duration_s, cfg.min_duration_s)
        if self.config.on_silence == "skip" and self.peak <= 10 ** (self.config.silence_dbfs / 20):
            raise AudioError(
                f"{self.path}: is silent (peak {self._peak_db():.1f} dBFS <= {self.config.silence_dbfs} dBFS); "
                "use on_silence='keep' to embed it anyway"
            )
        grow(res.flush())
        n_out = buf_start + buf.shape[0]
        for seg in full_segments(n_out):
            pending.append(seg)
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []
        if pending:
            yield torch.stack(pending)

    def _peak_db(self) -> float:
        return 20 * math.log10(self.peak) if self.peak > 0 else -math.inf


def read_audio(
    path: str | Path, *, sample_rate: int | None = None, max_duration_s: float | None = None
) -> tuple[np.ndarray, int]:
    """Decode a whole file to mono float32 (n,), resampled to ``sample_rate`` if given.

    For long files prefer :class:`SegmentStream`, which never holds the whole file.
    Returns ``(wave, rate)``. Errors are :class:`AudioError` naming the file.
    """
    info = audio_info(path)
    rate = sample_rate or info.sample_rate
    _check_rates(Path(path), info.sample_rate, rate)
    cfg = AudioConfig(max_duration_s=max_duration_s, min_duration_s=0.0, on_silence="keep")
    stream = SegmentStream(path, sample_rate=info.sample_rate, config=cfg)
    pieces = [to_mono(b) for b in stream._blocks()]
    if not pieces:
        raise AudioError(f"{path}: has no audio samples (zero duration)")
    wave = np.concatenate(pieces)
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: holds {int((~np.isfinite(wave)).sum())} NaN/inf sample(s)")
    if rate != info.sample_rate:
        wave = resample(torch.from_numpy(wave), info.sample_rate, rate).numpy()
    return wave, rate


@dataclass(frozen=True)
class FolderScan:
    """What :func:`scan_audio_folder` found: audio files (sorted) and the entries it passed over,
    each as ``(path, reason)``."""

    files: list[Path]
    skipped: list[tuple[Path, str]]


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def scan_audio_folder(folder: str | Path, *, extensions: tuple[str, ...] = AUDIO_EXTENSIONS) -> FolderScan:
    """Audio files under ``folder`` (recursive, sorted) and every entry passed over, with the reason.

    Hidden entries (a name starting with ``.``) and files of other extensions are ignored
    without a word. Listed in ``skipped``: a sub-folder that cannot be read; a symbolic link to
    a folder (never followed, so a link loop cannot recurse; linked files are read); a broken or
    looping link; and an entry named like an audio file that is not a regular file (a FIFO, a
    socket, a device, or a folder such as ``x.mp3/``, whose contents are searched all the same).
    """
    root = Path(folder)
    if not root.is_dir():
        raise AudioError(f"{root}: not a folder")
    exts = {e.lower() for e in extensions}
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    todo = [root]
    while todo:
        d = todo.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as err:
            if d == root:
                raise AudioError(f"{root}: folder cannot be read: {err.strerror or err}") from err
            skipped.append((d, f"folder cannot be read: {err.strerror or err}"))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            path, audio_name = Path(e.path), Path(e.name).suffix.lower() in exts
            try:
                st = os.stat(path)  # follows a link
            except OSError as err:
                what = "symbolic link cannot be followed" if e.is_symlink() else "cannot be read"
                skipped.append((path, f"{what}: {err.strerror or err}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                if e.is_symlink():
                    target = os.readlink(path)
                    skipped.append(
                        (path, f"symbolic link to a folder ({target}), not followed: links to folders never are")
                    )
                    continue
                if audio_name:
                    skipped.append((path, "is a folder, not an audio file (searched like any sub-folder)"))
                todo.append(path)
            elif stat.S_ISREG(st.st_mode):
                if audio_name:
                    files.append(path)
            elif audio_name:
                kind = next((name for test, name in _SPECIAL_FILES if test(st.st_mode)), "not a regular file")
                skipped.append((path, f"is {kind}, not an audio file"))
    return FolderScan(sorted(files), sorted(skipped))


def find_audio_files(folder: str | Path, *, extensions: tuple[str, ...] = AUDIO_EXTENSIONS) -> list[Path]:
    """Audio files under ``folder`` (recursive, sorted, hidden files skipped); the entries
    :func:`scan_audio_folder` passes over are logged as warnings."""
    scan = scan_audio_folder(folder, extensions=extensions)
    for path, reason in scan.skipped:
        log.warning("skipped %s: %s", path, reason)
    return scan.files
