"""Top-k ranking metrics with binary relevance, per user, plus list-level catalogue metrics.

Notation, for one user u: the model's ranked list ``L_u = (i_1, ..., i_K)`` (item indices,
``-1`` pads a list shorter than K and is never relevant), the set ``R_u`` of relevant test items
(``|R_u| > 0``; users without relevant items are left out by the caller), ``rel_j = 1`` if
``i_j ∈ R_u`` else 0, and ``hits@k = Σ_{j≤k} rel_j``.

- ``NDCG@k = DCG@k / IDCG@k`` with ``DCG@k = Σ_{j≤k} rel_j / log2(j + 1)`` and
  ``IDCG@k = Σ_{j≤min(k, |R_u|)} 1 / log2(j + 1)`` (Järvelin & Kekäläinen, binary gains).
- ``Recall@k = hits@k / |R_u|``.
- ``Precision@k = hits@k / k`` (k, not the list length, is the denominator).
- ``MAP@k``: ``AP@k = (1 / |R_u|) Σ_{j≤k} rel_j · hits@j / j`` (ranx's definition).
- ``MRR@k = 1 / j*`` with ``j*`` the rank of the first relevant item within the top k, else 0.
- ``HitRate@k = 1[hits@k > 0]``.

Each is averaged over the users of a slice. These definitions match the ``ranx`` package
(checked in the tests to 1e-9) and the Recommenders project's NDCG/Recall for binary relevance.

List-level metrics over all evaluated users' top-k lists ``L_u[:k]``:

- ``coverage@k = |∪_u L_u[:k]| / n_items`` (catalogue coverage).
- ``novelty@k = mean over all listed items i of -log2((c_i + 1) / (n_train_users + 1))`` with
  ``c_i`` the number of training users who interacted with i (self-information; the +1 keeps
  cold items finite).
- ``cold_share@k = (# listed slots holding a cold item) / (# listed slots)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from apex_rank.errors import SchemaError

RANK_METRICS = ("ndcg", "recall", "precision", "map", "mrr", "hitrate")


def hit_matrix(topk: np.ndarray, relevant: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """``(n_users, K)`` bool: whether ``topk[u, j]`` is in ``relevant[u]`` (``-1`` never is).

    Parameters
    ----------
    topk: (n_users, K) int item indices in rank order, ``-1`` padded.
    relevant: n_users arrays of relevant item indices.
    n_items: catalogue size (item indices lie in ``[0, n_items)``).
    """
    topk = np.asarray(topk, dtype=np.int64)
    if topk.ndim != 2 or topk.shape[0] != len(relevant):
        raise SchemaError(f"topk must be (n_users, K) with n_users = {len(relevant)}; got {topk.shape}")
    lens = np.fromiter((len(r) for r in relevant), dtype=np.int64, count=len(relevant))
    users = np.repeat(np.arange(len(relevant), dtype=np.int64), lens)
    items = (np.concatenate([np.asarray(r, dtype=np.int64) for r in relevant]) if len(relevant)
             else np.zeros(0, np.int64))
    keys = np.unique(users * n_items + items)
    q = np.arange(topk.shape[0], dtype=np.int64)[:, None] * n_items + topk
    return np.isin(q, keys) & (topk >= 0)


def ranking_metrics(
    topk: np.ndarray, relevant: Sequence[np.ndarray], ks: Sequence[int], n_items: int
) -> dict[str, np.ndarray]:
    """Per-user metrics (see module doc) for every k in ``ks``.

    Returns
    -------
    dict
        ``{"ndcg@10": (n_users,) float64, ...}`` for each metric in :data:`RANK_METRICS` and k.
        Users with an empty ``relevant`` array are an error: callers must drop them first.
    """
    n_rel = np.fromiter((len(np.unique(r)) for r in relevant), dtype=np.float64, count=len(relevant))
    if (n_rel == 0).any():
        raise SchemaError(f"user row {int(np.flatnonzero(n_rel == 0)[0])} has no relevant item")
    kmax = max(ks)
    if topk.shape[1] < kmax:
        pad = np.full((topk.shape[0], kmax - topk.shape[1]), -1, dtype=np.int64)
        topk = np.concatenate([np.asarray(topk, dtype=np.int64), pad], axis=1)
    hits = hit_matrix(topk[:, :kmax], relevant, n_items).astype(np.float64)
    ranks = np.arange(1, kmax + 1, dtype=np.float64)
    disc = 1.0 / np.log2(ranks + 1.0)
    cum_hits = np.cumsum(hits, axis=1)
    cum_disc = np.cumsum(disc)
    prec_at_j = cum_hits / ranks
    first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1.0, np.inf)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        h = cum_hits[:, k - 1]
        dcg = hits[:, :k] @ disc[:k]
        idcg = cum_disc[np.minimum(k, n_rel).astype(np.int64) - 1]
        out[f"ndcg@{k}"] = dcg / idcg
        out[f"recall@{k}"] = h / n_rel
        out[f"precision@{k}"] = h / k
        out[f"map@{k}"] = (prec_at_j[:, :k] * hits[:, :k]).sum(axis=1) / n_rel
        out[f"mrr@{k}"] = np.where(first <= k, 1.0 / first, 0.0)
        out[f"hitrate@{k}"] = (h > 0).astype(np.float64)
    return out


def coverage(topk: np.ndarray, k: int, n_items: int) -> float:
    """Share of the catalogue appearing in at least one top-k list."""
    items = np.asarray(topk)[:, :k]
    return float(np.unique(items[items >= 0]).size / n_items)


def novelty(topk: np.ndarray, k: int, train_user_counts: np.ndarray, n_train_users: int) -> float:
    """Mean self-information ``-log2((c_i + 1) / (n_train_users + 1))`` of listed items."""
    items = np.asarray(topk)[:, :k]
    items = items[items >= 0]
    if items.size == 0:
        return float("nan")
    p = (np.asarray(train_user_counts, dtype=np.float64)[items] + 1.0) / (n_train_users + 1.0)
    return float(np.mean(-np.log2(p)))


def cold_share(topk: np.ndarray, k: int, is_cold: np.ndarray) -> float:
    """Share of listed (non-padding) top-k slots that hold a cold item."""
    items = np.asarray(topk)[:, :k]
    items = items[items >= 0]
    if items.size == 0:
        return float("nan")
    return float(np.mean(np.asarray(is_cold, dtype=bool)[items]))


def top_k_from_scores(
    scores: np.ndarray, k: int, *, allowed: np.ndarray | None = None, tiebreak: np.ndarray | None = None
) -> np.ndarray:
    """Top-k item indices per row of an (n_users, n_items) score matrix, best first.

    ``-inf`` scores (excluded items) are never returned; rows with fewer than k finite scores are
    padded with ``-1``. Ties break by ``tiebreak`` (n_items,), lower first, then by item index;
    pass a seeded random permutation so equal scores are not ordered by the catalogue's own
    order (in MovieLens, low ids are popular films: index order would leak popularity).
    ``allowed`` (n_items,) bool restricts every row to a subset of items.
    """
    S = np.asarray(scores, dtype=np.float64)
    if allowed is not None:
        S = np.where(np.asarray(allowed, dtype=bool)[None, :], S, -np.inf)
    k = min(k, S.shape[1])
    # stable descending order: argsort of -S with kind="stable"
    if k < S.shape[1]:
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
    else:
        part = np.tile(np.arange(S.shape[1]), (S.shape[0], 1))
    vals = np.take_along_axis(S, part, axis=1)
    # ties at the partition boundary could pick an arbitrary index; resolve exactly
    kth = vals.min(axis=1, keepdims=True)
    out = np.empty((S.shape[0], k), dtype=np.int64)
    tb = np.zeros(S.shape[1], dtype=np.int64) if tiebreak is None else np.asarray(tiebreak)
    for u in range(S.shape[0]):
        row = S[u]
        above = np.flatnonzero(row > kth[u, 0])
        tie = np.flatnonzero(row == kth[u, 0])
        cand = np.concatenate([above, tie])
        order = np.lexsort((cand, tb[cand], -row[cand]))[:k]
        out[u] = cand[order]
    neg = np.take_along_axis(S, out, axis=1) == -np.inf
    out[neg] = -1
    return out
