"""``evaluate``, ``evaluate-apex`` and ``evaluate-preference``: the offline evaluation protocols.

Thin: each command parses its arguments, calls one library function of
``apex_rank.offline_eval`` and prints a short table; bad input ends with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from apex_rank.cli.outputs import check_out_folder
from apex_rank.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the parser."""
    p = sub.add_parser("evaluate", help="offline ranking evaluation (warm/cold slices, baselines, significance)")
    src = p.add_argument_group("data (a named data set, or three parquet tables)")
    src.add_argument("--dataset", help="named data set: movielens-100k")
    src.add_argument("--interactions", help="interactions parquet (user_id, song_id, ts, weight)")
    src.add_argument("--songs", help="songs parquet")
    src.add_argument("--embeddings", help="embeddings parquet")
    p.add_argument("--split", default="random",
                   help="random, temporal, item-cold or new-releases (default random)")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 50], help="cut-offs (default 10 20 50)")
    p.add_argument("--models", nargs="+", help="subset of popularity als bpr content apex_prior hybrid")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seeds", type=int, default=3,
                   help="run with seeds seed, seed+1, ... and report mean ± sd (default 3)")
    p.add_argument("--no-tune", action="store_true", help="skip the ALS/BPR validation grid (first grid point)")
    p.add_argument("--hybrid-config", help="JSON object of RecommenderConfig overrides for the hybrid")
    p.add_argument("--apex-epochs", type=int, help="epochs of the APEX head trained on the training songs")
    p.add_argument("--cache", help="cache folder for content embeddings (default ~/.cache/apex-rank)")
    p.add_argument("--out", required=True, help="output folder for report.json, report.md and plots")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("evaluate-apex",
                       help="APEX regression protocol: per-task MSE/MAE/Pearson/Spearman + scatter plots")
    p.add_argument("--model", required=True, help="predictor folder")
    p.add_argument("--songs", required=True, help="songs parquet with labels (streams/likes and/or aesthetic columns)")
    p.add_argument("--embeddings", required=True, help="embeddings parquet")
    p.add_argument("--out", required=True, help="output folder (apex_report.json, scatter_<task>.png)")
    p.set_defaults(func=cmd_evaluate_apex)

    p = sub.add_parser("evaluate-preference", help="Music Arena preference protocol on battles + predictions")
    p.add_argument("--battles", required=True,
                   help="battles parquet (song_a/song_b or audio_a/audio_b, preference, is_instrumental)")
    p.add_argument("--predictions", required=True, help="predictions parquet (song_id + the APEX task columns)")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seeds", type=int, default=3,
                   help="run with seeds seed, seed+1, ... and report mean ± sd (default 3)")
    p.add_argument("--out", required=True, help="output folder (preference_report.json, preference_report.md)")
    p.set_defaults(func=cmd_evaluate_preference)


def format_ranking(report: dict[str, Any]) -> str:
    """Plain-text table: one row per model and slice with NDCG/Recall/HitRate at the first k."""
    k = report["k"][0]
    rows = [f"{'model':<12}{'slice':<11}{'users':>6}{'NDCG@' + str(k):>10}{'Recall@' + str(k):>11}"
            f"{'HR@' + str(k):>8}{'cold@' + str(k):>9}"]
    for m, res in report["models"].items():
        for s, v in res.items():
            rows.append(f"{m:<12}{s:<11}{round(v['n_users']):>6}{v[f'ndcg@{k}']:>10.4f}{v[f'recall@{k}']:>11.4f}"
                        f"{v[f'hitrate@{k}']:>8.3f}{v[f'cold_share@{k}']:>9.3f}")
    return "\n".join(rows)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from apex_rank.offline_eval.datasets import load_dataset, load_parquet_dataset
    from apex_rank.offline_eval.protocols import RankingEvalConfig, evaluate_ranking_seeds
    from apex_rank.offline_eval.report import write_report

    check_out_folder(args.out)
    t0 = time.perf_counter()
    tables = (args.interactions, args.songs, args.embeddings)
    if args.dataset and any(tables):
        raise ConfigError("give either --dataset or --interactions/--songs/--embeddings, not both")
    if args.dataset:
        data = load_dataset(args.dataset, cache_dir=args.cache)
    elif all(tables):
        data = load_parquet_dataset(*tables)
    else:
        raise ConfigError("evaluate needs --dataset NAME or all of --interactions, --songs and --embeddings")
    load_s = time.perf_counter() - t0
    hybrid = {}
    if args.hybrid_config:
        try:
            hybrid = json.loads(args.hybrid_config)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--hybrid-config is not valid JSON: {err}") from err
        if not isinstance(hybrid, dict):
            raise ConfigError("--hybrid-config must be a JSON object")
    kw: dict = {"split": args.split, "seed": args.seed, "ks": tuple(args.k), "tune": not args.no_tune,
                "hybrid": hybrid}
    if args.models:
        kw["models"] = tuple(args.models)
    if args.apex_epochs:
        kw["apex_epochs"] = args.apex_epochs
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    report = evaluate_ranking_seeds(data, RankingEvalConfig(**kw), [args.seed + i for i in range(args.seeds)],
                                    progress=lambda m: print(m, flush=True))
    report["timings_s"] = {"load": round(load_s, 3), **report["timings_s"],
                           "total": round(time.perf_counter() - t0, 3)}
    paths = write_report(report, args.out)
    print(format_ranking(report))
    print(f"report written to {paths['json']} and {paths['md']} (+ plots) in {report['timings_s']['total']:.1f} s")
    return 0


def cmd_evaluate_apex(args: argparse.Namespace) -> int:
    from apex_rank.offline_eval.protocols import evaluate_apex
    from apex_rank.offline_eval.report import scatter_apex, write_json
    from apex_rank.predictor import ApexPredictor
    from apex_rank.schemas import read_table

    check_out_folder(args.out)
    predictor = ApexPredictor.load(args.model, device="cpu")
    songs = read_table(args.songs, "songs")
    emb = read_table(args.embeddings, "embeddings")
    metrics, Y, P = evaluate_apex(predictor, songs, emb)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scatter_apex(Y, P, list(metrics["tasks"]), out)
    write_json(out / "apex_report.json", metrics)
    print(f"{'task':<15}{'n':>6}{'MSE':>10}{'MAE':>8}{'Pearson':>9}{'Spearman':>9}")
    for t, m in metrics["tasks"].items():
        print(f"{t:<15}{int(m['n']):>6}{m['mse']:>10.3f}{m['mae']:>8.3f}{m['pearson']:>9.3f}{m['spearman']:>9.3f}")
    print(f"report and scatter plots written to {out}")
    return 0


def cmd_evaluate_preference(args: argparse.Namespace) -> int:
    from apex_rank.offline_eval.protocols import evaluate_preference
    from apex_rank.offline_eval.report import preference_markdown, write_json
    from apex_rank.schemas import read_table

    check_out_folder(args.out)
    res = evaluate_preference(read_table(args.battles, "battles"), read_table(args.predictions, "predictions"),
                              n_folds=args.folds, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "preference_report.json", res)
    md = preference_markdown(res)
    (out / "preference_report.md").write_text(md)
    print(md)
    return 0

