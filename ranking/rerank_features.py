"""The feature frame per (user, candidate): ONE function, used for reranker training and serving.

Columns (``FEATURES``, in this order, float32 with null = missing):

- ``als_score``: u·v (null for cold songs or users without a CF factor)
- ``pseudo_cf_score``: u·V̂ (content→CF pseudo factor; every song)
- ``recent_cf_sim``: the song's CF factor (pseudo factor for cold songs) dotted with the mean CF
  factor of the user's ``RECENT`` latest history songs: where the user's taste is heading, which
  a user factor fitted on the whole history averages away. Null for users without a time of
  their latest play (histories without ``ts``): their history order is the table's row order,
  and the last rows of a randomly ordered table are a random subset. Fed such a subset, the
  reranker learned a correction that did not carry over to the refitted serving side
  (MovieLens random split: NDCG@10 0.4625 with it, 0.4901 without, tuned ALS 0.4906)
- ``content_sim``: cosine of the user's content profile and the song embedding
- the seven APEX priors (``APEX_TASKS``)
- ``log_popularity``: log of the song's interaction count over the mean count of warm songs
  (null for cold songs). Relative, so the reranker reads it the same way on the training side
  (CF data without the label slice) as when serving (refitted on every interaction).
- ``age_days``: days between release and the user's latest interaction (``last_seen_s``; the
  table's reference time when unknown), 0 for songs released since; null if the release is
  unknown. Cold songs too: a song released yesterday and a song nobody played in a year are
  different bets. Measured from the user's own "now" because that is when their next plays
  happen: on the training side the labels are each user's *latest* interactions, which for
  most users end long before the table's reference time, and ages taken there made every
  song look older at serving than in training (a sparse synthetic catalogue, item-cold split:
  warm-target NDCG 0.084 with ages at the table's end, 0.206 with ages at the user's latest
  interaction, ALS 0.122)
- ``is_cold``: 1 for songs without a CF factor
- ``rank_als``, ``rank_content``, ``rank_pseudo_cf``, ``rank_fresh``: source ranks
- ``user_activity``: log1p of the user's interaction count
- ``gap_<prior>``: the song's prior minus the mean prior over the user's history

Every value depends only on its own row's user state and song, so a batch equals the
concatenation of single-user frames exactly.

Example
-------
>>> # frame = build_feature_frame([state], candidates, song_table)
>>> # frame.columns[:3] == ['user_id', 'song_id', 'source']
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from apex_rank.errors import SchemaError
from apex_rank.ranking.candidates import RANK_COLUMNS
from apex_rank.ranking.state import SongTable, UserState, history_positions
from apex_rank.tasks import APEX_TASKS

RECENT = 10  # latest history songs behind ``recent_cf_sim``
GAP_COLUMNS = tuple(f"gap_{t}" for t in APEX_TASKS)
FEATURES: tuple[str, ...] = (
    "als_score",
    "pseudo_cf_score",
    "recent_cf_sim",
    "content_sim",
    *APEX_TASKS,
    "log_popularity",
    "age_days",
    "is_cold",
    *RANK_COLUMNS,
    "user_activity",
    *GAP_COLUMNS,
)


def _rowdot(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Row-wise dot products, summed in a fixed order per row (batch-size independent)."""
    return np.einsum("ij,ij->i", A, B, optimize=False).astype(np.float32)


GATHER_BYTES = 1 << 18  # bytes of each operand gathered at a time (1024 rows at width 64): both
# stay in cache (measured: blocks of 1 MB per operand made the products 3.5x slower at width 64,
# 256 kB was the fastest of 128 kB to 1 MB at widths 32 to 512)


def _gathered_rowdot(A: np.ndarray, rows_a: np.ndarray, B: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """``_rowdot(A[rows_a], B[rows_b])`` in blocks of rows: the same products, without gathering
    two (n, width) matrices through main memory first."""
    out = np.empty(len(rows_a), dtype=np.float32)
    step = max(64, GATHER_BYTES // (B.itemsize * max(1, B.shape[1])))
    for lo in range(0, len(rows_a), step):
        hi = lo + step
        out[lo:hi] = _rowdot(A[rows_a[lo:hi]], B[rows_b[lo:hi]])
    return out


def _stack_present(vectors: Sequence[np.ndarray | None], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(which vectors are present (n,) bool, the vectors as (n, width) float32, zeros where absent)."""
    present = np.asarray([v is not None for v in vectors], dtype=bool)
    out = np.zeros((len(vectors), width), dtype=np.float32)
    for i, v in enumerate(vectors):
        if v is not None:
            out[i] = v
    return present, out


def _history_means(
    values: np.ndarray, history: tuple[np.ndarray, np.ndarray], keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the mean of ``values`` over its history entries where ``keep``: ``(means (b, w)
    float32, has (b,) bool)``. The same arithmetic as ``values[entries].mean(axis=0)`` per user
    (float32 sums in history order, divided in float64, rounded to float32), for all users at
    once."""
    indptr, idx = history
    b = len(indptr) - 1
    rows = np.repeat(np.arange(b, dtype=np.int64), np.diff(indptr))[keep]
    sums = np.zeros((b, values.shape[1]), dtype=np.float32)
    np.add.at(sums, rows, values[idx[keep]])
    counts = np.bincount(rows, minlength=b)
    has = counts > 0
    means = np.zeros_like(sums)
    means[has] = (sums[has].astype(np.float64) / counts[has, None]).astype(np.float32)
    return means, has


def feature_array(
    states: Sequence[UserState],
    users: np.ndarray,
    songs: np.ndarray,
    ranks: np.ndarray,
    song_table: SongTable,
    *,
    history: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The feature logic: a float32 (n, len(FEATURES)) matrix in ``FEATURES`` order, NaN = missing.

    The one implementation behind :func:`build_feature_frame` (training and batch serving) and
    the small-batch serving path, which feeds the matrix to the reranker without a frame.

    Parameters
    ----------
    states:
        The users.
    users:
        (n,) int64 position in ``states`` of each row's user.
    songs:
        (n,) int64 dense ``song_table`` index of each row's song.
    ranks:
        (n, len(RANK_COLUMNS)) source ranks, NaN where the source did not return the song.
    song_table:
        The song side.
    history:
        :func:`~apex_rank.ranking.state.history_positions` of ``states`` when the caller has it
        (looked up here otherwise).
    """
    u = np.asarray(users, dtype=np.int64)
    s = np.asarray(songs, dtype=np.int64)
    n = len(u)
    st = song_table

    has_cf, U = _stack_present([x.cf_factor for x in states], st.cf_factors.shape[1])
    has_prof, P = _stack_present([x.profile for x in states], st.embeddings.shape[1])
    # per user, from one lookup of all histories: mean priors over the known history songs, and
    # the mean CF factor of the warm songs among its RECENT latest entries
    hist = history if history is not None else history_positions(states, st)
    indptr, idx = hist
    known = idx >= 0
    hist_mean, has_hist = _history_means(st.priors, hist, known)
    hist_mean[~has_hist] = np.nan
    from_end = np.repeat(indptr[1:], np.diff(indptr)) - np.arange(len(idx))  # 1 for a history's latest entry
    recent = known & (from_end <= RECENT)
    recent[recent] = st.warm[idx[recent]]
    R_u, has_recent = _history_means(st.cf_factors, hist, recent)
    # no time order: "recent" would be an arbitrary subset of the history
    has_recent &= np.isfinite(np.asarray([x.last_seen_s for x in states], dtype=np.float64))
    activity = np.log1p(np.asarray([x.activity for x in states], dtype=np.float32))

    # one feature per row of XT, written contiguously, then one transposing copy: the row-major
    # matrix LightGBM reads, without a strided write per column
    XT = np.empty((len(FEATURES), n), dtype=np.float32)
    col = {c: j for j, c in enumerate(FEATURES)}
    warm = st.warm[s]
    ucf = has_cf[u]
    als = XT[col["als_score"]]
    als[:] = np.nan
    m = ucf & warm
    if m.any():
        als[m] = _gathered_rowdot(U, u[m], st.cf_factors, s[m])
    pcf = XT[col["pseudo_cf_score"]]
    pcf[:] = np.nan
    if ucf.any():
        pcf[ucf] = _gathered_rowdot(U, u[ucf], st.pseudo_factors, s[ucf])
    rec = XT[col["recent_cf_sim"]]
    rec[:] = np.nan
    mr = has_recent[u]
    for rows, V in ((mr & warm, st.cf_factors), (mr & ~warm, st.pseudo_factors)):  # a cold song: its pseudo factor
        if rows.any():
            rec[rows] = _gathered_rowdot(R_u, u[rows], V, s[rows])
    csim = XT[col["content_sim"]]
    csim[:] = np.nan
    mp = has_prof[u]
    if mp.any():
        csim[mp] = _gathered_rowdot(P, u[mp], st.embeddings, s[mp])
    pri = st.priors[s]
    XT[[col[t] for t in APEX_TASKS]] = pri.T
    XT[col["log_popularity"]] = np.where(warm, np.log((1.0 + st.popularity[s]) / st.popularity_scale), np.nan)
    seen = np.asarray([x.last_seen_s for x in states], dtype=np.float64)
    ref = np.where(np.isfinite(seen), seen, st.now_s)[u]
    XT[col["age_days"]] = (np.maximum(0.0, ref - st.created_s[s]) / 86400.0).astype(np.float32)
    XT[col["is_cold"]] = (~warm).astype(np.float32)
    XT[[col[c] for c in RANK_COLUMNS]] = np.asarray(ranks, dtype=np.float32).reshape(n, len(RANK_COLUMNS)).T
    XT[col["user_activity"]] = activity[u]
    XT[[col[g] for g in GAP_COLUMNS]] = (pri - hist_mean[u]).astype(np.float32).T
    return np.ascontiguousarray(XT.T)


def build_feature_frame(states: Sequence[UserState], candidates: pl.DataFrame, song_table: SongTable) -> pl.DataFrame:
    """Features for every candidate row (a frame around :func:`feature_array`).

    Parameters
    ----------
    states:
        The users the candidates were generated for; ``candidates.user_id`` must be among them.
    candidates:
        Output of :func:`~apex_rank.ranking.candidates.generate_candidates` (``user_id``,
        ``song_id``, ``source``, rank columns); extra columns (e.g. a label) are kept.
    song_table:
        The song side.

    Returns
    -------
    The candidates frame (same row order) with the ``FEATURES`` columns appended.
    """
    for col in ("user_id", "song_id", *RANK_COLUMNS):
        if col not in candidates.columns:
            raise SchemaError(f"candidates frame: required column {col!r} is missing")
    upos = {s.user_id: i for i, s in enumerate(states)}
    users = pl.DataFrame(
        {"user_id": pl.Series(list(upos), dtype=pl.String), "_u": np.asarray(list(upos.values()), dtype=np.int64)}
    )
    j = candidates.join(users, on="user_id", how="left", maintain_order="left").join(
        song_table.index_frame(), on="song_id", how="left", maintain_order="left"
    )
    if j["_u"].null_count():
        raise SchemaError(f"candidates frame: user_id {j.filter(pl.col('_u').is_null())['user_id'][0]!r} has no state")
    if j["_idx"].null_count():
        raise SchemaError(
            f"candidates frame: song_id {j.filter(pl.col('_idx').is_null())['song_id'][0]!r} is not in the catalogue"
        )
    ranks = candidates.select([pl.col(c).cast(pl.Float32) for c in RANK_COLUMNS]).to_numpy()
    X = feature_array(states, j["_u"].to_numpy(), j["_idx"].to_numpy(), np.nan_to_num(ranks, nan=np.nan), song_table)
    feats = pl.DataFrame(
        {
            c: pl.Series(c, X[:, k], dtype=pl.Float32, nan_to_null=True)
            for k, c in enumerate(FEATURES)
            if c not in RANK_COLUMNS
        }
    )
    base = candidates.drop([c for c in FEATURES if c in candidates.columns and c not in RANK_COLUMNS])
    out = pl.concat([base, feats], how="horizontal")
    return out.with_columns([pl.col(c).cast(pl.Float32) for c in RANK_COLUMNS])


def feature_matrix(frame: pl.DataFrame) -> np.ndarray:
    """The ``FEATURES`` columns as a contiguous float32 (n, n_features) array, NaN for null."""
    missing = [c for c in FEATURES if c not in frame.columns]
    if missing:
        raise SchemaError(f"feature frame lacks column(s) {missing}")
    X = frame.select([pl.col(c).cast(pl.Float32) for c in FEATURES]).to_numpy()
    return np.ascontiguousarray(np.nan_to_num(X, nan=np.nan), dtype=np.float32)
