"""``apex-rank embed``: audio files (a folder or a manifest table) → an embeddings parquet."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the parser."""
    p = sub.add_parser(
        "embed",
        help="embed audio files (folder or manifest table) into an embeddings parquet",
        description="Decode, resample and segment every song, embed the segments and write one vector per song. "
        "Bad files are skipped and listed; the command fails only if nothing could be embedded (or with --strict).",
    )
    p.add_argument(
        "source",
        metavar="PATH_OR_MANIFEST",
        help="folder of audio files, parquet/CSV with audio_path[, song_id], or a quoted glob ('music/**/*.flac')",
    )
    p.add_argument(
        "--encoder",
        default="spectral",
        help="spectral (default), mert-v1-95m, mert-v1-330m, mert, precomputed, or a model folder",
    )
    p.add_argument("--encoder-model", help="model folder or hub name for the mert encoders")
    p.add_argument("--precomputed", help="embeddings parquet for --encoder precomputed")
    p.add_argument("--layers", help="comma-separated hidden-state indices for mert (default 2,5,8,-1)")
    p.add_argument("--fusion", choices=("official", "mean"), help="layer fusion for mert (default official)")
    p.add_argument("--allow-download", action="store_true", help="let mert fetch the hub model (needs network)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own code (MERT needs it)")
    p.add_argument("--out", required=True, help="output parquet (--engine ray: a folder of parquet parts)")
    add_engine_options(p, batch_size=8)
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: in this process)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: the encoder's own default)")
    p.add_argument("--cache", metavar="DIR", help="content-hash cache folder: re-runs embed only new or changed files")
    p.add_argument("--segment-s", type=float, default=30.0, help="segment length in seconds (default 30)")
    p.add_argument("--hop-s", type=float, default=None, help="hop between segments (default: the segment length)")
    p.add_argument(
        "--min-last-s",
        type=float,
        default=5.0,
        help="drop a last segment shorter than this when others exist (0 = official: always pad)",
    )
    p.add_argument(
        "--min-duration",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="skip and list a file holding less audio than this (default 1; 0 keeps every file)",
    )
    p.add_argument("--keep-segments", action="store_true", help="also store every segment's vector")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any file was skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)


def add_engine_options(p: argparse.ArgumentParser, *, batch_size: int | None) -> None:
    """``--engine`` and the Ray options, shared by ``embed`` and ``predict``."""
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default) or ray: Ray Data actors write a resumable folder of parquet parts "
                   "(needs pip install 'apex-rank[scale]')")
    p.add_argument("--address", help="--engine ray: address of a running Ray cluster ('auto'); default: a local one")
    p.add_argument("--actors", type=int, help="--engine ray: actors (default: one per GPU for a model, else per CPU)")
    if batch_size is not None:
        p.add_argument("--batch-size", type=int, default=batch_size,
                       help=f"--engine ray: rows per actor call and per part file (default {batch_size})")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.device is not None:
        opts["device"] = args.device
    if args.encoder == "precomputed":
        opts = {"path": args.precomputed or ""}
        return opts
    if args.encoder_model:
        opts["model"] = args.encoder_model
    if args.layers:
        from apex_rank.errors import ConfigError

        try:
            opts["layers"] = [int(v) for v in args.layers.split(",")]
        except ValueError:
            raise ConfigError(f"--layers must be comma-separated integers, got {args.layers!r}") from None
    if args.fusion:
        opts["fusion"] = args.fusion
    if args.allow_download:
        opts["allow_download"] = True
    if args.trust_remote_code:
        opts["trust_remote_code"] = True
    return opts


def cmd_embed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from apex_rank.cli.outputs import check_out_file
    from apex_rank.features.audio import AudioConfig
    from apex_rank.features.embed import (
        EmbedConfig,
        EmbedProgress,
        embed_audio,
        iter_failures_summary,
        write_embeddings,
    )

    if args.engine == "local":
        check_out_file(args.out)
    cfg = EmbedConfig(
        encoder=args.encoder,
        encoder_options=_options(args),
        audio=AudioConfig(
            segment_s=args.segment_s, hop_s=args.hop_s, min_last_s=args.min_last_s, min_duration_s=args.min_duration
        ),
        keep_segments=args.keep_segments,
        workers=args.workers,
        cache_dir=args.cache,
    )
    bar: Any = None

    def progress(p: EmbedProgress) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            bar = tqdm(total=p.total, unit="file", file=sys.stderr, dynamic_ncols=True)
        bar.set_postfix_str(
            f"{p.audio_s / 3600:.2f} h audio, {p.speed_x:.0f}x real-time, {p.cached} cached, {p.skipped} skipped",
            refresh=False,
        )
        bar.update(1)

    try:
        if args.engine == "ray":
            from apex_rank.features.ray_engine import embed_on_ray

            run = embed_on_ray(args.source, cfg, args.out, address=args.address, batch_size=args.batch_size,
                               actors=args.actors, progress=progress)
            n_ok, skipped, audio_s = run.n_written + run.n_resumed, run.skipped, run.audio_s
            encoder_id, n_new, n_old, old = run.encoder_id, run.n_written, run.n_resumed, f"already in {args.out}"
            speed_x = run.speed_x
        else:
            result = embed_audio(args.source, cfg, progress=progress)
            n_ok, skipped, audio_s = result.table.height, result.skipped, result.audio_s
            encoder_id, n_new, n_old, old = result.encoder_id, result.n_embedded, result.n_cached, "from cache"
            speed_x = result.speed_x
            if n_ok:
                write_embeddings(result.table, args.out)
    finally:
        if bar is not None:
            bar.close()
    speed = f"new audio at {speed_x:.0f}x real-time" if n_new else "nothing new to embed"
    print(
        f"embedded {n_ok} song(s) with {encoder_id or args.encoder} ({n_new} new, {n_old} {old}), "
        f"{audio_s / 3600:.3f} h of audio, {speed}" + (f" -> {args.out}" if n_ok else "")
    )
    if skipped:
        print(f"skipped {len(skipped)} file(s):", file=sys.stderr)
        for line in iter_failures_summary(skipped):
            print(f"  {line}", file=sys.stderr)
    if n_ok == 0:
        print("apex-rank embed: error: nothing could be embedded", file=sys.stderr)
        return 1
    if args.strict and skipped:
        print("apex-rank embed: error: --strict and some files were skipped", file=sys.stderr)
        return 1
    return 0
