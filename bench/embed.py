"""Benchmark audio embedding throughput in × real time (seconds of audio per second of wall time).

Run: ``.venv/bin/python -m bench.embed [--repeats 3] [--workers 2] [--mert-shaped]``.

Default: the ``spectral`` encoder on the 28 real ``immich-memories-music`` tracks (Opus,
48 kHz stereo, 14.7 min), whole pipeline (decode + mono + resample + segment + features), in
this process; the stages alone are timed in the same run as baselines (decode only; decode +
resample), with CPU seconds next to wall seconds because the machine may be shared (the load
average is printed). ``--workers N`` adds a run through N worker processes (start-up included).

``--mert-shaped`` times a randomly initialised HuBERT with MERT-v1-95M's shape (12 layers ×
768, 75 Hz frames at 24 kHz) through the real MERT encoder path (save → load → verify →
layers [2, 5, 8, -1] → official fusion): on the CPU only ``--mert-segments`` (default 2)
30-s segments; on CUDA a larger batch with bf16/fp16 autocast, and the card is recorded.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import soundfile as sf
import torch

from apex_rank.errors import MissingDependencyError
from apex_rank.features.audio import AudioConfig, SegmentStream, find_audio_files, to_mono
from apex_rank.features.embed import EmbedConfig, embed_audio
from apex_rank.threads import configure_threads
from bench.common import median, print_header


def _tracks() -> Path:
    try:
        import immich_memories_music
    except ImportError as err:
        raise MissingDependencyError(
            "the benchmark needs the real tracks: pip install immich-memories-music==0.1.0"
        ) from err
    return Path(immich_memories_music.tracks_dir())


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def bench_spectral(repeats: int, workers: int) -> None:
    files = find_audio_files(_tracks())
    audio_s = sum(sf.info(str(f)).duration for f in files)
    print(f"spectral on {len(files)} real tracks, {audio_s:.1f} s of audio; load average {os.getloadavg()}")

    def decode_only() -> None:
        for f in files:
            to_mono(sf.read(str(f), dtype="float32", always_2d=True)[0])

    def decode_resample() -> None:
        for f in files:
            for _ in SegmentStream(f, sample_rate=16_000, config=AudioConfig()).batches(8):
                pass

    def pipeline() -> None:
        embed_audio(files[0].parent.parent, EmbedConfig(encoder="spectral"))

    for name, fn in (
        ("decode only (baseline)", decode_only),
        ("decode+resample+segment", decode_resample),
        ("full pipeline (spectral)", pipeline),
    ):
        if fn is decode_only:
            fn()  # warm-up: page cache and decoder libraries, shared by the later stages
        runs = [_timed(fn) for _ in range(repeats)]
        walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
        print(
            f"  {name:26s} median {median(walls):6.2f} s wall -> {audio_s / median(walls):7.1f}x real-time "
            f"(min {audio_s / max(walls):.1f}x, max {audio_s / min(walls):.1f}x); "
            f"{median(cpus):6.2f} s CPU -> {audio_s / median(cpus):7.1f}x real-time per CPU-second"
        )
    if workers > 1:
        w, c = _timed(lambda: embed_audio(files[0].parent.parent, EmbedConfig(encoder="spectral", workers=workers)))
        print(
            f"  full pipeline, {workers} worker processes (start-up included): {w:.2f} s wall -> "
            f"{audio_s / w:.1f}x real-time"
        )
    print(f"  load average after: {os.getloadavg()}")


def bench_mert_shaped(n_segments: int, batch: int) -> None:
    from transformers import HubertConfig, HubertModel

    from apex_rank.features.encoders import MertConfig, MertEncoder

    cfg = HubertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    if not cuda:
        batch = 1
    with tempfile.TemporaryDirectory() as tmp:
        HubertModel(cfg).save_pretrained(tmp)
        enc = MertEncoder(MertConfig(model=tmp, device="auto", batch_size=batch))
        n_params = sum(p.numel() for p in enc.model.parameters())
        card = torch.cuda.get_device_name(0) if cuda else "cpu"
        print(
            f"MERT-95M-shaped random HuBERT ({n_params / 1e6:.1f} M parameters) on {card}, "
            f"autocast {enc._autocast}, batch {batch}, 30-s segments at 24 kHz"
        )
        x = torch.randn(batch, 30 * 24_000) * 0.1
        enc.embed(x)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        times = []
        done = 0
        while done < n_segments:
            t0 = time.perf_counter()
            out = enc.embed(x)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            done += batch
        per_seg = median(times) / batch
        print(
            f"  {done} segments: median {per_seg:.3f} s per segment -> {30 / per_seg:.1f}x real-time "
            f"(output {tuple(out.shape)}, finite {bool(torch.isfinite(out).all())})"
        )
        if cuda:
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="also time N worker processes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mert-shaped", action="store_true", help="time the MERT-95M-shaped path instead")
    ap.add_argument("--mert-segments", type=int, default=None, help="segments to time (default: 2 on CPU, 64 on CUDA)")
    ap.add_argument("--mert-batch", type=int, default=16, help="segments per batch on CUDA")
    args = ap.parse_args()
    configure_threads(args.threads)
    if args.mert_shaped:
        print_header("MERT-95M-shaped encoder throughput")
        n = args.mert_segments or (64 if torch.cuda.is_available() else 2)
        bench_mert_shaped(n, args.mert_batch)
    else:
        print_header("spectral embedding throughput on real AI music")
        bench_spectral(args.repeats, args.workers)


if __name__ == "__main__":
    main()
