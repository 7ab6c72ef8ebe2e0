"""Audio front end: the segment rule, streamed resampling, and every kind of bad input.

All audio is real files written with soundfile into tmp_path and decoded by libsndfile.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from apex_rank.errors import AudioError, ConfigError
from apex_rank.features.audio import (
    MAX_RATIO_TERM,
    AudioConfig,
    SegmentStream,
    StreamingResampler,
    audio_info,
    find_audio_files,
    read_audio,
    resample,
    resample_ratio,
    scan_audio_folder,
    segment,
    supported_formats,
    to_mono,
)


def _tone(sr: int, seconds: float, freq: float = 440.0, channels: int = 2) -> np.ndarray:
    t = np.arange(round(sr * seconds)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def _stream_all(path: Path, sr: int, cfg: AudioConfig) -> tuple[torch.Tensor, SegmentStream]:
    st = SegmentStream(path, sample_rate=sr, config=cfg)
    return torch.cat(list(st.batches(3))), st


# ---------------------------------------------------------------------------- segment rule


def test_official_rule_pads_last_segment() -> None:
    sr = 100
    wave = torch.arange(1, 6501, dtype=torch.float32)  # 65 s
    segs = segment(wave, sr, AudioConfig.official())
    assert segs.shape == (3, 3000)
    assert torch.equal(segs[0], wave[:3000]) and torch.equal(segs[1], wave[3000:6000])
    assert torch.equal(segs[2, :500], wave[6000:]) and (segs[2, 500:] == 0).all()


def test_short_last_segment_policy_and_hop() -> None:
    sr = 100
    wave = torch.ones(6200)  # 62 s: a 2 s tail
    assert segment(wave, sr, AudioConfig(min_last_s=5.0)).shape == (2, 3000)
    assert segment(wave, sr, AudioConfig(min_last_s=0.0)).shape == (3, 3000)
    # a short file keeps its only segment, padded, whatever min_last_s says
    assert segment(torch.ones(200), sr, AudioConfig(min_last_s=5.0)).shape == (1, 3000)
    # overlapping windows stop at the first window that reaches the end
    segs = segment(torch.ones(2500), sr, AudioConfig(segment_s=10, hop_s=5, min_last_s=0))
    assert segs.shape == (4, 1000)  # starts 0, 5, 10, 15 s; the 15 s window covers the end
    assert segment(torch.zeros(0), sr, AudioConfig()).shape == (0, 3000)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="segment_s must be > 0"):
        AudioConfig(segment_s=0)
    with pytest.raises(ConfigError, match="on_silence must be"):
        AudioConfig(on_silence="ignore")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(
    ("orig", "new"),
    [(48_000, 16_000), (44_100, 24_000), (8_000, 16_000), (96_000, 24_000), (44_101, 24_000), (22_051, 16_000)],
)
def test_streaming_resampler_equals_whole_signal(orig: int, new: int) -> None:
    x = np.random.default_rng(0).standard_normal(orig * 3 + 77).astype(np.float32) * 0.1
    r = StreamingResampler(orig, new, block_frames=orig // 2)
    pieces = []
    for i in range(0, len(x), 7001):
        pieces += r.push(x[i : i + 7001])
    pieces += r.flush()
    ref = resample(torch.from_numpy(x), orig, new)
    y = torch.cat(pieces)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-6)


COMMON_RATES = (8_000, 11_025, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000, 88_200, 96_000)


@pytest.mark.parametrize("new", [24_000, 16_000])
def test_common_rates_keep_their_exact_ratio(new: int) -> None:
    for orig in COMMON_RATES:
        p, q = resample_ratio(orig, new)
        assert p * new == q * orig and max(p, q) <= MAX_RATIO_TERM, (orig, new, p, q)


@pytest.mark.parametrize(("orig", "new"), [(44_101, 24_000), (22_051, 24_000), (96_001, 24_000), (44_101, 16_000)])
def test_regression_odd_rates_resample_with_a_bounded_kernel(orig: int, new: int) -> None:
    """44,101 Hz → 24 kHz needed a 24,000 × 44,125 sinc kernel (12.5 GB peak); the ratio used
    now has both terms <= 1000, so torchaudio's kernel stays below about a million values."""
    p, q = resample_ratio(orig, new)
    assert max(p, q) <= MAX_RATIO_TERM
    assert abs(p / q - orig / new) / (orig / new) < 1e-4  # the rate is off by < 0.01 %
    x = torch.from_numpy(np.random.default_rng(orig).standard_normal(orig).astype(np.float32))
    y = resample(x, orig, new)
    assert y.shape == (-(-orig * q // p),) and abs(y.shape[0] - new) <= 1  # 1 s in, 1 s out
    assert torch.isfinite(y).all()


def test_ratio_with_no_bounded_neighbour_is_refused(tmp_path: Path) -> None:
    assert resample_ratio(1, 240) == (1, 240)  # large ratios with small terms stay exact
    with pytest.raises(AudioError, match=r"cannot resample 1 Hz to 24000 Hz: no ratio with terms <= 1000"):
        resample_ratio(1, 24_000)
    path = tmp_path / "one_hertz.wav"
    sf.write(path, np.full(8, 0.5, np.float32), 1)
    with pytest.raises(AudioError, match=r"one_hertz\.wav: cannot resample 1 Hz to 24000 Hz"):
        SegmentStream(path, sample_rate=24_000)


@pytest.mark.parametrize("rate", [44_101, 22_051, 96_001])
def test_odd_rate_files_stream_like_the_whole_file(tmp_path: Path, rate: int) -> None:
    path = tmp_path / f"odd{rate}.wav"
    sf.write(path, _tone(rate, 5.0, freq=1000.0), rate, subtype="PCM_16")
    cfg = AudioConfig(segment_s=2.0, min_last_s=0.5, block_s=1.3)
    got, st = _stream_all(path, 16_000, cfg)
    wave, sr = read_audio(path, sample_rate=16_000)
    assert sr == 16_000 and abs(wave.shape[0] - 80_000) <= 1 and np.isfinite(wave).all()
    ref = segment(torch.from_numpy(wave), 16_000, cfg)
    assert got.shape == ref.shape == (3, 32_000)
    assert torch.allclose(got, ref, atol=1e-5)
    assert st.duration_s == pytest.approx(5.0)
    spectrum = torch.fft.rfft(got[0]).abs()
    assert int(spectrum.argmax()) * 16_000 / 32_000 == pytest.approx(1000.0, abs=1.0)  # the tone survives


def test_stream_equals_whole_file_segmentation(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((44_100 * 9 + 11, 2)).astype(np.float32) * 0.1
    path = tmp_path / "a.flac"
    sf.write(path, x, 44_100, subtype="PCM_24")
    cfg = AudioConfig(segment_s=2.0, hop_s=1.5, min_last_s=0.5, block_s=2.7)
    got, st = _stream_all(path, 16_000, cfg)
    wave, _ = read_audio(path)
    ref = segment(resample(torch.from_numpy(wave), 44_100, 16_000), 16_000, cfg)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5)
    assert st.n_segments == ref.shape[0] and st.duration_s == pytest.approx(9 + 11 / 44_100)


# ------------------------------------------------------------------- channels and rates


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_mono_stereo_and_5_1_mix_by_channel_mean(tmp_path: Path, channels: int) -> None:
    x = np.random.default_rng(channels).uniform(-0.5, 0.5, (8_000, channels)).astype(np.float32)
    path = tmp_path / f"c{channels}.wav"
    sf.write(path, x, 16_000, subtype="FLOAT")
    assert audio_info(path).channels == channels
    wave, sr = read_audio(path)
    assert sr == 16_000
    np.testing.assert_allclose(wave, x.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(to_mono(x), x.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("rate", [8_000, 96_000])
def test_low_and_high_rates_resample_to_the_encoder_rate(tmp_path: Path, rate: int) -> None:
    path = tmp_path / f"r{rate}.wav"
    sf.write(path, _tone(rate, 3.0, freq=1000.0), rate)
    segs, st = _stream_all(path, 16_000, AudioConfig(segment_s=3.0, min_last_s=0))
    assert segs.shape == (1, 48_000) and st.duration_s == pytest.approx(3.0)
    spectrum = torch.fft.rfft(segs[0]).abs()
    assert int(spectrum.argmax()) * 16_000 / 48_000 == pytest.approx(1000.0, abs=1.0)  # the tone survives


# ------------------------------------------------------------------------------ bad input


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: file is empty \(0 bytes\)"):
        SegmentStream(path, sample_rate=16_000)


def test_text_file_named_mp3(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp3"
    path.write_text("this is not audio, just a text file\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.mp3: cannot be decoded as audio"):
        SegmentStream(path, sample_rate=16_000)


def test_headerless_raw_pcm(tmp_path: Path) -> None:
    pcm = (_tone(16_000, 1.0, channels=1) * 32767).astype("<i2").tobytes()
    raw = tmp_path / "take.raw"
    raw.write_bytes(pcm)
    with pytest.raises(AudioError, match=r"take\.raw: headerless raw PCM .* convert it to WAV or FLAC"):
        SegmentStream(raw, sample_rate=16_000)
    disguised = tmp_path / "take.wav"  # the same bytes with an audio extension
    disguised.write_bytes(pcm)
    with pytest.raises(AudioError, match=r"take\.wav: cannot be decoded as audio"):
        SegmentStream(disguised, sample_rate=16_000)


def test_zero_duration(tmp_path: Path) -> None:
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros((0, 2), np.float32), 44_100)
    with pytest.raises(AudioError, match=r"zero\.wav: has no audio samples \(zero duration\)"):
        list(SegmentStream(path, sample_rate=16_000).batches(4))


def test_regression_a_one_sample_file_is_too_short_not_a_padded_song(tmp_path: Path) -> None:
    """A 1-sample WAV was zero-padded to a 30 s segment and embedded without a word."""
    path = tmp_path / "one.wav"
    sf.write(path, np.full((1, 2), 0.5, np.float32), 44_100)
    with pytest.raises(AudioError, match=r"one\.wav: too short: 0\.000 s of audio, under the minimum of 1 s"):
        list(SegmentStream(path, sample_rate=16_000).batches(4))
    segs, st = _stream_all(path, 16_000, AudioConfig(min_duration_s=0))
    assert segs.shape == (1, 480_000) and st.duration_s == pytest.approx(1 / 44_100)
    clip = tmp_path / "clip.flac"
    sf.write(clip, _tone(16_000, 0.75), 16_000)
    with pytest.raises(AudioError, match=r"clip\.flac: too short: 0\.750 s of audio"):
        list(SegmentStream(clip, sample_rate=16_000).batches(4))
    assert _stream_all(clip, 16_000, AudioConfig(min_duration_s=0.5))[1].duration_s == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="min_duration_s must be >= 0"):
        AudioConfig(min_duration_s=-1)
    with pytest.raises(ConfigError, match=r"min_duration_s \(1\.0\) must be <= max_duration_s \(0\.5\)"):
        AudioConfig(max_duration_s=0.5)


def test_silence_is_skipped_unless_kept(tmp_path: Path) -> None:
    path = tmp_path / "silent.flac"
    sf.write(path, np.zeros((16_000 * 3, 2), np.float32), 16_000)
    with pytest.raises(AudioError, match=r"silent\.flac: is silent \(peak -inf dBFS"):
        list(SegmentStream(path, sample_rate=16_000).batches(4))
    segs, _ = _stream_all(path, 16_000, AudioConfig(on_silence="keep"))
    assert segs.shape == (1, 480_000) and not segs.any()


def test_nan_samples(tmp_path: Path) -> None:
    x = _tone(16_000, 2.0)
    x[24_000, 1] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, 16_000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: holds 1 NaN/inf sample\(s\).* 1\.500 s"):
        list(SegmentStream(path, sample_rate=16_000).batches(4))


def _damaged(tmp_path: Path, fmt: str, subtype: str, ext: str) -> tuple[Path, Path, Path]:
    good = tmp_path / f"good.{ext}"
    sf.write(good, _tone(48_000, 6.0), 48_000, format=fmt, subtype=subtype)
    data = good.read_bytes()
    truncated = tmp_path / f"truncated.{ext}"
    truncated.write_bytes(data[: len(data) // 2])
    noise = np.random.default_rng(0).integers(0, 256, len(data) // 3, dtype=np.uint8).tobytes()
    corrupt = tmp_path / f"corrupt.{ext}"
    corrupt.write_bytes(data[: len(data) // 3] + noise + data[2 * len(data) // 3 :])
    return good, truncated, corrupt


def test_truncated_and_corrupt_opus(tmp_path: Path) -> None:
    good, truncated, corrupt = _damaged(tmp_path, "OGG", "OPUS", "opus")
    assert _stream_all(good, 16_000, AudioConfig(segment_s=6.0))[1].duration_s == pytest.approx(6.0)
    with pytest.raises(AudioError, match=r"truncated\.opus: truncated Ogg stream"):
        SegmentStream(truncated, sample_rate=16_000)
    with pytest.raises(AudioError, match=r"corrupt\.opus: truncated or corrupt: the header promises 6\.00 s"):
        list(SegmentStream(corrupt, sample_rate=16_000).batches(4))


@pytest.mark.skipif("MP3" not in supported_formats(), reason="the installed libsndfile cannot read MP3")
def test_truncated_and_corrupt_mp3(tmp_path: Path) -> None:
    good, truncated, corrupt = _damaged(tmp_path, "MP3", "MPEG_LAYER_III", "mp3")
    assert _stream_all(good, 16_000, AudioConfig(segment_s=6.0))[1].duration_s == pytest.approx(6.0)
    with pytest.raises(AudioError, match=r"truncated\.mp3: truncated or corrupt: the header promises 6\.00 s"):
        list(SegmentStream(truncated, sample_rate=16_000).batches(4))
    with pytest.raises(AudioError, match=r"corrupt\.mp3: decoding failed"):
        list(SegmentStream(corrupt, sample_rate=16_000).batches(4))


def test_long_file_is_read_in_bounded_chunks(tmp_path: Path) -> None:
    """A 20-minute file: memory held at once stays at a few segments and does not grow with length."""
    rate = 4_000
    peaks = {}
    for minutes in (5, 20):
        path = tmp_path / f"long{minutes}.wav"
        x = (np.random.default_rng(minutes).standard_normal(rate * 60 * minutes) * 3000).astype(np.int16)
        sf.write(path, x, rate, subtype="PCM_16")
        cfg = AudioConfig(segment_s=30.0, block_s=20.0)
        st = SegmentStream(path, sample_rate=rate, config=cfg)
        n_batches = 0
        for batch in st.batches(2):
            assert batch.shape[0] <= 2  # at most one batch of segments is handed out at a time
            n_batches += 1
        assert st.n_segments == 2 * minutes and st.duration_s == pytest.approx(60 * minutes)
        assert st.n_reads == 3 * minutes  # 20 s blocks
        peaks[minutes] = st.peak_buffer_frames
    # two source blocks (one is look-ahead) + output not yet cut: a few segments, whatever the length
    assert peaks[20] == peaks[5]
    assert peaks[20] < 4 * 30 * rate


def test_find_audio_files_skips_hidden_and_other_extensions(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / ".hidden").mkdir()
    for p in ("a/x.wav", "a/y.FLAC", "b.mp3", ".hidden/z.wav", "notes.txt"):
        (tmp_path / p).write_bytes(b"0")
    assert [p.relative_to(tmp_path).as_posix() for p in find_audio_files(tmp_path)] == ["a/x.wav", "a/y.FLAC", "b.mp3"]
    with pytest.raises(AudioError, match="not a folder"):
        find_audio_files(tmp_path / "nope")


def test_regression_folder_scan_lists_every_entry_it_passes_over(tmp_path: Path) -> None:
    """Link loops, FIFOs, a folder named x.mp3 and broken links were ignored without a word."""
    sf.write(tmp_path / "good.wav", _tone(16_000, 1.0), 16_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/loop").symlink_to("..")  # a link loop back to the root
    (tmp_path / "gone.wav").symlink_to("nowhere.wav")  # a broken link
    (tmp_path / "self.flac").symlink_to("self.flac")  # a link to itself
    os.mkfifo(tmp_path / "pipe.wav")
    (tmp_path / "x.mp3").mkdir()  # a folder named like a file: listed, and searched
    sf.write(tmp_path / "x.mp3/inner.wav", _tone(16_000, 1.0), 16_000)
    (tmp_path / "linked.wav").symlink_to("good.wav")  # a link to a file is read
    (tmp_path / "notes.txt").write_text("not audio")  # other extensions: ignored without a word
    scan = scan_audio_folder(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in scan.files] == ["good.wav", "linked.wav", "x.mp3/inner.wav"]
    reasons = {p.relative_to(tmp_path).as_posix(): why for p, why in scan.skipped}
    assert set(reasons) == {"sub/loop", "gone.wav", "self.flac", "pipe.wav", "x.mp3"}
    assert reasons["sub/loop"] == "symbolic link to a folder (..), not followed: links to folders never are"
    assert reasons["gone.wav"] == "symbolic link cannot be followed: No such file or directory"
    assert reasons["self.flac"] == "symbolic link cannot be followed: Too many levels of symbolic links"
    assert reasons["pipe.wav"] == "is a FIFO (named pipe), not an audio file"
    assert reasons["x.mp3"] == "is a folder, not an audio file (searched like any sub-folder)"
    with pytest.raises(AudioError, match=r"pipe\.wav: not a regular file"):
        SegmentStream(tmp_path / "pipe.wav", sample_rate=16_000)  # named directly, it fails without blocking
    with pytest.raises(AudioError, match=r"x\.mp3: is a folder, not an audio file"):
        SegmentStream(tmp_path / "x.mp3", sample_rate=16_000)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder whatever its mode, so chmod 000 blocks nothing")
def test_unreadable_sub_folder_is_listed(tmp_path: Path) -> None:
    sf.write(tmp_path / "good.wav", _tone(16_000, 1.0), 16_000)
    locked = tmp_path / "locked"
    locked.mkdir()
    sf.write(locked / "hidden_from_us.wav", _tone(16_000, 1.0), 16_000)
    locked.chmod(0)
    try:
        scan = scan_audio_folder(tmp_path)
    finally:
        locked.chmod(0o755)
    assert scan.files == [tmp_path / "good.wav"]
    assert scan.skipped == [(locked, "folder cannot be read: Permission denied")]
