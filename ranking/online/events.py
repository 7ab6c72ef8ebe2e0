"""Events and new songs: what changes the online state between publishes.

``record`` appends an interaction to the event stream and, in the same Redis transaction,
updates the user's bounded recent history and content profile under the current version, so
the next ``rank`` reflects it; a user the store has never seen is created. The stream is the
durable log (keep Redis persistence on for it): ``export_events`` writes it to parquet for
retraining.

``ingest`` scores a new song with the APEX predictor, writes its record and embedding under
the current version, makes it rankable in this process and announces it on the catalogue
stream that every other ranker process follows.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from apex_rank.errors import StoreError, UnknownIdError

from .config import OnlineConfig
from .keys import RequestError, check_id, decode_vector, encode_song_record
from .ranker import OnlineRanker
from .store import OnlineStore, UserRecord, VersionMovedError

log = logging.getLogger(__name__)

#: Event kinds and the weight each adds to history and profile (skips are logged only).
EVENT_WEIGHTS: dict[str, float] = {"play": 1.0, "like": 2.0, "skip": 0.0}


@dataclass(frozen=True)
class RecordedEvent:
    """Result of :func:`record`: stream id, whether the user was created, history length."""

    event_id: str
    user_id: str
    created: bool
    history_len: int


def apply_event(old: UserRecord | None, song_id: str, embedding: np.ndarray, weight: float,
                *, history_len: int, alpha: float, ts: float | None = None) -> UserRecord:
    """Pure update of a user state by one event.

    The song joins the end of the history (bounded to ``history_len``, a repeat moves to the
    end); the content profile (L2-normalised, as offline) moves towards the song's normalised
    embedding with step ``max(alpha, 1 / (n + 1))`` (``n`` history length), i.e. a running
    mean for short histories and an exponential recency weighting after, then is
    re-normalised; activity grows by one; ``last_seen_s`` becomes ``ts`` if later.
    Zero-weight events (skips) return the state unchanged (a new user is still created).
    """
    rec = old or UserRecord()
    if weight <= 0:
        return UserRecord(rec.factor, rec.profile, list(rec.history), rec.activity, rec.last_seen_s)
    seen = rec.last_seen_s if ts is None else float(np.fmax(rec.last_seen_s, ts))
    hist = [s for s in rec.history if s != song_id] + [song_id]
    hist = hist[-history_len:]
    e = np.asarray(embedding, dtype=np.float32)
    norm = float(np.linalg.norm(e))
    e = e / norm if norm > 0 else e
    if rec.profile is None or rec.profile.shape != e.shape:
        profile = e.copy()
    else:
        step = max(alpha, 1.0 / (len(rec.history) + 1))
        profile = ((1.0 - step) * rec.profile + step * e).astype(np.float32)
        norm = float(np.linalg.norm(profile))
        profile = profile / norm if norm > 0 else profile
    return UserRecord(rec.factor, profile.astype(np.float32), hist, rec.activity + 1.0, seen)


def _check_ts(ts: float | None) -> float:
    if ts is None:
        return time.time()
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise RequestError(f"ts must be a finite number of unix seconds >= 0, got {ts!r}")
    return float(ts)


def record(store: OnlineStore, user_id: str, song_id: str, kind: str = "play",
           ts: float | None = None, *, config: OnlineConfig | None = None) -> RecordedEvent:
    """Record one interaction (see the module doc).

    Raises
    ------
    RequestError
        Malformed id, unknown ``kind`` or bad ``ts``.
    UnknownIdError
        ``song_id`` is not in the current version's catalogue.
    StoreError
        Nothing is published, or the store failed (the event is then not recorded).
    """
    cfg = config or OnlineConfig()
    check_id(user_id, "user_id")
    check_id(song_id, "song_id")
    if kind not in EVENT_WEIGHTS:
        raise RequestError(f"event kind {kind!r} is not one of {sorted(EVENT_WEIGHTS)}")
    t = _check_ts(ts)
    weight = EVENT_WEIGHTS[kind]
    fields = {"u": user_id, "s": song_id, "k": kind, "t": repr(t), "w": repr(weight)}
    for _ in range(5):  # a publish committing in between moves the event to the new version
        version = store.current_version()
        if version is None:
            raise StoreError(f"nothing is published under {store.keys.current}; cannot record events")
        (rec_raw, emb_raw), = store.read_songs(version, [song_id])
        if rec_raw is None or emb_raw is None:
            raise UnknownIdError(f"song_id {song_id!r} is not in the catalogue of version {version}")
        emb = decode_vector(emb_raw, f"{store.keys.emb(version)}[{song_id}]")
        created = False

        def update(old: UserRecord | None, emb: np.ndarray = emb) -> UserRecord:
            nonlocal created
            created = old is None
            return apply_event(old, song_id, emb, weight, history_len=cfg.history_len,
                               alpha=cfg.profile_alpha, ts=t)

        try:
            eid, new = store.record_event(version, fields, user_id, update, cfg.version_ttl_s,
                                          cfg.events_maxlen)
        except VersionMovedError as err:
            log.info("event of user %s: %s; retrying on the new version", user_id, err)
            continue
        return RecordedEvent(eid, user_id, created, len(new.history))
    raise StoreError(f"event of user {user_id!r} not recorded: the published version kept moving")


def export_events(store: OnlineStore, out: str | Path, *, since: datetime | float | None = None,
                  until: datetime | float | None = None) -> int:
    """Write the events recorded in ``[since, until]`` (stream time) to a parquet file.

    Columns follow the interactions contract: ``user_id``, ``song_id``, ``ts`` (datetime,
    UTC, from the event), ``weight``, plus ``kind`` and ``event_id``. Returns the row count.
    """
    import polars as pl

    def ms(x: datetime | float | None) -> int | None:
        if x is None:
            return None
        if isinstance(x, datetime):
            x = (x if x.tzinfo else x.replace(tzinfo=UTC)).timestamp()
        return int(float(x) * 1000)

    cols: dict[str, list[object]] = {k: [] for k in
                                     ("event_id", "user_id", "song_id", "ts", "weight", "kind")}
    for batch in store.read_events(ms(since) or 0, ms(until)):
        for e in batch:
            cols["event_id"].append(e.event_id)
            cols["user_id"].append(e.user_id)
            cols["song_id"].append(e.song_id)
            cols["ts"].append(datetime.fromtimestamp(e.ts, tz=UTC).replace(tzinfo=None))
            cols["weight"].append(e.weight)
            cols["kind"].append(e.kind)
    df = pl.DataFrame(cols, schema={"event_id": pl.Utf8, "user_id": pl.Utf8, "song_id": pl.Utf8,
                                    "ts": pl.Datetime("us"), "weight": pl.Float64,
                                    "kind": pl.Utf8})
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path)
    log.info("exported %d events to %s", df.height, path)
    return df.height


@dataclass(frozen=True)
class IngestResult:
    """An ingested song: its id, APEX priors (7,), the version it joined, catalogue stream id."""

    song_id: str
    priors: np.ndarray
    version: int
    stream_id: str


def ingest(ranker: OnlineRanker, song_id: str, *, embedding: np.ndarray | None = None,
           audio_path: str | Path | None = None, popularity: float = 0.0) -> IngestResult:
    """Add a new song: APEX priors, store record, this process's index, catalogue announcement.

    Give exactly one of ``embedding`` ((d,) float32, the bundle's encoder) or ``audio_path``
    (embedded with the bundle's encoder when the bundle carries one).

    Raises
    ------
    RequestError
        Malformed id, both or neither input, wrong embedding width, non-finite values, or a
        song id that already exists.
    StoreError
        Nothing is published or the store failed.
    """
    check_id(song_id, "song_id")
    if (embedding is None) == (audio_path is None):
        raise RequestError("give exactly one of embedding or audio_path")
    engine = ranker.engine
    if audio_path is not None:
        embedding = engine_embed_audio(engine, Path(audio_path))
    emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if emb.shape[0] != engine.embedding_dim:
        raise RequestError(f"embedding of song {song_id!r} has width {emb.shape[0]}, the bundle "
                           f"expects {engine.embedding_dim}")
    if not np.all(np.isfinite(emb)):
        raise RequestError(f"embedding of song {song_id!r} holds NaN or inf")
    if ranker.version is None:
        raise StoreError("the ranker serves no published version (store unreachable at start)")
    if engine.has_song(song_id):
        raise RequestError(f"song_id {song_id!r} already exists in version {ranker.version}")
    priors = engine.predict_priors(emb[None, :])[0].astype(np.float32)
    rec = encode_song_record(priors, popularity, 0.0, True)
    ttl = ranker.config.version_ttl_s
    for _ in range(5):
        # The song joins the store's current version (which this process may not serve yet:
        # it switches within follow_interval_s and then loads the version's ingested songs).
        version = ranker.store.current_version()
        if version is None:
            raise StoreError(f"nothing is published under {ranker.store.keys.current}")
        try:
            stream_id = ranker.store.add_song(version, song_id, rec, emb, ttl)
            break
        except VersionMovedError as err:
            log.info("ingest of %s: %s; retrying on the new version", song_id, err)
    else:
        raise StoreError(f"song {song_id!r} not ingested: the published version kept moving")
    engine.add_song(song_id, emb, priors)
    log.info("ingested song %s into version %d (stream id %s)", song_id, version, stream_id)
    return IngestResult(song_id, priors, version, stream_id)


def engine_embed_audio(engine: object, path: Path) -> np.ndarray:
    """Embed an audio file with the engine's encoder; a clear error when it has none."""
    embed = getattr(engine, "embed_audio", None)
    if embed is None:
        raise RequestError(f"cannot ingest {path}: this bundle carries no audio encoder; "
                           "send the song's embedding instead")
    if not path.is_file():
        raise RequestError(f"audio file {path} does not exist")
    return np.asarray(embed(path), dtype=np.float32)
