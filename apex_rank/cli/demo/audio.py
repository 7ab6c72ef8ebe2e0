"""The audio stage of ``apex-rank demo``: embed real AI-generated tracks (or synthetic clips)
with the spectral encoder and show each song's nearest neighbour."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from apex_rank.features.audio import AudioConfig
from apex_rank.features.embed import EmbedConfig, embed_audio, write_embeddings


def _synthetic_clips(folder: Path, seed: int) -> Path:
    """Write 8 SYNTHETIC 8-s clips: 4 'acoustic' (decaying harmonic plucks), 4 'electronic'
    (saw bass with a noise hi-hat on a grid)."""
    rng = np.random.default_rng(seed)
    sr = 22_050
    t = np.arange(8 * sr) / sr
    for kind in ("acoustic", "electronic"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            base = 110.0 * 2 ** (rng.integers(0, 12) / 12)
            if kind == "acoustic":
                x = np.zeros_like(t)
                for onset in np.arange(0, 8, 0.5):
                    f = base * rng.choice([1, 1.25, 1.5, 2])
                    env = np.where(t >= onset, np.exp(-(t - onset) * 4), 0.0)
                    x += env * sum(np.sin(2 * np.pi * f * h * t) / h**1.5 for h in range(1, 6))
            else:
                x = 0.5 * (2 * ((base * t) % 1.0) - 1)
                hat = (np.modf(t * 4)[0] < 0.03) * rng.standard_normal(t.size)
                x = x + 0.6 * hat
            x = 0.3 * x / np.abs(x).max()
            sf.write(folder / kind / f"{kind}_{i}.wav", x.astype(np.float32), sr)
    return folder


def audio_stage(out: str | Path, *, seed: int = 0, max_duration_s: float = 15.0) -> Iterator[str]:
    """Embed real tracks (or synthetic clips) and show neighbours.

    Yields the lines to show. Uses the installed ``immich-memories-music`` tracks when present
    (first ``max_duration_s`` seconds of each, to keep the stage short), else 8 synthetic clips,
    and says which. Writes ``out/audio_embeddings.parquet``; a cache in ``out/embed-cache``
    makes a second demo run instant.
    """
    out = Path(out)
    try:
        import immich_memories_music

        folder = Path(immich_memories_music.tracks_dir())
        yield f"   REAL AI music: immich-memories-music tracks (ACE-Step 1.5), first {max_duration_s:.0f} s of each"
    except ImportError:
        folder = _synthetic_clips(out / "synthetic_audio", seed)
        yield "   SYNTHETIC audio clips (immich-memories-music is not installed: pip install immich-memories-music)"
    cfg = EmbedConfig(
        encoder="spectral", audio=AudioConfig(max_duration_s=max_duration_s), cache_dir=str(out / "embed-cache")
    )
    result = embed_audio(folder, cfg)
    write_embeddings(result.table, out / "audio_embeddings.parquet")
    t = result.table
    speed = f"{result.n_embedded} new at {result.speed_x:.0f}x real-time" if result.n_embedded else "none new"
    yield (
        f"   {t.height} files, {result.audio_s:.0f} s of audio embedded with {result.encoder_id} "
        f"({speed}, {result.n_cached} from cache, {len(result.skipped)} skipped) -> {out / 'audio_embeddings.parquet'}"
    )
    from apex_rank.schemas import embedding_matrix

    ids, X = embedding_matrix(t)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sim = Xn @ Xn.T
    np.fill_diagonal(sim, -np.inf)
    nn = sim.argmax(axis=1)
    style = np.array(["electronic" in s for s in ids])
    yield (
        f"   nearest neighbour (cosine) shares the acoustic/electronic style for "
        f"{int((style[nn] == style).sum())}/{len(ids)} songs; examples:"
    )
    for i in np.linspace(0, len(ids) - 1, 3).astype(int):
        yield f"     {ids[i]:32s} -> {ids[nn[i]]:32s} (cos {sim[i, nn[i]]:.3f})"
