"""The embedding pipeline end to end on real files: folder/manifest in, table out, bad files
skipped, the content-hash cache, resuming an interrupted run, worker processes and the CLI."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import soundfile as sf
import torch

from apex_rank.cli.main import main
from apex_rank.errors import SchemaError
from apex_rank.features import embed as embed_module
from apex_rank.features.audio import AudioConfig
from apex_rank.features.embed import (
    EmbedConfig,
    EmbedProgress,
    FileFailure,
    FileResult,
    SongSource,
    collect_sources,
    embed_audio,
    embed_files,
)
from apex_rank.features.encoders import EncoderSpec
from apex_rank.schemas import check_id_column, embedding_matrix

AUDIO = AudioConfig(segment_s=2.0, min_last_s=0.5)
GOOD = ["calm/soft_a", "calm/soft_b", "energetic/loud_a", "energetic/loud_b", "opus_clip"]


def _clip(seed: int, seconds: float, sr: int, channels: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    x = 0.2 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


@pytest.fixture()
def music(tmp_path: Path) -> Path:
    root = tmp_path / "music"
    (root / "calm").mkdir(parents=True)
    (root / "energetic").mkdir()
    sf.write(root / "calm/soft_a.wav", _clip(1, 4.5, 16_000, 1), 16_000)
    sf.write(root / "calm/soft_b.flac", _clip(2, 3.0, 22_050, 2), 22_050)
    sf.write(root / "energetic/loud_a.wav", _clip(3, 5.0, 16_000, 6), 16_000)
    sf.write(root / "energetic/loud_b.ogg", _clip(4, 2.5, 16_000, 2), 16_000, format="OGG", subtype="VORBIS")
    sf.write(root / "opus_clip.opus", _clip(5, 3.0, 48_000, 2), 48_000, format="OGG", subtype="OPUS")
    (root / "broken.wav").write_bytes(b"")
    (root / "energetic/readme.mp3").write_text("not audio\n" * 30)
    return root


def _cfg(tmp_path: Path, **kw: object) -> EmbedConfig:
    return EmbedConfig(audio=AUDIO, cache_dir=str(tmp_path / "cache"), **kw)  # type: ignore[arg-type]


def test_folder_to_table_with_bad_files_skipped(music: Path, tmp_path: Path) -> None:
    result = embed_audio(music, _cfg(tmp_path, keep_segments=True))
    t = result.table
    assert sorted(t["song_id"].to_list()) == sorted(GOOD)
    assert t.columns == [
        "song_id",
        "embedding",
        "encoder",
        "n_segments",
        "duration_s",
        "audio_path",
        "segmenting",
        "segment_embeddings",
    ]
    assert t["segmenting"].unique().to_list() == [AUDIO.segmenting()]  # the rule online ingest repeats
    ids, X = embedding_matrix(t, expected_width=238)
    assert X.shape == (5, 238)
    row = t.filter(pl.col("song_id") == "calm/soft_a").row(0, named=True)
    assert row["n_segments"] == 3 and row["duration_s"] == pytest.approx(4.5)  # 2 s + 2 s + 0.5 s tail (kept)
    assert row["encoder"].startswith("spectral:")
    segs = np.asarray(row["segment_embeddings"], dtype=np.float32)
    assert segs.shape == (3, 238)
    np.testing.assert_allclose(segs.mean(0), np.asarray(row["embedding"]), rtol=1e-5, atol=1e-5)
    reasons = {Path(f.path).name: f.reason for f in result.skipped}
    assert set(reasons) == {"broken.wav", "readme.mp3"}
    assert "broken.wav: file is empty" in reasons["broken.wav"] and "cannot be decoded" in reasons["readme.mp3"]


def test_cache_second_run_embeds_nothing_and_changed_files_are_redone(music: Path, tmp_path: Path) -> None:
    first = embed_audio(music, _cfg(tmp_path))
    assert first.n_embedded == 5 and first.n_cached == 0
    second = embed_audio(music, _cfg(tmp_path))
    assert second.n_embedded == 0 and second.n_cached == 5
    assert second.table["embedding"].to_list() == first.table["embedding"].to_list()
    # the read block size changes no sample, so it is not part of the key
    reblocked = AudioConfig(segment_s=2.0, min_last_s=0.5, block_s=0.7)
    assert embed_audio(music, EmbedConfig(audio=reblocked, cache_dir=str(tmp_path / "cache"))).n_embedded == 0
    # pickle-free cache: JSON manifest + npz files only, readable with allow_pickle=False
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".npz"}
    for p in files:
        if p.suffix == ".npz":
            np.load(p, allow_pickle=False)["segments"]
    sf.write(music / "calm/soft_a.wav", _clip(9, 4.0, 16_000, 1), 16_000)  # changed content
    sf.write(music / "calm/new.wav", _clip(10, 2.0, 16_000, 1), 16_000)  # a new file
    third = embed_audio(music, _cfg(tmp_path))
    assert third.n_embedded == 2 and third.n_cached == 4
    # another segment length is another cache key
    other = embed_audio(music, EmbedConfig(audio=AudioConfig(segment_s=1.0), cache_dir=str(tmp_path / "cache")))
    assert other.n_embedded == 6


def test_interrupted_run_resumes(music: Path, tmp_path: Path) -> None:
    seen: list[str] = []

    def stop_after_two(p: EmbedProgress) -> None:
        seen.append(p.last.song_id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_audio(music, _cfg(tmp_path), progress=stop_after_two)
    resumed = embed_audio(music, _cfg(tmp_path))
    good_seen = [s for s in seen if s in GOOD]
    assert resumed.n_cached == len(good_seen) and resumed.n_embedded == 5 - len(good_seen)
    assert resumed.table.height == 5


def test_manifest_tables_give_ids(music: Path, tmp_path: Path) -> None:
    manifest = music / "songs.parquet"
    pl.DataFrame(
        {"song_id": ["s1", "s2"], "audio_path": ["calm/soft_a.wav", str(music / "opus_clip.opus")]}
    ).write_parquet(manifest)
    result = embed_audio(manifest, _cfg(tmp_path))
    assert result.table["song_id"].to_list() == ["s1", "s2"]
    csv = music / "list.csv"
    pl.DataFrame({"audio_path": ["energetic/loud_a.wav"]}).write_csv(csv)
    assert [s.song_id for s in collect_sources(csv)] == ["energetic/loud_a"]
    pl.DataFrame({"path": ["x.wav"]}).write_parquet(music / "bad.parquet")
    with pytest.raises(SchemaError, match="required column 'audio_path' is missing"):
        collect_sources(music / "bad.parquet")
    sf.write(music / "calm/soft_a.flac", _clip(1, 1.0, 16_000, 1), 16_000)
    with pytest.raises(SchemaError, match="song_id 'calm/soft_a' is given to two files"):
        collect_sources(music)


def test_regression_ids_from_paths_follow_the_id_rule(music: Path, tmp_path: Path) -> None:
    """embed took ids from file names as they were ('calm/Live at 5 (remix)'), which build and
    the online API refuse: characters outside the rule become '_'; a manifest's own bad song_id
    is refused naming the row; an id too long for the rule is listed, not written."""
    sf.write(music / "calm/Live at 5 (remix).wav", _clip(6, 2.0, 16_000, 1), 16_000)
    long_name = "x" * 130
    sf.write(music / f"{long_name}.wav", _clip(7, 2.0, 16_000, 1), 16_000)
    result = embed_audio(music, _cfg(tmp_path))
    assert "calm/Live_at_5__remix_" in result.table["song_id"].to_list()
    check_id_column(result.table, "song_id", "embeddings")  # build accepts every id embed wrote
    assert any(long_name in f.path and "longer than 128 characters" in f.reason for f in result.skipped)
    pl.DataFrame({"song_id": ["ok", "not ok"], "audio_path": ["calm/soft_a.wav", "calm/soft_b.flac"]}).write_parquet(
        music / "bad_ids.parquet")
    with pytest.raises(SchemaError, match=r"manifest .*bad_ids.parquet table: song_id 'not ok' at row 1"):
        collect_sources(music / "bad_ids.parquet")


def test_pure_batch_function_and_worker_processes_agree(music: Path, tmp_path: Path) -> None:
    sources = [SongSource("a", str(music / "calm/soft_a.wav")), SongSource("bad", str(music / "broken.wav"))]
    out = embed_files(sources, EncoderSpec.of("spectral"), AUDIO)
    assert out[0].vector.shape == (238,) and out[1].reason.endswith("file is empty (0 bytes)")  # type: ignore[union-attr]
    inproc = embed_audio(music, EmbedConfig(audio=AUDIO))
    pooled = embed_audio(music, EmbedConfig(audio=AUDIO, workers=2))
    assert pooled.table["song_id"].to_list() == inproc.table["song_id"].to_list()
    np.testing.assert_allclose(
        embedding_matrix(pooled.table)[1], embedding_matrix(inproc.table)[1], rtol=1e-5, atol=1e-6
    )
    assert len(pooled.skipped) == 2


class _CholeskyEncoder:
    """A tiny real encoder: the diagonal of the Cholesky factor of each segment's covariance of
    8-sample frames. Silence (kept with ``on_silence="keep"``) has a singular covariance and the
    factorisation genuinely fails: torch's LinAlgError is a RuntimeError, numpy's a ValueError."""

    name = "cholesky"
    sample_rate = 16_000
    dim = 8
    batch_size = 4
    config_hash = "test"
    id = "cholesky:test"

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def embed(self, segments: torch.Tensor) -> torch.Tensor:
        frames = segments.reshape(segments.shape[0], -1, 8)
        cov = frames.transpose(1, 2) @ frames / frames.shape[1]  # (b, 8, 8)
        if self.backend == "torch":
            factor = torch.linalg.cholesky(cov)
        else:
            factor = torch.from_numpy(np.linalg.cholesky(cov.numpy()))
        return torch.diagonal(factor, dim1=1, dim2=2).contiguous()


KEEP_SILENCE = AudioConfig(segment_s=2.0, min_last_s=0.5, on_silence="keep")


@pytest.mark.parametrize(("backend", "error"), [("torch", "LinAlgError"), ("numpy", "LinAlgError")])
def test_regression_an_encoder_error_on_one_file_is_listed_and_the_batch_goes_on(
    music: Path, backend: str, error: str
) -> None:
    """Only AudioError and OSError were caught: a RuntimeError (torch) or ValueError (numpy)
    raised while embedding one file stopped the whole run, with no table for the good files."""
    sf.write(music / "calm/silence.wav", np.zeros((16_000 * 3, 2), np.float32), 16_000)
    result = embed_audio(music, EmbedConfig(audio=KEEP_SILENCE), encoder=_CholeskyEncoder(backend))
    assert sorted(result.table["song_id"].to_list()) == sorted(GOOD)
    reasons = {Path(f.path).name: f.reason for f in result.skipped}
    assert set(reasons) == {"broken.wav", "readme.mp3", "silence.wav"}
    assert reasons["silence.wav"].startswith(f"{music / 'calm/silence.wav'}: embedding failed with {error}: ")


def _install_cholesky_encoder(audio: AudioConfig) -> None:
    embed_module._WORKER.update(encoder=_CholeskyEncoder("torch"), audio=audio)


def test_worker_processes_list_an_encoder_error_the_same_way(music: Path) -> None:
    sf.write(music / "calm/silence.wav", np.zeros((16_000 * 3, 2), np.float32), 16_000)
    sources = [SongSource(i, str(music / p)) for i, p in [("a", "calm/soft_a.wav"), ("s", "calm/silence.wav")]]
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(
        1, mp_context=ctx, initializer=_install_cholesky_encoder, initargs=(KEEP_SILENCE,)
    ) as pool:
        good, bad = pool.map(embed_module._worker_embed, sources)
    assert isinstance(good, FileResult) and good.vector.shape == (8,)
    assert isinstance(bad, FileFailure) and bad.song_id == "s"
    assert "silence.wav: embedding failed with LinAlgError" in bad.reason


def test_cli_exit_codes(music: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "emb.parquet"
    args = ["embed", str(music), "--out", str(out), "--segment-s", "2", "--cache", str(tmp_path / "c"), "--no-progress"]
    assert main(args) == 0
    assert pl.read_parquet(out).height == 5
    captured = capsys.readouterr()
    assert "embedded 5 song(s)" in captured.out and "skipped 2 file(s)" in captured.err
    assert "broken.wav: file is empty" in captured.err
    assert main([*args, "--strict"]) == 1
    bad = tmp_path / "only_bad"
    bad.mkdir()
    (bad / "x.wav").write_bytes(b"")
    assert main(["embed", str(bad), "--out", str(tmp_path / "none.parquet"), "--no-progress"]) == 1
    assert "nothing could be embedded" in capsys.readouterr().err
    assert main(["embed", str(music), "--out", str(out), "--encoder", "nope"]) == 2
    assert "unknown encoder 'nope'; valid names" in capsys.readouterr().err


def test_regression_folder_mode_lists_what_it_passes_over(
    music: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A link loop, a FIFO and a folder named x.mp3 were passed over without a word."""
    (music / "calm/loop").symlink_to("..")
    os.mkfifo(music / "pipe.wav")  # with a cache, hashing it would have blocked forever
    (music / "x.mp3").mkdir()
    result = embed_audio(music, _cfg(tmp_path))
    assert sorted(result.table["song_id"].to_list()) == sorted(GOOD)
    reasons = {Path(f.path).name: f.reason for f in result.skipped}
    assert set(reasons) == {"broken.wav", "readme.mp3", "loop", "pipe.wav", "x.mp3"}
    assert (
        reasons["loop"]
        == f"{music / 'calm/loop'}: symbolic link to a folder (..), not followed: links to folders never are"
    )
    assert reasons["pipe.wav"] == f"{music / 'pipe.wav'}: is a FIFO (named pipe), not an audio file"
    assert reasons["x.mp3"].startswith(f"{music / 'x.mp3'}: is a folder, not an audio file")
    args = ["embed", str(music), "--out", str(tmp_path / "e.parquet"), "--cache", str(tmp_path / "c"), "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipped 5 file(s):" in err
    for name in ("calm/loop: symbolic link to a folder", "pipe.wav: is a FIFO", "x.mp3: is a folder"):
        assert f"{music / name}" in err


def test_too_short_files_are_listed_and_the_minimum_is_a_cli_flag(
    music: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sf.write(music / "calm/blip.wav", _clip(7, 0.4, 16_000, 1), 16_000)
    out = tmp_path / "e.parquet"
    args = ["embed", str(music), "--out", str(out), "--segment-s", "2", "--cache", str(tmp_path / "c"), "--no-progress"]
    assert main([*args, "--min-duration", "0"]) == 0  # embedded, and cached
    assert "calm/blip" in pl.read_parquet(out)["song_id"].to_list()
    capsys.readouterr()
    assert main(args) == 0  # the default minimum (1 s) applies to a cache hit as well
    assert "calm/blip" not in pl.read_parquet(out)["song_id"].to_list()
    assert (
        f"{music / 'calm/blip.wav'}: too short: 0.400 s of audio, under the minimum of 1 s" in capsys.readouterr().err
    )
    result = embed_audio(music, EmbedConfig(audio=AudioConfig(segment_s=2.0, min_duration_s=3.0)))
    assert sorted(result.table["song_id"].to_list()) == sorted(set(GOOD) - {"energetic/loud_b"})  # 2.5 s
    assert {Path(f.path).name for f in result.skipped} == {"broken.wav", "readme.mp3", "blip.wav", "loud_b.ogg"}


def test_precomputed_through_the_pipeline(tmp_path: Path) -> None:
    from apex_rank.schemas import embeddings_frame

    path = tmp_path / "pre.parquet"
    embeddings_frame(["a", "b"], np.eye(2, dtype=np.float32), encoder="ext").write_parquet(path)
    res = embed_audio(
        [SongSource("b", "b.wav"), SongSource("zz", "zz.wav")],
        EmbedConfig(encoder="precomputed", encoder_options={"path": str(path)}),
    )
    assert res.table["song_id"].to_list() == ["b"] and res.table["encoder"][0].startswith("precomputed:")
    assert len(res.skipped) == 1 and "song_id 'zz' is not in" in res.skipped[0].reason
