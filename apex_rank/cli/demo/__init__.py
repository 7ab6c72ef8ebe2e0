"""``apex-rank demo``: the whole pipeline on a small embedded world, end to end.

Every stage is a module of this package whose generator yields the lines to show and returns
what a later stage needs; :func:`demo_lines` runs them in order under one header each, and
:func:`cmd_demo` is the one place that prints (long steps show a progress bar on stderr).

1. ``world``: a synthetic world of songs, embeddings and plays (said so: no public music
   interaction data exists);
2. ``audio``: real audio → content embeddings (the installed AI-music tracks, or synthetic clips);
3. ``apex``: APEX trained and evaluated on the world's songs;
4. ``build``: the Recommender built on plays before the world's cut, so songs released after it
   are cold;
5. ``online``: publish to Redis (or an in-process store), then a play and a newly ingested song
   change the next ranking, and a new song warms up from its first plays;
6. ``evaluation``: item-cold split, every baseline next to the hybrid, report and plots.

Demo code lives here only: no library package imports this one (tests/unit/test_import_direction.py).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a small embedded (synthetic) world")
    p.add_argument("--out", default="apex-rank-demo", help="folder for the demo's artifacts")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from apex_rank.cli.outputs import check_out_folder

    out = check_out_folder(args.out)
    out.mkdir(parents=True, exist_ok=True)
    redis_url = os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0")
    for line in demo_lines(out, seed=args.seed, redis_url=redis_url):
        print(line, flush=True)
    return 0


def demo_lines(out: Path, *, seed: int = 0, redis_url: str = "redis://127.0.0.1:6379/0") -> Iterator[str]:
    """Every stage in order, each under its ``== n.`` header; artifacts are written under ``out``."""
    # the stages import torch, faiss, LightGBM and redis: only when the demo runs, not for --help
    from apex_rank.cli.demo.apex import apex_stage
    from apex_rank.cli.demo.audio import audio_stage
    from apex_rank.cli.demo.build import build_stage
    from apex_rank.cli.demo.evaluation import evaluation_stage
    from apex_rank.cli.demo.online import online_stage
    from apex_rank.cli.demo.world import world_stage

    yield "== 1. world: SYNTHETIC songs, embeddings and interactions (no public music interaction data exists)"
    world = yield from world_stage(seed)
    yield "== 2. audio -> content embeddings (spectral encoder: decode, mono, resample, segment, features)"
    yield from audio_stage(out, seed=seed)
    yield "== 3. APEX multi-task head trained on the synthetic songs' labels"
    predictor = yield from apex_stage(world, out, seed=seed)
    yield ("== 4. recommender: ALS + FAISS content/pseudo-CF + fresh-song priors, LightGBM reranker "
           "(cold songs included)")
    yield from build_stage(world, predictor, out / "bundle")
    yield "== 5. online: publish to Redis (in-process store if none), then a play and a new song change the ranking"
    yield from online_stage(world, out / "bundle", redis_url=redis_url, seed=seed)
    yield "== 6. evaluation: item-cold split, all baselines vs the hybrid (APEX refitted on training songs only)"
    yield from evaluation_stage(world, out, seed=seed)
