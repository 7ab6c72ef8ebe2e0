"""Writing evaluation reports: ``report.json``, ``report.md`` and PNG plots (matplotlib Agg).

``report.json`` is the dict :func:`~apex_rank.offline_eval.protocols.evaluate_ranking` returns
(schema 1). ``report.md`` has one table per slice with the models side by side, a significance
mark per baseline (``*`` = hybrid differs from it, Holm-corrected randomization p < 0.05, with
the sign of the difference), the published reference numbers where the protocol matches, the
split counts and the stage timings. Plots: ``ndcg_by_model.png`` (NDCG at the first k per model
and slice), ``recall_vs_k.png`` (Recall@k against k per model, slice ``all``) and
``cold_share.png`` (share of cold songs in the top-k per model, item-cold only).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TABLE_METRICS = ("ndcg", "recall", "precision", "map", "mrr", "hitrate")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON atomically (tmp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")
    os.replace(tmp, path)
    return path


def ranking_tables(report: dict[str, Any]) -> str:
    """Markdown tables, one per slice: rows = models, columns = metrics at each k."""
    ks = report["k"]
    models = report["models"]
    sig = report.get("significance", {})
    slices = [s for s in ("all", "warm", "cold", "cold_only") if any(s in v for v in models.values())]
    lines: list[str] = []
    for s in slices:
        cols = [f"{m}@{k}" for k in ks for m in TABLE_METRICS] + [f"coverage@{ks[0]}", f"novelty@{ks[0]}",
                                                                  f"cold_share@{ks[0]}"]
        n_users = next((v[s]["n_users"] for v in models.values() if s in v), 0)
        skipped = report.get("skipped_users", {}).get(s, 0)
        lines += [f"### slice `{s}` ({n_users} users; {skipped} without relevant items left out)", "",
                  "| model | " + " | ".join(cols) + " | sig |", "|---" * (len(cols) + 2) + "|"]
        for m, res in models.items():
            if s not in res:
                continue
            mark = ""
            st = sig.get(s, {}).get(m)
            if st:
                mark = ("*" if st.get("significant") else "") + (
                    "▲" if st["mean_diff"] > 0 else "▼") + f" p={st['p_holm']:.3g}"
            sd = report.get("models_sd", {}).get(m, {}).get(s, {})
            cells = [_fmt(res[s].get(c, float("nan"))) + (f" ± {sd[c]:.4f}" if c in sd else "") for c in cols]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {mark} |")
        lines.append("")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any]) -> str:
    """The whole ``report.md`` text."""
    sp = report["split"]
    out = [f"# Offline evaluation: {report['dataset']}, split `{sp['kind']}` (seed {sp['seed']})", "",
           "Full-catalogue ranking, the user's training history excluded, binary relevance. "
           "`sig`: hybrid vs that model on the first k's NDCG, paired randomization test over users, "
           "Holm-corrected (`*` p<0.05; ▲ hybrid better, ▼ worse).", "",
           "Split: " + ", ".join(f"{k}={v}" for k, v in sp.items() if k not in ("kind", "seed")), "",
           ranking_tables(report)]
    sig = {k: v for k, v in report.get("significance", {}).items() if isinstance(v, dict)}
    if sig:
        out += ["## Significance (hybrid − baseline, " + str(report["significance"].get("metric")) + ")", "",
                "| slice | baseline | n | mean diff | 95% bootstrap CI | d_z | p (t) | p (rand.) | p (Holm) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for s, res in sig.items():
            for m, st in res.items():
                out.append(f"| {s} | {m} | {int(st['n'])} | {st['mean_diff']:+.4f} | "
                           f"[{st['ci95_low']:+.4f}, {st['ci95_high']:+.4f}] | {st['effect_size_dz']:+.3f} | "
                           f"{st['p_t']:.3g} | {st['p_randomization']:.3g} | {st['p_holm']:.3g} |")
        out.append("")
    ref = report.get("reference")
    if ref:
        out += ["## Published reference (same protocol)", "", f"Source: {ref['source']}", ""]
        for metric in ("ndcg@10", "recall@10"):
            if metric in ref:
                ours = report["models"].get("hybrid", {}).get("all", {}).get(metric)
                row = ", ".join(f"{k} {v:.3f}" for k, v in ref[metric].items())
                out.append(f"- {metric}: {row}; ours (hybrid, all): {_fmt(ours) if ours is not None else 'n/a'}")
        out.append("")
    if report.get("tuning"):
        out += ["## Tuning on the validation split", ""]
        for m, trials in report["tuning"].items():
            for t in trials:
                val = {k: v for k, v in t.items() if k != "params"}
                out.append(f"- {m} {json.dumps(t['params'])}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in val.items()))
        out.append("")
    out += ["## Timings (s)", "", ", ".join(f"{k} {v:.2f}" for k, v in report.get("timings_s", {}).items()), ""]
    return "\n".join(out)


def plot_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Write the PNG plots (see module doc); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    ks = report["k"]
    names = list(models)
    slices = [s for s in ("all", "warm", "cold", "cold_only") if any(s in v for v in models.values())]
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + 1.6 * len(slices)), 4))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(slices))
    for j, m in enumerate(names):
        vals = [models[m].get(s, {}).get(f"ndcg@{ks[0]}", np.nan) for s in slices]
        ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=m)
    ax.set_xticks(x, slices)
    ax.set_ylabel(f"NDCG@{ks[0]}")
    ax.set_title(f"{report['dataset']} / {report['split']['kind']}: NDCG@{ks[0]} by model and slice", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "ndcg_by_model.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for m in names:
        ax.plot(ks, [models[m].get("all", {}).get(f"recall@{k}", np.nan) for k in ks], marker="o", label=m)
    ax.set_xlabel("k")
    ax.set_ylabel("Recall@k (slice all)")
    ax.set_title("Recall vs k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "recall_vs_k.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if "cold" in slices:
        fig, ax = plt.subplots(figsize=(5, 4))
        for j, k in enumerate(ks):
            vals = [models[m].get("all", {}).get(f"cold_share@{k}", np.nan) for m in names]
            ax.bar(np.arange(len(names)) + j * 0.8 / len(ks) - 0.4 + 0.4 / len(ks), vals, 0.8 / len(ks), label=f"k={k}")
        base = report.get("split", {}).get("test_cold_share")
        if base is not None:  # the base rate: the share of test rows on cold songs
            ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"test rows: {base:.2f}")
        ax.set_xticks(np.arange(len(names)), names, rotation=30)
        ax.set_ylabel("share of cold songs in top-k")
        ax.set_title("Cold share in top-k (slice all)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "cold_share.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_report(report: dict[str, Any], out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (optionally) the plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out / "report.json", report)}
    md = out / "report.md"
    md.write_text(markdown_report(report))
    paths["md"] = md
    if plots:
        for p in plot_report(report, out):
            paths[p.stem] = p
    return paths


def scatter_apex(labels: np.ndarray, preds: np.ndarray, tasks: list[str], out_dir: str | Path) -> list[Path]:
    """One PNG scatter (label vs prediction) per task: ``scatter_<task>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apex_rank.tasks import APEX_TASKS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in tasks:
        j = APEX_TASKS.index(t)
        m = np.isfinite(labels[:, j])
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(labels[m, j], preds[m, j], s=6, alpha=0.5)
        lo = float(np.nanmin([labels[m, j].min(initial=np.inf), preds[m, j].min(initial=np.inf)]))
        hi = float(np.nanmax([labels[m, j].max(initial=-np.inf), preds[m, j].max(initial=-np.inf)]))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"{t} label")
        ax.set_ylabel(f"{t} prediction")
        ax.set_title(t)
        fig.tight_layout()
        paths.append(out / f"scatter_{t}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def preference_markdown(res: dict[str, Any]) -> str:
    """Markdown tables of the preference protocol (direct rules and CV classifiers)."""
    lines = [f"# Music Arena preference protocol ({res['n_decisive']} decisive battles of {res['n_battles']}, "
             f"{res['n_folds']}-fold stratified CV, seed {res['seed']})", ""]
    for part in ("direct", "classifiers"):
        lines += [f"## {part}", "", "| rule | group | n | accuracy | AUC | F1 |", "|---|---|---|---|---|---|"]
        for name, groups in res[part].items():
            for g, m in groups.items():
                lines.append(f"| {name} | {g} | {int(m['n'])} | {_fmt(m['accuracy'])} | "
                             f"{_fmt(m['auc'])} | {_fmt(m['f1'])} |")
        lines.append("")
    ref = res.get("reference", {})
    if ref:
        lines.append(f"Reference: {ref.get('source')}: LR AUC {ref.get('logistic_regression_auc')}, "
                     f"SVM AUC {ref.get('svm_auc')}, direct rules {ref.get('direct_rule_accuracy')}.")
    return "\n".join(lines) + "\n"
