"""CLI commands of the ranking stage: ``build`` (a recommender bundle) and ``recommend``."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the parser."""
    p = sub.add_parser("build", help="build a recommender bundle from songs, embeddings and interactions")
    p.add_argument("--songs", required=True, help="songs table (parquet or csv)")
    p.add_argument("--embeddings", required=True, help="embeddings table (parquet)")
    p.add_argument("--interactions", required=True, help="interactions table (parquet or csv)")
    p.add_argument("--config", default=None, help="TOML file with RecommenderConfig keys (defaults without)")
    p.add_argument("--apex-model", default=None, help="APEX predictor folder (trained on the way without)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.set_defaults(func=cmd_build)

    r = sub.add_parser("recommend", help="print top-k recommendations for a user from a bundle")
    r.add_argument("--bundle", required=True, help="bundle folder written by 'apex-rank build'")
    r.add_argument("--user", required=True, help="user id (unknown users get the popularity-and-quality fallback)")
    r.add_argument("-k", type=int, default=20, help="number of songs")
    r.add_argument("--cold-share", type=float, default=None,
                   help="share of the k slots given to new songs, 0..1 (default: the model decides)")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.set_defaults(func=cmd_recommend)


def cmd_build(args: argparse.Namespace) -> int:
    from apex_rank.cli.outputs import check_out_folder
    from apex_rank.config import load_config
    from apex_rank.predictor import ApexPredictor
    from apex_rank.ranking.recommender import KIND, Recommender, RecommenderConfig
    from apex_rank.schemas import read_table

    check_out_folder(args.out, replace_kind=KIND)
    config = load_config(args.config, RecommenderConfig) if args.config else RecommenderConfig()
    apex = ApexPredictor.load(args.apex_model, device="cpu") if args.apex_model else None
    songs = read_table(args.songs, "songs")
    embeddings = read_table(args.embeddings, "embeddings")
    interactions = read_table(args.interactions, "interactions")
    print(
        f"building: {songs.height} songs, {embeddings.height} embeddings, {interactions.height} interactions"
        + ("" if apex else " (training APEX on the way)")
    )
    rec = Recommender.build(songs, embeddings, interactions, config, apex=apex)
    rec.save(args.out)
    rep = rec.report
    print(
        f"bundle written to {args.out}: {rep.get('n_users')} users, {rep.get('n_warm_songs')} warm + "
        f"{rep.get('n_cold_songs')} cold songs, reranker val NDCG@{config.reranker.eval_at} "
        f"{rep.get('reranker_val_ndcg', float('nan')):.4f}"
    )
    if rep.get("unknown_song_rows"):
        print(
            f"warning: {rep['unknown_song_rows']} interaction rows named songs outside the catalogue and were dropped "
            f"(e.g. {rep['unknown_song_examples'][:3]})"
        )
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    import polars as pl

    from apex_rank.ranking.recommender import load_recommender

    rec = load_recommender(args.bundle, device=args.device)
    out = rec.recommend(args.user, k=args.k, cold_share=args.cold_share)
    if not rec.has_user(args.user):
        print(f"user {args.user!r} is unknown to the bundle: popularity-and-quality fallback")
    with pl.Config(tbl_rows=max(args.k, 10), tbl_cols=-1, tbl_width_chars=200, float_precision=3):
        print(out)
    return 0
