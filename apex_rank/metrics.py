"""Per-task regression metrics at song level (APEX protocol 1): MSE, MAE, Pearson r, Spearman ρ.

Rows whose label is NaN (unlabelled) are left out of that task only; ``n`` reports how many
rows each task's numbers rest on. With fewer than 3 labelled rows or a constant column, the
correlations are NaN rather than a misleading number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Metrics per task for (n, T) label and prediction arrays (NaN label = unlabelled).

    Returns ``{task: {"mse", "mae", "pearson", "spearman", "n"}}``.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or y_true.shape[1] != len(tasks):
        raise ValueError(f"shapes {y_true.shape} and {y_pred.shape} do not match {len(tasks)} tasks")
    out: dict[str, dict[str, float]] = {}
    for j, task in enumerate(tasks):
        m = np.isfinite(y_true[:, j])
        t, p = y_true[m, j], y_pred[m, j]
        res: dict[str, float] = {"n": float(m.sum())}
        if m.sum() == 0:
            res.update(mse=float("nan"), mae=float("nan"), pearson=float("nan"), spearman=float("nan"))
        else:
            err = p - t
            res["mse"] = float(np.mean(err**2))
            res["mae"] = float(np.mean(np.abs(err)))
            if m.sum() >= 3 and np.std(t) > 0 and np.std(p) > 0:
                res["pearson"] = float(stats.pearsonr(t, p).statistic)
                res["spearman"] = float(stats.spearmanr(t, p).statistic)
            else:
                res["pearson"] = res["spearman"] = float("nan")
        out[task] = res
    return out


def aggregate_by_song(values: np.ndarray, song_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average segment rows per song (segment mode → song level).

    ``song_index`` (n,) holds each row's song as an integer or string; returns
    ``(unique_songs, (n_songs, T) means)`` with songs in order of first appearance. NaN labels are
    ignored in the mean (a song with no label for a task stays NaN).
    """
    values = np.asarray(values, dtype=np.float64)
    _, first, inverse = np.unique(song_index, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    inv = rank[inverse.reshape(-1)]
    n_songs = order.size
    finite = np.isfinite(values)
    sums = np.zeros((n_songs, values.shape[1]))
    counts = np.zeros((n_songs, values.shape[1]))
    np.add.at(sums, inv, np.where(finite, values, 0.0))
    np.add.at(counts, inv, finite)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    songs = np.asarray(song_index)[first[order]]
    return songs, means
