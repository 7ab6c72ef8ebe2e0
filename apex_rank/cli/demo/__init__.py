"""``apex-rank demo``: the whole pipeline on a small embedded world, end to end.

Stages (each prints what it did):

1. a synthetic world of songs, embeddings and plays (said so: no public music interaction data
   exists);
2. real audio → content embeddings (the installed AI-music tracks, or synthetic clips);
3. APEX trained and evaluated on the world's songs;
4. the Recommender built on plays before the world's cut, so songs released after it are cold;
5. online ranking: publish to Redis (or an in-process store), then a play and a newly ingested
   song change the next ranking;
6. offline evaluation (item-cold split, every baseline next to the hybrid), report and plots.

Each stage is a library function that yields the lines printed here.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from apex_rank.synthetic import WorldConfig, make_world


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the whole pipeline on a small embedded (synthetic) world")
    p.add_argument("--out", default="apex-rank-demo", help="folder for the demo's artifacts")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from apex_rank.cli.apex_cmds import format_metrics
    from apex_rank.cli.outputs import check_out_folder
    from apex_rank.features.apex_tables import build_apex_dataset, train_apex
    from apex_rank.ranking.recommender import ApexFitConfig

    out = check_out_folder(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("== 1. world: SYNTHETIC songs, embeddings and interactions (no public music interaction data exists)")
    world = make_world(replace(WorldConfig(), seed=args.seed))
    width = world.embeddings["embedding"].list.len()[0]
    print(f"   {world.songs.height} songs, {world.interactions.height} interactions, "
          f"{world.interactions['user_id'].n_unique()} users, embedding width {width}")

    print("== 2. audio -> content embeddings (spectral encoder: decode, mono, resample, segment, features)")
    from apex_rank.cli.demo.audio import audio_demo

    for line in audio_demo(out, seed=args.seed):
        print(line, flush=True)

    print("== 3. APEX multi-task head trained on the synthetic songs' labels")
    data = build_apex_dataset(world.songs, world.embeddings, seed=args.seed)
    predictor, metrics, _ = train_apex(data, ApexFitConfig().train_config(args.seed, progress=True),
                                       encoder="synthetic")
    predictor.save(out / "apex")
    print(format_metrics(metrics))
    print(f"   predictor saved to {out / 'apex'}")

    print("== 4. recommender: ALS + FAISS content/pseudo-CF + fresh-song priors, LightGBM reranker "
          "(cold songs included)")
    from apex_rank.cli.demo.build import recommender_demo

    for line in recommender_demo(world, predictor, out / "bundle"):
        print(line, flush=True)

    print("== 5. online: publish to Redis (in-process store if none), then a play and a new song change the ranking")
    import os

    from apex_rank.cli.demo.online import online_demo

    redis_url = os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0")
    for line in online_demo(world, out / "bundle", redis_url=redis_url, seed=args.seed):
        print(line, flush=True)

    print("== 6. evaluation: item-cold split, all baselines vs the hybrid (APEX refitted on training songs only)")
    from apex_rank.cli.demo.evaluation import evaluation_stage

    for line in evaluation_stage(world, out, seed=args.seed):
        print(line, flush=True)
    return 0
