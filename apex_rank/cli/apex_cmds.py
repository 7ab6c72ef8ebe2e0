"""``train-apex``, ``predict`` and ``import-official``: the APEX model on tables."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from apex_rank.cli.embed_cmds import add_engine_options
from apex_rank.cli.outputs import check_out_file, check_out_folder
from apex_rank.config import load_config
from apex_rank.manifest import write_json_atomic
from apex_rank.predictor import ApexPredictor
from apex_rank.schemas import read_table
from apex_rank.training import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-apex", help="train the APEX head on songs + embeddings tables")
    p.add_argument("--songs", required=True, help="songs parquet (labels; optional 'split' column)")
    p.add_argument("--embeddings", required=True, help="embeddings parquet")
    p.add_argument("--out", required=True, help="output folder for the predictor")
    p.add_argument("--config", help="TOML file with a [train] table (TrainConfig fields)")
    p.add_argument("--epochs", type=int, help="override the number of epochs")
    p.add_argument("--lr", type=float, help="override the learning rate")
    p.add_argument("--gamma", type=float, default=1.0, help="power of the popularity percentile transform")
    p.add_argument("--seed", type=int, default=42, help="seed for the split (when no 'split' column) and training")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict the 7 APEX scores for an embeddings table")
    p.add_argument("--model", required=True, help="predictor folder")
    p.add_argument("--embeddings", required=True, help="embeddings parquet (or folder of parts, --engine ray)")
    p.add_argument("--out", required=True, help="output parquet: song_id + 7 task columns (--engine ray: a folder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--engine ray)")
    add_engine_options(p, batch_size=None)  # a Ray actor call scores a parquet row group
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("import-official", help="convert the authors' best_model.pt into a predictor folder")
    p.add_argument("--checkpoint", required=True, help="official best_model.pt")
    p.add_argument("--out", required=True, help="output predictor folder")
    p.set_defaults(func=cmd_import)


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from apex_rank.features.apex_tables import build_apex_dataset, embedding_recipe, train_apex

    check_out_folder(args.out)
    cfg = load_config(args.config, TrainConfig, section="train") if args.config else TrainConfig()
    overrides = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
    cfg = replace(cfg, seed=args.seed, device=args.device, **overrides)
    songs = read_table(args.songs, "songs")
    emb = read_table(args.embeddings, "embeddings")
    data = build_apex_dataset(songs, emb, gamma=args.gamma, seed=args.seed)
    encoder, segmenting = embedding_recipe(emb, str(args.embeddings))
    predictor, metrics, _ = train_apex(data, cfg, encoder=encoder, segmenting=segmenting)
    out = Path(args.out)
    predictor.save(out)
    write_json_atomic(out / "metrics.json", metrics)
    print(format_metrics(metrics))
    print(f"predictor saved to {out} (metrics in {out / 'metrics.json'})")
    return 0


def format_metrics(metrics: dict[str, Any]) -> str:
    """A plain text table of per-task test (or val) metrics."""
    part = "test" if "test" in metrics else "val"
    rows = [f"{part} metrics (song level)", f"{'task':<15}{'n':>6}{'MSE':>10}{'MAE':>8}{'Pearson':>9}{'Spearman':>9}"]
    for task, m in metrics[part].items():
        rows.append(f"{task:<15}{int(m['n']):>6}{m['mse']:>10.3f}{m['mae']:>8.3f}{m['pearson']:>9.3f}{m['spearman']:>9.3f}")
    return "\n".join(rows)


def cmd_predict(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        return _predict_ray(args)
    check_out_file(args.out)
    predictor = ApexPredictor.load(args.model, device=args.device)
    scores = predictor.score_embeddings(read_table(args.embeddings, "embeddings"), source=args.embeddings)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scores.write_parquet(out)
    print(f"predictions for {scores.height} songs written to {out}")
    return 0


def _predict_ray(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from apex_rank.features.ray_engine import predict_on_ray

    bar = None if args.no_progress else tqdm(unit="song", file=sys.stderr, dynamic_ncols=True)

    def progress(n_done: int) -> None:
        if bar is not None:
            bar.update(n_done - bar.n)

    try:
        run = predict_on_ray(args.model, args.embeddings, args.out, address=args.address, device=args.device,
                             actors=args.actors, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"predictions for {run.n_written} songs written to {args.out} ({run.n_resumed} already there)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    check_out_folder(args.out)
    predictor = ApexPredictor.from_official_checkpoint(args.checkpoint, device="cpu")
    predictor.save(args.out)
    print(json.dumps({"tasks": list(predictor.tasks), "input_dim": predictor.input_dim,
                      "n_shared": predictor.head.n_shared, "out": str(args.out)}))
    return 0
