"""Embedding and APEX scoring on Ray Data (issue 16, part 1), on a local 2-CPU Ray cluster and
real audio files (one empty, one text file named .mp3, one truncated FLAC): the rows equal the
local engine's bit for bit, each song once, the bad files listed as the local engine lists
them, and an interrupted run resumed. One Ray session for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import soundfile as sf
import torch
from polars.testing import assert_frame_equal

from apex_rank.cli.main import main
from apex_rank.errors import ConfigError, SchemaError
from apex_rank.features.audio import AudioConfig
from apex_rank.features.embed import EmbedConfig, EmbedProgress, embed_audio, iter_failures_summary, write_embeddings
from apex_rank.model import ApexHead
from apex_rank.predictor import ApexPredictor
from tests.integration.test_embed_pipeline import _clip

ray = pytest.importorskip("ray", reason="the scale extra is not installed: pip install 'apex-rank[scale]'")
from apex_rank.features.ray_engine import embed_on_ray, predict_on_ray  # noqa: E402

pytestmark = [pytest.mark.scale, pytest.mark.integration]

AUDIO = AudioConfig(segment_s=2.0, min_last_s=0.5)
GOOD = ["calm/soft_a", "calm/soft_b", "energetic/loud_a", "energetic/loud_b", "energetic/loud_c", "opus_clip"]
BAD = {"broken.wav", "readme.mp3", "cut.flac"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def music(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("music")
    (root / "calm").mkdir()
    (root / "energetic").mkdir()
    sf.write(root / "calm/soft_a.wav", _clip(1, 4.5, 16_000, 1), 16_000)
    sf.write(root / "calm/soft_b.flac", _clip(2, 3.0, 22_050, 2), 22_050)
    sf.write(root / "energetic/loud_a.wav", _clip(3, 5.0, 16_000, 2), 16_000)
    sf.write(root / "energetic/loud_b.ogg", _clip(4, 2.5, 16_000, 2), 16_000, format="OGG", subtype="VORBIS")
    sf.write(root / "energetic/loud_c.flac", _clip(6, 3.5, 44_100, 1), 44_100)
    sf.write(root / "opus_clip.opus", _clip(5, 3.0, 48_000, 2), 48_000, format="OGG", subtype="OPUS")
    (root / "broken.wav").write_bytes(b"")
    (root / "energetic/readme.mp3").write_text("not audio\n" * 30)
    sf.write(root / "cut.flac", _clip(7, 3.0, 16_000, 1), 16_000)
    data = (root / "cut.flac").read_bytes()
    (root / "cut.flac").write_bytes(data[: len(data) // 3])  # a download cut off mid-stream
    return root


@pytest.fixture(scope="module")
def local(music: Path) -> tuple[pl.DataFrame, list[str]]:
    result = embed_audio(music, EmbedConfig(audio=AUDIO, keep_segments=True))
    return result.table.sort("song_id"), sorted(iter_failures_summary(result.skipped))


def test_ray_rows_equal_the_local_engine_bit_for_bit_each_song_once(
    cluster: None, music: Path, local: tuple[pl.DataFrame, list[str]], tmp_path: Path
) -> None:
    table, bad = local
    assert sorted(table["song_id"].to_list()) == GOOD and {Path(line.split(":")[0]).name for line in bad} == BAD
    out = tmp_path / "emb"
    run = embed_on_ray(music, EmbedConfig(audio=AUDIO, keep_segments=True), out, batch_size=2)
    got = pl.read_parquet(out)
    assert got.height == got["song_id"].n_unique() == len(GOOD) == run.n_written
    assert len(list(out.glob("*.parquet"))) >= 3  # 9 files in batches of 2: several parts, several actor calls
    assert_frame_equal(got.sort("song_id"), table, check_exact=True)
    assert sorted(iter_failures_summary(run.skipped)) == bad


def test_interrupted_run_resumes_without_repeating_a_song(
    cluster: None, music: Path, local: tuple[pl.DataFrame, list[str]], tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    cfg = EmbedConfig(audio=AUDIO, keep_segments=True)
    seen: list[str] = []

    def stop_after_first_part(p: EmbedProgress) -> None:
        seen.append(p.last.song_id)
        if len(seen) == 2 + 1:  # the two files passed over by the folder scan, then the first embedded batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_on_ray(music, cfg, out, batch_size=2, progress=stop_after_first_part)
    first = pl.read_parquet(out)
    assert 1 <= first.height < len(GOOD)
    resumed = embed_on_ray(music, cfg, out, batch_size=2)
    assert resumed.n_resumed == first.height and resumed.n_written == len(GOOD) - first.height
    got = pl.read_parquet(out)
    assert got.height == got["song_id"].n_unique() == len(GOOD)
    assert_frame_equal(got.sort("song_id"), local[0], check_exact=True)
    again = embed_on_ray(music, cfg, out, batch_size=2)
    assert again.n_written == 0 and again.n_resumed == len(GOOD) and len(again.skipped) == len(BAD)
    assert again.encoder_id == got["encoder"][0]
    with pytest.raises(ConfigError, match="made with other settings"):
        embed_on_ray(music, EmbedConfig(audio=AudioConfig(segment_s=1.0), keep_segments=True), out)


def test_cli_embed_glob_and_predict_on_ray_match_the_local_commands(
    cluster: None, music: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "emb"
    glob = f"{music}/**/*.*"
    assert main(["embed", glob, "--engine", "ray", "--out", str(out), "--segment-s", "2", "--min-last-s", "0.5",
                 "--batch-size", "3", "--no-progress"]) == 0
    ray_err = capsys.readouterr().err
    assert main(["embed", str(music), "--out", str(tmp_path / "local.parquet"), "--segment-s", "2",
                 "--min-last-s", "0.5", "--no-progress"]) == 0
    local_err = capsys.readouterr().err
    listed = sorted(line for line in ray_err.splitlines() if line.startswith("  "))
    assert listed == sorted(line for line in local_err.splitlines() if line.startswith("  ")) and len(listed) == 3
    emb = pl.read_parquet(out)
    assert_frame_equal(emb.sort("song_id"), pl.read_parquet(tmp_path / "local.parquet").sort("song_id"),
                       check_exact=True)

    torch.manual_seed(0)
    model = tmp_path / "apex"
    ApexPredictor(ApexHead(input_dim=238), encoder=emb["encoder"][0], device="cpu").save(model)
    assert main(["predict", "--model", str(model), "--embeddings", str(out), "--out", str(tmp_path / "scores.parquet"),
                 "--device", "cpu"]) == 0  # the local engine reads the folder of parts too
    scores_dir = tmp_path / "scores"
    assert main(["predict", "--model", str(model), "--embeddings", str(out), "--out", str(scores_dir),
                 "--engine", "ray", "--device", "cpu", "--no-progress"]) == 0
    local_scores = pl.read_parquet(tmp_path / "scores.parquet")
    got = pl.read_parquet(scores_dir)
    assert got.height == got["song_id"].n_unique() == len(GOOD)
    assert_frame_equal(got.sort("song_id"), local_scores.sort("song_id"), check_exact=True)
    again = predict_on_ray(model, out, scores_dir, device="cpu")
    assert again.n_written == 0 and again.n_resumed == len(GOOD)
    # blocks of 4 rows across the parts (3 + 3 rows): cut where predict(batch_size=4) cuts the table
    run = predict_on_ray(model, out, tmp_path / "scores4", device="cpu", rows=4)
    want = ApexPredictor.load(model, device="cpu").score_embeddings(pl.read_parquet(out), batch_size=4)
    assert run.n_written == len(GOOD) and len(list((tmp_path / "scores4").glob("*.parquet"))) == 2
    assert_frame_equal(pl.read_parquet(tmp_path / "scores4").sort("song_id"), want.sort("song_id"), check_exact=True)


def test_bad_embeddings_on_ray_are_refused_naming_the_song(cluster: None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tmp_path / "apex"
    ApexPredictor(ApexHead(input_dim=4), encoder="spectral:x", device="cpu").save(model)
    X = np.ones((3, 4), np.float32)
    X[2, 1] = np.nan
    from apex_rank.schemas import embeddings_frame

    write_embeddings(embeddings_frame(["a", "b", "c"], X, encoder="spectral:x"), tmp_path / "e.parquet")
    with pytest.raises(SchemaError, match=r"e.parquet rows 0-2: .*song_id 'c' \(row 2\) holds NaN or inf"):
        predict_on_ray(model, tmp_path / "e.parquet", tmp_path / "scores", device="cpu")


def test_parquet_manifest_on_ray_equals_the_local_engine(cluster: None, music: Path, tmp_path: Path) -> None:
    """A parquet manifest (relative paths from its folder, ids of its own, a missing file and a
    bad one among them) gives the same rows and the same failures on Ray as locally."""
    rows = {"song-a": "calm/soft_a.wav", "song-b": "energetic/loud_b.ogg", "song-c": "opus_clip.opus",
            "song-d": "cut.flac", "song-e": "calm/not_there.wav"}
    manifest = music / "manifest.parquet"
    pl.DataFrame({"song_id": list(rows), "audio_path": list(rows.values())}).write_parquet(manifest)
    try:
        cfg = EmbedConfig(audio=AUDIO, keep_segments=True)
        local = embed_audio(manifest, cfg)
        run = embed_on_ray(manifest, cfg, tmp_path / "emb", batch_size=2)
    finally:
        manifest.unlink()
    got = pl.read_parquet(tmp_path / "emb").sort("song_id")
    assert got["song_id"].to_list() == ["song-a", "song-b", "song-c"] and run.n_written == 3
    assert_frame_equal(got, local.table.sort("song_id"), check_exact=True)
    assert sorted(iter_failures_summary(run.skipped)) == sorted(iter_failures_summary(local.skipped))
    assert {f.song_id for f in run.skipped} == {"song-d", "song-e"}
