"""Segment encoders: one contract, three implementations, looked up by name in :data:`ENCODERS`.

Contract (:class:`Encoder`): ``sample_rate`` (Hz the segments must have), ``dim`` (output
width), ``id`` (``"<name>:<config hash>"``, stored with every embedding so tables from
different encoders or settings are never mixed) and ``embed(segments)`` mapping a (b, n)
float32 tensor of equal-length mono segments to a (b, dim) float32 tensor.

- ``spectral`` (default, no weights): a classic music-information-retrieval descriptor from
  torch/torchaudio transforms, deterministic, :data:`SPECTRAL_DIM` = 238 values per segment
  (layout in :class:`SpectralEncoder`).
- ``mert-v1-95m`` / ``mert-v1-330m`` / ``mert`` (any local folder): a frozen ``transformers``
  model; hidden states of the chosen layers are averaged over time and fused, by default with
  the APEX release's fixed 1×1-conv weights (``APEX_SPEC.md``).
- ``precomputed``: embeddings read from a parquet table; it looks songs up by id and cannot
  embed audio.

Example
-------
>>> enc = get_encoder("spectral")
>>> enc.embed(torch.zeros(2, enc.sample_rate * 30)).shape
torch.Size([2, 238])
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from apex_rank.compat import torchaudio_functional
from apex_rank.config import from_dict, to_dict
from apex_rank.device import resolve_device
from apex_rank.errors import CheckpointError, ConfigError, MissingDependencyError

AF = torchaudio_functional()  # a mismatched torch/torchaudio pair fails here with one clear line

log = logging.getLogger(__name__)

#: Bumped when an encoder's computation changes, so old cache entries stop matching.
ENCODER_CODE_VERSION = 1

#: The APEX release's layer-fusion 1×1 Conv1d (4 → 1), as seed 42 initialised it (never trained).
OFFICIAL_FUSION_WEIGHTS: tuple[float, float, float, float] = (
    0.3822692632675171,
    0.4150039553642273,
    -0.11713624000549316,
    0.45930564403533936,
)
OFFICIAL_FUSION_BIAS = -0.10955178737640381
OFFICIAL_LAYERS: tuple[int, int, int, int] = (2, 5, 8, -1)


@runtime_checkable
class Encoder(Protocol):
    """What every encoder offers. ``embed`` is pure: same segments, same vectors."""

    name: str
    sample_rate: int
    dim: int

    @property
    def config_hash(self) -> str:
        """Short hash of everything that changes the output (config, code version, weights)."""
        ...

    @property
    def id(self) -> str:
        """``"<name>:<config_hash>"``."""
        ...

    def embed(self, segments: torch.Tensor) -> torch.Tensor:
        """(b, n) float32 mono segments at ``sample_rate`` → (b, dim) float32 on the CPU."""
        ...


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _check_segments(segments: torch.Tensor) -> torch.Tensor:
    if not isinstance(segments, torch.Tensor) or segments.ndim != 2:
        shape = tuple(segments.shape) if isinstance(segments, torch.Tensor) else type(segments).__name__
        raise ConfigError(f"segments must be a (b, n_samples) tensor, got {shape}")
    if segments.shape[1] == 0:
        raise ConfigError("segments must hold at least one sample each")
    return segments.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------- spectral


@dataclass(frozen=True)
class SpectralConfig:
    """Settings of the ``spectral`` encoder.

    Attributes
    ----------
    sample_rate: rate the segments are resampled to (16 kHz keeps it fast; music content below
        8 kHz carries the style cues used here).
    n_fft, hop_length: STFT size and hop in samples (64 ms / 32 ms at 16 kHz).
    n_mels: mel bands of the log-mel statistics.
    n_mfcc: cepstral coefficients (DCT-II of the log-mel spectrum).
    device: where the transforms run (``"cpu"`` is right for this encoder).
    batch_size: segments per ``embed`` call the pipeline uses.
    """

    sample_rate: int = 16_000
    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 64
    n_mfcc: int = 20
    device: str = "cpu"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.sample_rate < 4000:
            raise ConfigError(f"spectral sample_rate must be >= 4000 Hz, got {self.sample_rate}")
        if self.n_fft < 64 or self.hop_length < 1 or self.n_mels < 8 or not 1 <= self.n_mfcc <= self.n_mels:
            raise ConfigError(
                f"spectral config out of range: n_fft={self.n_fft} (>=64), hop_length={self.hop_length} (>=1), "
                f"n_mels={self.n_mels} (>=8), n_mfcc={self.n_mfcc} (1..n_mels)"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


_CONTRAST_EDGES_HZ = (0.0, 200.0, 400.0, 800.0, 1600.0, 3200.0, 6400.0, math.inf)


def spectral_dim(cfg: SpectralConfig) -> int:
    """Output width: log-mel mean+std, MFCC mean+std+Δstd, chroma mean+std,
    7-band contrast mean+std, 6 scalar descriptors mean+std."""
    return 2 * cfg.n_mels + 3 * cfg.n_mfcc + 24 + 14 + 12


SPECTRAL_DIM = spectral_dim(SpectralConfig())


class SpectralEncoder:
    """Log-mel, MFCC, chroma, spectral-contrast and scalar spectral statistics per segment.

    Layout of the 238 values (default config), each a mean or std over the segment's frames:
    log-mel mean (64), log-mel std (64), MFCC mean (20), MFCC std (20), ΔMFCC std (20),
    chroma mean (12), chroma std (12), contrast mean (7), contrast std (7), then mean and std of
    spectral centroid, bandwidth, 85 % roll-off (all / Nyquist), flatness, log RMS and
    zero-crossing rate (12). Frames that are digital silence (the zero padding of a short last
    segment) are left out of the statistics, so padding does not pull a song's vector towards
    silence; an all-silent segment uses all its frames and gives a finite vector.

    Example
    -------
    >>> enc = SpectralEncoder(SpectralConfig())
    >>> enc.dim
    238
    """

    name = "spectral"

    def __init__(self, config: SpectralConfig | None = None) -> None:
        self.config = config or SpectralConfig()
        c = self.config
        self.sample_rate = c.sample_rate
        self.dim = spectral_dim(c)
        self.batch_size = c.batch_size
        self.device = resolve_device(c.device)
        n_freqs = c.n_fft // 2 + 1
        self._window = torch.hann_window(c.n_fft, device=self.device)
        freqs = torch.linspace(0, c.sample_rate / 2, n_freqs)
        mel = AF.melscale_fbanks(
            n_freqs, 20.0, c.sample_rate / 2, c.n_mels, c.sample_rate, norm="slaney", mel_scale="slaney"
        )
        # every linear read-out of the power spectrum in one (F, M + 12 + 3) matrix: one pass
        self._proj = torch.cat(
            [mel, self._chroma_bank(freqs), torch.stack([torch.ones_like(freqs), freqs, freqs.square()], 1)], dim=1
        ).to(self.device)
        self._dct = AF.create_dct(c.n_mfcc, c.n_mels, norm="ortho").to(self.device)  # (M, C)
        self._mel_centres = ((mel * freqs[:, None]).sum(0) / mel.sum(0).clamp(min=1e-10)).to(self.device)
        self._bands = [
            (int((freqs >= lo).nonzero()[0]), int((freqs < hi).nonzero()[-1]) + 1)
            for lo, hi in zip(_CONTRAST_EDGES_HZ[:-1], _CONTRAST_EDGES_HZ[1:], strict=True)
        ]

    @staticmethod
    def _chroma_bank(freqs: torch.Tensor) -> torch.Tensor:
        # each bin votes for its pitch class with a Gaussian of 0.5 semitone in pitch distance
        f = freqs.clamp(min=1e-3)
        midi = 69 + 12 * torch.log2(f / 440.0)
        pcs = torch.arange(12, dtype=torch.float32)
        dist = torch.remainder(midi[:, None] - pcs[None, :] + 6, 12) - 6
        bank = torch.exp(-0.5 * (dist / 0.5) ** 2)
        bank[(freqs < 55.0) | (freqs > 5000.0)] = 0.0
        return bank

    @property
    def config_hash(self) -> str:
        cfg = {k: v for k, v in to_dict(self.config).items() if k not in ("device", "batch_size")}
        return _hash({"encoder": self.name, "config": cfg, "code": ENCODER_CODE_VERSION})

    @property
    def id(self) -> str:
        return f"{self.name}:{self.config_hash}"

    @torch.inference_mode()
    def embed(self, segments: torch.Tensor) -> torch.Tensor:
        """(b, n) → (b, 238) float32; see the class docstring for the layout."""
        x = _check_segments(segments).to(self.device)
        c = self.config
        M = c.n_mels
        spec = torch.stft(x, c.n_fft, c.hop_length, window=self._window, center=True, return_complex=True)
        power = torch.view_as_real(spec).square().sum(-1)  # (b, F, T)
        n_bins = power.shape[1]
        proj = torch.einsum("bft,fk->bkt", power, self._proj)  # (b, M + 15, T)
        melpow, chroma = proj[:, :M], proj[:, M : M + 12]
        psum, fsum, f2sum = proj[:, M + 12], proj[:, M + 13], proj[:, M + 14]

        mask = psum > 1e-10  # digital silence (padding) is left out of the statistics
        mask = mask | ~mask.any(dim=1, keepdim=True)  # an all-silent segment: use every frame
        w = mask.to(torch.float32)
        n = w.sum(dim=1, keepdim=True)

        def stats(feat: torch.Tensor) -> list[torch.Tensor]:  # feat (b, K, T) → mean, std (b, K)
            mean = (feat * w[:, None, :]).sum(-1) / n
            var = ((feat - mean[..., None]).square() * w[:, None, :]).sum(-1) / n
            return [mean, var.clamp(min=0).sqrt()]

        logmel = torch.log(melpow + 1e-8)  # (b, M, T)
        mfcc = torch.einsum("bmt,mc->bct", logmel, self._dct)  # (b, C, T)
        dmfcc = mfcc[..., 1:] - mfcc[..., :-1]
        dw = (w[:, 1:] * w[:, :-1])[:, None]
        dn = dw.sum(-1).clamp(min=1)
        dmean = (dmfcc * dw).sum(-1) / dn
        dstd = (((dmfcc - dmean[..., None]).square() * dw).sum(-1) / dn).sqrt()
        chroma = chroma / chroma.amax(dim=1, keepdim=True).clamp(min=1e-10)

        logp = torch.log(power + 1e-10)
        band_mean = torch.stack([logp[:, lo:hi].mean(1) for lo, hi in self._bands], dim=1)  # (b, 7, T)
        band_peak = torch.stack([logp[:, lo:hi].amax(1) for lo, hi in self._bands], dim=1)
        contrast = band_peak - band_mean  # peak over geometric mean, per octave band
        widths = torch.tensor([hi - lo for lo, hi in self._bands], dtype=torch.float32, device=x.device)

        nyq = c.sample_rate / 2
        safe = psum.clamp(min=1e-10)
        centroid = fsum / safe
        bandwidth = (f2sum / safe - centroid.square()).clamp(min=0).sqrt()
        cum = melpow.cumsum(1)
        rolloff = self._mel_centres[(cum < 0.85 * cum[:, -1:, :]).sum(1).clamp(max=M - 1)]
        pmean = psum / n_bins
        flatness = torch.exp(torch.einsum("bkt,k->bt", band_mean, widths) / n_bins) / (pmean + 1e-10)
        rms = 0.5 * torch.log(pmean + 1e-10)
        t = power.shape[2]
        usable = (x.shape[1] // c.hop_length) * c.hop_length
        signs = torch.signbit(x[:, :usable].reshape(x.shape[0], -1, c.hop_length))
        zcr = (signs[..., 1:] != signs[..., :-1]).float().mean(-1)
        # hop-sized blocks, not centred windows: pad or cut to the STFT's frame count
        if zcr.shape[1] < t:
            zcr = torch.nn.functional.pad(zcr[:, None], (0, t - zcr.shape[1]), mode="replicate")[:, 0]
        scalars = torch.stack([centroid / nyq, bandwidth / nyq, rolloff / nyq, flatness, rms, zcr[:, :t]], dim=1)

        s_mean, s_std = stats(scalars)
        parts = [
            *stats(logmel),
            *stats(mfcc),
            dstd,
            *stats(chroma),
            *stats(contrast),
            torch.stack([s_mean, s_std], dim=2).reshape(x.shape[0], -1),
        ]
        return torch.cat(parts, dim=1).to("cpu", torch.float32).contiguous()


# ------------------------------------------------------------------------------------- MERT


@dataclass(frozen=True)
class MertConfig:
    """Settings of a ``transformers`` audio encoder (MERT or any HuBERT-shaped model).

    Attributes
    ----------
    model: a local folder with ``config.json`` and weights, or a hub name
        (``m-a-p/MERT-v1-95M``), used only when found in the local Hugging Face cache or when
        ``allow_download`` is true.
    layers: indices into ``hidden_states`` (0 = input to the transformer, -1 = last layer).
    fusion: ``"official"`` (the APEX release's fixed weights; needs 4 layers), ``"mean"``
        (plain mean of the layers) or ``"weights"`` (``fusion_weights`` and ``fusion_bias``).
    normalize: zero-mean unit-variance per segment before the model; ``"auto"`` reads
        ``do_normalize`` from the folder's ``preprocessor_config.json`` (absent: off).
    precision: ``"auto"`` = bf16 (or fp16) autocast on CUDA, fp32 on the CPU.
    trust_remote_code: MERT's hub checkpoints ship their own model code; loading them needs
        this set to true (it runs that code).
    """

    model: str = "m-a-p/MERT-v1-95M"
    layers: tuple[int, ...] = OFFICIAL_LAYERS
    fusion: Literal["official", "mean", "weights"] = "official"
    fusion_weights: tuple[float, ...] | None = None
    fusion_bias: float = 0.0
    sample_rate: int = 24_000
    normalize: Literal["auto", "on", "off"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    device: str = "auto"
    batch_size: int = 4
    allow_download: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("layers must name at least one hidden-state index")
        if self.fusion == "official" and len(self.layers) != 4:
            raise ConfigError(
                f"fusion 'official' has 4 weights but layers={list(self.layers)} has {len(self.layers)}; "
                "use fusion='mean' or fusion='weights'"
            )
        if self.fusion == "weights" and (self.fusion_weights is None or len(self.fusion_weights) != len(self.layers)):
            raise ConfigError(
                f"fusion 'weights' needs one fusion_weight per layer ({len(self.layers)}), got {self.fusion_weights}"
            )
        if self.fusion not in ("official", "mean", "weights"):
            raise ConfigError(f"fusion must be 'official', 'mean' or 'weights', got {self.fusion!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise MissingDependencyError("the MERT encoder needs transformers: pip install 'apex-rank[mert]'") from err
    return transformers


def _how_to_get(model: str) -> str:
    return (
        "MERT weights are not in any package registry (licence CC-BY-NC-4.0, you supply them). On a "
        "machine with network: `huggingface-cli download m-a-p/MERT-v1-95M --local-dir ./MERT-v1-95M` "
        "(or MERT-v1-330M), then pass that folder (--encoder mert --encoder-model ./MERT-v1-95M); or "
        "allow the download here with allow_download=True (--allow-download)"
    )


class MertEncoder:
    """A frozen transformers encoder; segment vector = fusion of time-averaged hidden states.

    For layers ``[l1..lk]`` and fusion weights ``w``, bias ``b``:
    ``e = Σ_i w_i · mean_t(hidden_states[l_i]) + b`` (the APEX release's 1×1 Conv1d over the
    stacked layers). No attention mask is passed: segments have a fixed length, and MERT's
    all-ones mask produced NaNs in some HuBERT code paths. Weights are verified after loading:
    any parameter that the checkpoint did not provide (and transformers would silently
    initialise at random) is a :class:`CheckpointError`.

    Example
    -------
    >>> enc = MertEncoder(MertConfig(model="./MERT-v1-95M", trust_remote_code=True))  # doctest: +SKIP
    >>> enc.embed(torch.zeros(2, 24_000 * 30)).shape                                  # doctest: +SKIP
    torch.Size([2, 768])
    """

    def __init__(self, config: MertConfig | None = None) -> None:
        self.config = c = config or MertConfig()
        self.name = "mert"
        self.sample_rate = c.sample_rate
        self.batch_size = c.batch_size
        self.device = resolve_device(c.device)
        self.model, self._source_hash, do_norm = self._load()
        n_states = int(self.model.config.num_hidden_layers) + 1
        bad = [i for i in c.layers if not -n_states <= i < n_states]
        if bad:
            raise ConfigError(
                f"layer index(es) {bad} do not exist: {c.model} has {n_states} hidden states "
                f"(valid indices {-n_states}..{n_states - 1})"
            )
        self._normalize = do_norm if c.normalize == "auto" else c.normalize == "on"
        self.dim = int(self.model.config.hidden_size)
        w: tuple[float, ...]
        if c.fusion == "official":
            w, b = OFFICIAL_FUSION_WEIGHTS, OFFICIAL_FUSION_BIAS
        elif c.fusion == "mean":
            w, b = tuple(1.0 / len(c.layers) for _ in c.layers), 0.0
        else:
            w, b = tuple(c.fusion_weights or ()), c.fusion_bias
        self.fusion_weights = torch.tensor(w, dtype=torch.float32)
        self.fusion_bias = float(b)
        self._autocast = self._pick_autocast()

    def _load(self) -> tuple[Any, str, bool]:
        c = self.config
        tf = _import_transformers()
        path = Path(c.model).expanduser()
        is_local = path.is_dir()
        looks_like_path = c.model.startswith((".", "/", "~")) or os.sep in c.model.strip("/").split("/", 1)[-1]
        if not is_local and (looks_like_path or path.exists()):
            raise CheckpointError(f"model folder {c.model} does not exist or is not a folder. {_how_to_get(c.model)}")
        src = str(path) if is_local else c.model
        try:
            model, info = tf.AutoModel.from_pretrained(
                src,
                local_files_only=is_local or not c.allow_download,
                trust_remote_code=c.trust_remote_code,
                output_loading_info=True,
            )
        except OSError as err:
            reason = " ".join(str(err).split())
            raise CheckpointError(f"cannot load model {c.model!r}: {reason} {_how_to_get(c.model)}") from err
        except ValueError as err:
            hint = (
                " (MERT checkpoints ship their own code: set trust_remote_code=True)"
                if "trust_remote_code" in str(err)
                else ""
            )
            raise CheckpointError(f"cannot load model {c.model!r}: {err}{hint}") from err
        missing = sorted(info.get("missing_keys") or [])
        mismatched = list(info.get("mismatched_keys") or [])
        if missing or mismatched:
            raise CheckpointError(
                f"model {c.model!r}: {len(missing)} weight(s) missing from the checkpoint and "
                f"{len(mismatched)} with mismatched shapes would be randomly initialised "
                f"(e.g. {(missing or [str(m) for m in mismatched])[:3]}); the checkpoint may nest the "
                "encoder under another prefix or be for another architecture"
            )
        if not hasattr(model.config, "num_hidden_layers") or not hasattr(model.config, "hidden_size"):
            raise CheckpointError(f"model {c.model!r} is not a transformer encoder (no num_hidden_layers/hidden_size)")
        model.eval().requires_grad_(False).to(self.device)
        do_norm = False
        ident: dict[str, Any] = {"model": c.model}
        if is_local:
            pre = path / "preprocessor_config.json"
            if pre.is_file():
                try:
                    do_norm = bool(json.loads(pre.read_text()).get("do_normalize", False))
                except json.JSONDecodeError as err:
                    raise CheckpointError(f"{pre} is not valid JSON: {err}") from err
            # identify the weights cheaply: file names, sizes and the config, not the path
            ident = {
                "files": sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file()),
                "config": (path / "config.json").read_text() if (path / "config.json").is_file() else "",
            }
        return model, _hash(ident), do_norm

    def _pick_autocast(self) -> torch.dtype | None:
        p = self.config.precision
        if self.device.type != "cuda" or p == "fp32":
            return None
        if p == "fp16":
            return torch.float16
        if p == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16

    @property
    def config_hash(self) -> str:
        cfg = {
            k: v
            for k, v in to_dict(self.config).items()
            if k not in ("device", "batch_size", "allow_download", "model")
        }
        return _hash({"encoder": self.name, "config": cfg, "weights": self._source_hash, "code": ENCODER_CODE_VERSION})

    @property
    def id(self) -> str:
        return f"{self.name}:{self.config_hash}"

    def layer_means(self, segments: torch.Tensor) -> torch.Tensor:
        """(b, n) → (b, k, hidden): time-mean of each selected hidden state, float32 on the CPU."""
        x = _check_segments(segments)
        if self._normalize:
            x = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-7)
        x = x.to(self.device)
        with torch.inference_mode():
            if self._autocast is not None:
                with torch.autocast("cuda", dtype=self._autocast):
                    out = self.model(input_values=x, output_hidden_states=True)
            else:
                out = self.model(input_values=x, output_hidden_states=True)
            hs = out.hidden_states
            means = torch.stack([hs[i].float().mean(dim=1) for i in self.config.layers], dim=1)
        return means.to("cpu")

    def embed(self, segments: torch.Tensor) -> torch.Tensor:
        """(b, n) → (b, hidden) float32: fused layer means (see the class docstring)."""
        means = self.layer_means(segments)
        return (torch.einsum("l,bld->bd", self.fusion_weights, means) + self.fusion_bias).contiguous()


# ------------------------------------------------------------------------------- precomputed


@dataclass(frozen=True)
class PrecomputedConfig:
    """``path``: a parquet (or CSV) embeddings table with ``song_id`` and ``embedding``."""

    path: str = ""
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("the precomputed encoder needs path= a parquet table of embeddings")


class PrecomputedEncoder:
    """Embeddings computed elsewhere, read from a table; songs are looked up by id.

    ``embed`` raises: there is no audio model behind it. Use :meth:`lookup`.
    """

    name = "precomputed"
    sample_rate = 0

    def __init__(self, config: PrecomputedConfig) -> None:
        from apex_rank.schemas import embedding_matrix, read_table

        self.config = config
        table = read_table(config.path, "embeddings")
        ids, X = embedding_matrix(table)
        self._index = {sid: i for i, sid in enumerate(ids)}
        self._X = X
        self.dim = int(X.shape[1])
        self._table = table
        self._hash = hashlib.sha256(Path(config.path).read_bytes()).hexdigest()[:12]

    @property
    def config_hash(self) -> str:
        return self._hash

    @property
    def id(self) -> str:
        return f"{self.name}:{self.config_hash}"

    @property
    def table(self) -> Any:
        """The embeddings table as read (polars DataFrame)."""
        return self._table

    def lookup(self, song_ids: list[str]) -> tuple[list[str], np.ndarray, list[str]]:
        """``(found_ids, X (n, dim), missing_ids)`` for the requested ids."""
        found = [s for s in song_ids if s in self._index]
        missing = [s for s in song_ids if s not in self._index]
        X = self._X[[self._index[s] for s in found]] if found else np.zeros((0, self.dim), np.float32)
        return found, np.ascontiguousarray(X), missing

    def embed(self, segments: torch.Tensor) -> torch.Tensor:
        raise ConfigError(
            f"the precomputed encoder ({self.config.path}) holds embeddings by song id and cannot embed "
            "audio; use lookup(song_ids) or another encoder"
        )


# ----------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class EncoderEntry:
    """A registry row: the class, its config class and default options."""

    factory: Callable[[Any], Any]
    config_cls: type
    defaults: Mapping[str, Any] = field(default_factory=dict)
    help: str = ""


ENCODERS: dict[str, EncoderEntry] = {
    "spectral": EncoderEntry(
        SpectralEncoder, SpectralConfig, {}, "log-mel/MFCC/chroma/contrast statistics, no weights"
    ),
    "mert-v1-95m": EncoderEntry(
        MertEncoder, MertConfig, {"model": "m-a-p/MERT-v1-95M", "trust_remote_code": True}, "MERT-v1-95M (12 × 768)"
    ),
    "mert-v1-330m": EncoderEntry(
        MertEncoder,
        MertConfig,
        {"model": "m-a-p/MERT-v1-330M", "trust_remote_code": True, "layers": (2, 5, 8, -1)},
        "MERT-v1-330M (24 × 1024)",
    ),
    "mert": EncoderEntry(MertEncoder, MertConfig, {}, "any transformers audio encoder in a local folder (model=...)"),
    "precomputed": EncoderEntry(PrecomputedEncoder, PrecomputedConfig, {}, "a parquet of embeddings (path=...)"),
}


@dataclass(frozen=True)
class EncoderSpec:
    """A picklable description of an encoder: registry name plus config options.

    Worker processes (or a Ray task) receive this and build the encoder themselves, so no
    model is ever pickled.
    """

    name: str = "spectral"
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, options: Mapping[str, Any] | None = None) -> EncoderSpec:
        """Build a spec; a name that is an existing folder means ``mert`` with ``model=name``."""
        opts = dict(options or {})
        if name not in ENCODERS and Path(name).expanduser().is_dir():
            opts.setdefault("model", name)
            name = "mert"
        return cls(name, tuple(sorted(opts.items())))

    def config(self) -> Any:
        """The frozen config the encoder will be built with (validates the options)."""
        entry = _entry(self.name)
        data = {**dict(entry.defaults), **dict(self.options)}
        return from_dict(entry.config_cls, data)

    def build(self) -> Encoder:
        """Construct (and, for MERT, load) the encoder."""
        encoder: Encoder = _entry(self.name).factory(self.config())
        return encoder


def _entry(name: str) -> EncoderEntry:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown encoder {name!r}; valid names: {', '.join(ENCODERS)} (or a local model folder)"
        ) from None


def get_encoder(name: str = "spectral", options: Mapping[str, Any] | None = None) -> Encoder:
    """Build an encoder by registry name (see :data:`ENCODERS`) with config ``options``.

    Unknown names raise a :class:`ConfigError` listing the valid ones; unknown options raise a
    :class:`ConfigError` listing the valid keys.
    """
    return EncoderSpec.of(name, options).build()
