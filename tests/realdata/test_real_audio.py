"""Real AI music: the 28 ACE-Step tracks of ``immich-memories-music`` (Opus, 48 kHz stereo).

All decode with the duration their headers give; with the ``spectral`` encoder the cosine
nearest neighbour of a track shares its acoustic/electronic style (from the file name) for at
least 24 of 28 tracks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from apex_rank.features.embed import EmbedConfig, EmbedResult, embed_audio
from apex_rank.schemas import embedding_matrix

pytestmark = pytest.mark.realdata
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def tracks() -> Path:
    music = pytest.importorskip("immich_memories_music", reason="pip install immich-memories-music==0.1.0")
    return Path(music.tracks_dir())


@pytest.fixture(scope="module")
def embedded(tracks: Path) -> EmbedResult:
    return embed_audio(tracks, EmbedConfig(encoder="spectral"))


def test_all_28_tracks_decode_with_the_right_duration(tracks: Path, embedded: EmbedResult) -> None:
    assert embedded.skipped == []
    t = embedded.table
    assert t.height == 28
    for row in t.iter_rows(named=True):
        info = sf.info(row["audio_path"])
        assert (info.samplerate, info.channels) == (48_000, 2)
        assert row["duration_s"] == pytest.approx(info.frames / info.samplerate, abs=1e-6), row["song_id"]
        assert 25.0 < row["duration_s"] < 40.0 and row["n_segments"] == 1
    assert sum(t["duration_s"]) == pytest.approx(14.7 * 60, rel=0.01)  # DATA.md: 14.7 min
    assert t.filter(t["song_id"] == "calm/calm_acoustic_1").height == 1


def test_spectral_nearest_neighbour_shares_the_style(embedded: EmbedResult) -> None:
    ids, X = embedding_matrix(embedded.table)
    style = np.array(["electronic" in s for s in ids])
    assert style.sum() == 13 and (~style).sum() == 15
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sim = Xn @ Xn.T
    np.fill_diagonal(sim, -np.inf)
    nn = sim.argmax(axis=1)
    hits = int((style[nn] == style).sum())
    log.info("spectral nearest-neighbour style agreement: %d/28", hits)
    assert hits >= 24, f"only {hits}/28 nearest neighbours share the acoustic/electronic style"
