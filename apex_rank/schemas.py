"""Table contracts (polars) and their validation, shared by every stage.

songs        song_id str; optional platform str, created_at datetime, audio_path str,
             streams/likes int, the five aesthetic columns float 1-5 (null = unlabelled),
             split str ("train"/"val"/"test").
embeddings   song_id str, embedding list[f32] of one fixed width, encoder str, n_segments int;
             optional segmenting str (JSON: how the audio was cut, ``AudioConfig.segmenting``).
interactions user_id str, song_id str, ts datetime or int seconds, weight float (default 1).

Rules every entry point shares (build, evaluate, publish and the online API):

- ids (``user_id``, ``song_id``) match :data:`ID_PATTERN`: 1-128 characters of letters, digits
  and ``_ . : @ / + -`` (what an online key and a URL path can hold unescaped);
- times (``ts``, ``created_at``) fall between 1970 and 2200: integers are seconds since the
  epoch, and a value that only fits as milliseconds, microseconds or nanoseconds is named so;
- weights are finite, non-negative and at most :data:`MAX_WEIGHT`.

Unknown columns are ignored. A missing required column or a wrong dtype raises
:class:`~apex_rank.errors.SchemaError` naming the table, the column, the expected and the
found dtype; bad values name the row and the id.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl

from apex_rank.errors import SchemaError
from apex_rank.tasks import AESTHETIC_TASKS, task_spec

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@/+\-]{1,128}$")
ID_RULE = "1-128 characters of letters, digits and _.:@/+-"
MAX_WEIGHT = 1e12
EARLIEST_S = 0  # 1970-01-01
LATEST_S = 7_258_118_400  # 2200-01-01
_SECONDS_PER_YEAR = 31_556_952
_UNITS = (("milliseconds", 1e3), ("microseconds", 1e6), ("nanoseconds", 1e9))

_FAMILIES: dict[str, tuple[str, tuple[type[pl.DataType], ...]]] = {
    "str": ("String", (pl.String,)),
    "int": ("integer", (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)),
    "num": (
        "numeric",
        (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64, pl.Float32, pl.Float64),
    ),
    "time": ("Datetime or integer seconds", (pl.Datetime, pl.Date, pl.Int32, pl.Int64, pl.UInt32, pl.UInt64)),
    "list": ("List or Array of floats", (pl.List, pl.Array)),
}


def read_table(path: str | Path, table: str) -> pl.DataFrame:
    """Read a parquet (or CSV) table, with a :class:`SchemaError` naming the file on failure."""
    p = Path(path)
    if not p.exists():
        raise SchemaError(f"{table} table {p} does not exist")
    try:
        if p.suffix.lower() == ".csv":
            return pl.read_csv(p)
        return pl.read_parquet(p)
    except Exception as err:  # polars raises several types for unreadable files
        raise SchemaError(f"{table} table {p} cannot be read: {err}") from err


def check_column(df: pl.DataFrame, column: str, family: str, table: str, *, required: bool = True) -> bool:
    """Check that ``column`` exists (if required) and has a dtype of ``family``.

    Returns whether the column is present.
    """
    if column not in df.columns:
        if required:
            raise SchemaError(
                f"{table} table: required column {column!r} is missing (found columns: {df.columns})"
            )
        return False
    label, types = _FAMILIES[family]
    dtype = df.schema[column]
    if not any(isinstance(dtype, t) or dtype == t for t in types):
        raise SchemaError(f"{table} table: column {column!r} must be {label}, found {dtype}")
    return True


def _check_ids(df: pl.DataFrame, column: str, table: str, *, unique: bool) -> None:
    nulls = df[column].null_count()
    if nulls:
        row = int(df.with_row_index().filter(pl.col(column).is_null())["index"][0])
        raise SchemaError(f"{table} table: column {column!r} has {nulls} null id(s), first at row {row}")
    if unique:
        dup = df.filter(df[column].is_duplicated())
        if dup.height:
            raise SchemaError(
                f"{table} table: duplicate {column} {dup[column][0]!r} ({dup.height} duplicated rows)"
            )


def check_id_column(df: pl.DataFrame, column: str, table: str) -> None:
    """Raise a :class:`SchemaError` naming the first row whose ``column`` breaks :data:`ID_PATTERN`.

    Nulls are left to :func:`_check_ids`.
    """
    ok = df[column].str.contains(ID_PATTERN.pattern)
    if not ok.fill_null(True).all():
        row = int(ok.fill_null(True).arg_min())  # type: ignore[arg-type]
        n = int((~ok).sum())
        raise SchemaError(
            f"{table} table: {column} {df[column][row]!r} at row {row} is not a valid id ({ID_RULE}; "
            f"{n} row(s) affected)"
        )


def time_unit(value: float, earliest: float = EARLIEST_S, latest: float = LATEST_S) -> str | None:
    """The finer unit ("milliseconds", "microseconds", "nanoseconds") in which ``value`` since the
    epoch falls in ``[earliest, latest)`` seconds, or ``None``: what an out-of-range time "looks
    like" (tables here, and event ``ts`` in :mod:`apex_rank.ranking.online.events`)."""
    return next((u for u, f in _UNITS if earliest <= value / f < latest), None)


def check_times(df: pl.DataFrame, column: str, table: str) -> None:
    """Raise a :class:`SchemaError` naming the first row of ``column`` outside 1970-2200.

    Integer columns are seconds since the epoch; a value that fits only in milliseconds,
    microseconds or nanoseconds is named as such (a millisecond column once moved a build's
    cutoff by decades without a word).
    """
    s = df[column]
    if isinstance(s.dtype, pl.Datetime):
        secs = s.dt.epoch("s")
    elif s.dtype == pl.Date:
        secs = s.cast(pl.Int64) * 86_400
    else:
        secs = s
    secs = secs.cast(pl.Float64)
    bad = ((secs < EARLIEST_S) | (secs >= LATEST_S)).fill_null(False)
    if not bad.any():
        return
    row = int(bad.arg_max())  # type: ignore[arg-type]
    v = float(secs[row])
    where = f"{table} table: column {column!r} row {row}"
    count = f"({int(bad.sum())} row(s) outside 1970-2200)"
    if isinstance(s.dtype, (pl.Datetime, pl.Date)):
        raise SchemaError(f"{where} is in the year {int(1970 + v // _SECONDS_PER_YEAR)} {count}")
    unit = time_unit(v)
    if unit is None:
        when = "before 1970" if v < EARLIEST_S else "after 2200"
        raise SchemaError(f"{where} holds {s[row]}: {when} as seconds since the epoch {count}")
    raise SchemaError(f"{where} holds {s[row]}, which looks like {unit} since the epoch; give seconds {count}")


def validate_songs(df: pl.DataFrame) -> pl.DataFrame:
    """Validate a songs table (see module doc); returns it unchanged."""
    if df.height == 0:
        raise SchemaError("songs table is empty")
    check_column(df, "song_id", "str", "songs")
    _check_ids(df, "song_id", "songs", unique=True)
    check_id_column(df, "song_id", "songs")
    check_column(df, "platform", "str", "songs", required=False)
    if check_column(df, "created_at", "time", "songs", required=False):
        check_times(df, "created_at", "songs")
    check_column(df, "audio_path", "str", "songs", required=False)
    for col in ("streams", "likes"):
        if check_column(df, col, "num", "songs", required=False):
            bad = df.filter(pl.col(col) < 0)
            if bad.height:
                raise SchemaError(
                    f"songs table: column {col!r} has negative count {bad[col][0]} "
                    f"for song_id {bad['song_id'][0]!r}"
                )
    for col in AESTHETIC_TASKS:
        if check_column(df, col, "num", "songs", required=False):
            spec = task_spec(col)
            v = df[col].cast(pl.Float64)
            bad_mask = v.is_nan() | (v < spec.low) | (v > spec.high)
            bad = df.filter(bad_mask.fill_null(False))
            if bad.height:
                raise SchemaError(
                    f"songs table: column {col!r} value {bad[col][0]} for song_id "
                    f"{bad['song_id'][0]!r} is outside [{spec.low}, {spec.high}] or NaN"
                )
    return df


def validate_interactions(df: pl.DataFrame) -> pl.DataFrame:
    """Validate an interactions table; adds ``weight`` = 1.0 when absent. ``ts`` is optional."""
    if df.height == 0:
        raise SchemaError("interactions table is empty")
    check_column(df, "user_id", "str", "interactions")
    check_column(df, "song_id", "str", "interactions")
    _check_ids(df, "user_id", "interactions", unique=False)
    _check_ids(df, "song_id", "interactions", unique=False)
    check_id_column(df, "user_id", "interactions")
    check_id_column(df, "song_id", "interactions")
    if check_column(df, "ts", "time", "interactions", required=False):
        check_times(df, "ts", "interactions")
    if check_column(df, "weight", "num", "interactions", required=False):
        w = df["weight"].cast(pl.Float64)
        bad = (w.is_nan() | (w < 0) | (w > MAX_WEIGHT)).fill_null(True)
        if bad.any():
            row = int(bad.arg_max())  # type: ignore[arg-type]
            raise SchemaError(
                f"interactions table: weight {df['weight'][row]} at row {row} (user_id {df['user_id'][row]!r}, "
                f"song_id {df['song_id'][row]!r}) is not a number in [0, {MAX_WEIGHT:g}] "
                f"({int(bad.sum())} row(s) affected)"
            )
    else:
        df = df.with_columns(pl.lit(1.0).alias("weight"))
    return df


def embedding_matrix(
    df: pl.DataFrame, *, expected_width: int | None = None, table: str = "embeddings"
) -> tuple[list[str], np.ndarray]:
    """Validate an embeddings table and return ``(song_ids, X)`` with X contiguous float32 (n, d).

    Raises a :class:`SchemaError` for an empty table, duplicate ids, ragged or wrong widths and
    NaN/inf values, naming the song id.
    """
    if df.height == 0:
        raise SchemaError(f"{table} table is empty")
    check_column(df, "song_id", "str", table)
    check_column(df, "embedding", "list", table)
    _check_ids(df, "song_id", table, unique=True)
    col = df["embedding"]
    if not col.dtype.inner.is_numeric():  # type: ignore[attr-defined]  # a List or an Array (checked above)
        raise SchemaError(
            f"{table} table: column 'embedding' must hold numbers (one flat list of floats per song), "
            f"found {col.dtype}"
        )
    if isinstance(col.dtype, pl.List):
        lens = col.list.len()
        if lens.null_count():
            row = int(df.with_row_index().filter(pl.col("embedding").is_null())["index"][0])
            raise SchemaError(f"{table} table: song_id {df['song_id'][row]!r} has a null embedding")
        width = int(lens[0])
        bad = df.filter(lens != width)
        if bad.height:
            raise SchemaError(
                f"{table} table: embeddings have different widths: song_id {bad['song_id'][0]!r} has "
                f"{len(bad['embedding'][0])}, song_id {df['song_id'][0]!r} has {width}"
            )
        X = np.asarray(col.explode().cast(pl.Float32).to_numpy(), dtype=np.float32).reshape(df.height, width)
    else:
        width = col.dtype.size if isinstance(col.dtype, pl.Array) else 0
        X = np.asarray(col.cast(pl.Array(pl.Float32, width)).to_numpy(), dtype=np.float32)
    if width == 0:
        raise SchemaError(f"{table} table: embeddings have width 0 (song_id {df['song_id'][0]!r})")
    if expected_width is not None and X.shape[1] != expected_width:
        raise SchemaError(
            f"{table} table: embedding width is {X.shape[1]} but the model expects {expected_width}"
        )
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise SchemaError(
            f"{table} table: embedding of song_id {df['song_id'][row]!r} (row {row}) holds NaN or inf "
            f"({int((~finite).sum())} rows affected)"
        )
    return df["song_id"].to_list(), np.ascontiguousarray(X)


def embeddings_frame(
    song_ids: list[str], X: np.ndarray, *, encoder: str, n_segments: list[int] | np.ndarray | None = None
) -> pl.DataFrame:
    """Build an embeddings table from ids and an (n, d) matrix."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    if len(song_ids) != n:
        raise SchemaError(f"{len(song_ids)} song ids for {n} embedding rows")
    segs = np.ones(n, dtype=np.int64) if n_segments is None else np.asarray(n_segments, dtype=np.int64)
    return pl.DataFrame(
        {
            "song_id": pl.Series(song_ids, dtype=pl.String),
            "embedding": pl.Series(X, dtype=pl.Array(pl.Float32, X.shape[1])).cast(pl.List(pl.Float32)),
            "encoder": pl.Series([encoder] * n, dtype=pl.String),
            "n_segments": pl.Series(segs, dtype=pl.Int64),
        }
    )
