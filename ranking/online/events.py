"""Events: what changes the users' online state between publishes.

``record_many`` appends a batch of interactions to the event stream and, in the same Redis
transaction, updates each user's state under the current version with the build's own
algorithm (:class:`EventUpdate`: history, activity, latest time and the half-life mean profile
event by event, then the CF factor folded in for a user the bundle has none for), so the next
``rank`` reflects them; a user the store has never seen is created.
Every event of a batch is checked before any is written (ids, kind, a ``ts`` of unix seconds
in ``[2000-01-01, now + 1 day]``, the song in the current catalogue), the batch is written
all or nothing, and it costs a fixed number of round trips whatever its size (``record`` is
the one-event case). The stream is the durable log (keep Redis persistence on for it):
``export_events`` writes it to parquet for retraining, skipping and reporting rows that an
older or foreign writer left unusable.

New songs come in through :mod:`.ingest`.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from apex_rank.errors import RequestError, StoreError, UnknownIdError, VersionMovedError
from apex_rank.ranking.cf import CFModel
from apex_rank.ranking.state import UserState, apply_event, fold_in
from apex_rank.schemas import MAX_WEIGHT, time_unit

from .config import OnlineConfig
from .engine import RankingEngine
from .keys import Event, check_id, decode_vector, stream_key
from .store import OnlineStore

log = logging.getLogger(__name__)

#: Event kinds and the weight each adds to history and profile (skips are logged only).
EVENT_WEIGHTS: dict[str, float] = {"play": 1.0, "like": 2.0, "skip": 0.0}
#: An event's ``ts`` lies in ``[EARLIEST_EVENT_S, now + FUTURE_SLACK_S]`` (2000-01-01 on).
EARLIEST_EVENT_S = 946_684_800.0
FUTURE_SLACK_S = 86_400.0
#: How many problems an error message or an export report lists (the count is always given).
SHOWN_PROBLEMS = 5


class Interaction(NamedTuple):
    """One event to record: a user played, liked or skipped a song at ``ts`` (unix seconds;
    ``None``: now)."""

    user_id: str
    song_id: str
    kind: str = "play"
    ts: float | None = None


@dataclass(frozen=True)
class RecordedEvent:
    """One event as :func:`record_many` (or :func:`record`) wrote it: its stream id, whether it
    created its user, and the user's history length after it."""

    event_id: str
    user_id: str
    created: bool
    history_len: int


@dataclass(frozen=True)
class EventUpdate:
    """How recorded events update a user state: the one algorithm of
    :mod:`~apex_rank.ranking.state` (:func:`~apex_rank.ranking.state.apply_event` per event,
    then :func:`~apex_rank.ranking.state.fold_in` for a user ``cf`` has no factor for) with the
    serving bundle's profile half-life and the store's history bound. ``record_many`` and the
    carry-over at publish both apply it, so a state is the same whichever wrote it.

    Attributes
    ----------
    half_life_days: the bundle's ``RecommenderConfig.half_life_days``.
    ref_s: the bundle's ``now_s`` (``data_until_s``), the reference of a new user's profile ages
        (NaN: no decay).
    history_len: bound of the stored history (``OnlineConfig.history_len``).
    cf: the bundle's CF model, which folds in users it was not fitted on (None: no fold-in;
        the warm-up consumer then solves their factors later).
    """

    half_life_days: float = 30.0
    history_len: int = 500
    cf: CFModel | None = None
    ref_s: float = float("nan")

    @classmethod
    def of(cls, engine: RankingEngine, config: OnlineConfig) -> EventUpdate:
        """The update that matches ``engine``'s bundle."""
        return cls(engine.half_life_days, config.history_len, engine.cf_model, engine.data_until_s)

    def step(self, user_id: str, state: UserState | None, song_id: str, embedding: np.ndarray | None,
             weight: float, ts: float) -> UserState:
        """``state`` (None: a new user) after one event. Pure."""
        st = state if state is not None else UserState(user_id, None, None, profile_mass=0.0,
                                                       profile_ref_s=self.ref_s)
        return apply_event(st, song_id, embedding, weight, ts, half_life_days=self.half_life_days,
                           history_len=self.history_len)

    def fold(self, state: UserState) -> UserState:
        """``state`` with its CF factor folded in when ``cf`` was not fitted on the user (after the
        events of a batch: one ALS user step per user and batch). Pure."""
        if self.cf is None or self.cf.has_user(state.user_id):
            return state
        return fold_in(state, self.cf)


def check_ts(ts: object, *, now: float | None = None) -> float:
    """``ts`` as float unix seconds if it lies in ``[2000-01-01, now + 1 day]``, else a
    :class:`RequestError` saying why: not a number (booleans included), not finite, before
    2000, in the future, or (the usual mistake) in milliseconds or microseconds."""
    if isinstance(ts, bool) or not isinstance(ts, numbers.Real):
        raise RequestError(f"ts must be a number of unix seconds, got {ts!r}")
    t = float(ts)
    latest = (time.time() if now is None else now) + FUTURE_SLACK_S
    if not math.isfinite(t):
        raise RequestError(f"ts {ts!r} is not a finite number of unix seconds")
    if EARLIEST_EVENT_S <= t <= latest:
        return t
    unit = time_unit(t, EARLIEST_EVENT_S, latest)
    if unit is not None:
        raise RequestError(f"ts {ts!r} looks like {unit} since the epoch; give seconds")
    if t < EARLIEST_EVENT_S:
        raise RequestError(f"ts {ts!r} is before 2000-01-01 ({EARLIEST_EVENT_S:.0f} unix seconds)")
    raise RequestError(f"ts {ts!r} is more than a day in the future (now + 1 day is {latest:.0f} "
                       "unix seconds)")


def _refusal(problems: list[str], n: int) -> str:
    shown = "; ".join(problems[:SHOWN_PROBLEMS])
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return f"{len(problems)} of {n} event(s) refused, nothing recorded: {shown}{more}"


def _checked(events: Sequence[Interaction], now: float) -> list[dict[str, str]]:
    """The stream fields of every event, or a :class:`RequestError` listing each bad one."""
    problems: list[str] = []
    fields: list[dict[str, str]] = []
    for i, ev in enumerate(events):
        try:
            user_id, song_id, kind, ts = Interaction(*ev)
            check_id(user_id, "user_id")
            check_id(song_id, "song_id")
            if kind not in EVENT_WEIGHTS:
                raise RequestError(f"kind {kind!r} is not one of {sorted(EVENT_WEIGHTS)}")
            t = now if ts is None else check_ts(ts, now=now)
        except (RequestError, TypeError) as err:
            problems.append(f"event {i}: {err}")
            continue
        fields.append({"u": user_id, "s": song_id, "k": kind, "t": repr(t),
                       "w": repr(EVENT_WEIGHTS[kind])})
    if problems:
        raise RequestError(_refusal(problems, len(events)))
    return fields


def record_many(store: OnlineStore, events: Sequence[Interaction], *,
                config: OnlineConfig | None = None,
                engine: RankingEngine | None = None) -> list[RecordedEvent]:
    """Record a batch of interactions, all or nothing (see the module doc).

    Round trips to Redis: the pointer, the songs, then the store's transaction (WATCH, one
    read of the pointer and the users, MULTI/EXEC): five, whatever the batch size. A user's
    events apply in batch order with :class:`EventUpdate`, exactly as one :func:`record` call
    each would; ``created`` is true on the first event of a user the store did not hold.
    ``engine``: the serving engine, whose bundle sets the profile half-life and folds in the CF
    factor of users it was not fitted on (None: half-life 30 days, no fold-in).

    Example
    -------
    >>> record_many(store, [Interaction("u1", "s1"), Interaction("u2", "s1", "like", 1.75e9)])
    ... # doctest: +SKIP

    Raises
    ------
    RequestError
        A malformed id, an unknown ``kind`` or a ``ts`` outside the window, naming the index of
        each bad event (nothing is written).
    UnknownIdError
        A song that is not in the current version's catalogue, naming the event's index
        (nothing is written).
    StoreError
        Nothing is published, or the store failed (nothing is written).
    """
    cfg = config or OnlineConfig()
    if not events:
        return []
    rule = EventUpdate.of(engine, cfg) if engine is not None else EventUpdate(history_len=cfg.history_len)
    fields = _checked(events, time.time())
    user_ids = [f["u"] for f in fields]
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(user_ids):
        by_user.setdefault(u, []).append(i)
    song_ids = list(dict.fromkeys(f["s"] for f in fields))
    created = [False] * len(fields)  # per event; every attempt's update rewrites them all
    history_len = [0] * len(fields)
    for _ in range(5):  # a publish committing in between moves the batch to the new version
        version = store.current_version()
        if version is None:
            raise StoreError(f"nothing is published under {store.keys.current}; cannot record events")
        emb: dict[str, np.ndarray] = {}
        for sid, (rec_raw, emb_raw) in zip(song_ids, store.read_songs(version, song_ids), strict=True):
            if rec_raw is not None and emb_raw is not None:
                emb[sid] = decode_vector(emb_raw, f"{store.keys.emb(version)}[{sid}]")
        unknown = [f"event {i}: song_id {f['s']!r} is not in the catalogue of version {version}"
                   for i, f in enumerate(fields) if f["s"] not in emb]
        if unknown:
            raise UnknownIdError(_refusal(unknown, len(fields)))

        def update(uid: str, old: UserState | None, emb: dict[str, np.ndarray] = emb) -> UserState:
            st = old  # pure: a retried transaction calls it again from the stored state
            for i in by_user[uid]:
                created[i] = st is None
                f = fields[i]
                st = rule.step(uid, st, f["s"], emb[f["s"]], EVENT_WEIGHTS[f["k"]], float(f["t"]))
                history_len[i] = len(st.history)
            assert st is not None  # by_user lists every user with at least one event
            return rule.fold(st)

        try:
            ids, _ = store.record_events(version, fields, user_ids, update, cfg.version_ttl_s,
                                         cfg.events_maxlen)
        except VersionMovedError as err:
            log.info("batch of %d events: %s; retrying on the new version", len(fields), err)
            continue
        return [RecordedEvent(eid, u, c, h)
                for eid, u, c, h in zip(ids, user_ids, created, history_len, strict=True)]
    raise StoreError(f"batch of {len(fields)} events not recorded: the published version kept moving")


def record(store: OnlineStore, user_id: str, song_id: str, kind: str = "play",
           ts: float | None = None, *, config: OnlineConfig | None = None,
           engine: RankingEngine | None = None) -> RecordedEvent:
    """Record one interaction: :func:`record_many` with one event (same checks and errors)."""
    return record_many(store, [Interaction(user_id, song_id, kind, ts)], config=config, engine=engine)[0]


def event_problem(event: Event, *, now: float | None = None) -> str | None:
    """Why a stored event is unusable for training (``None`` if it is fine): a malformed id, an
    unknown kind, a weight outside ``[0, MAX_WEIGHT]`` or a time outside the window of
    :func:`check_ts` (what :func:`record_many` refuses today; older writers let it through)."""
    try:
        check_id(event.user_id, "user_id")
        check_id(event.song_id, "song_id")
        if event.kind not in EVENT_WEIGHTS:
            return f"kind {event.kind!r} is not one of {sorted(EVENT_WEIGHTS)}"
        if not 0.0 <= event.weight <= MAX_WEIGHT:
            return f"weight {event.weight!r} is not a number in [0, {MAX_WEIGHT:g}]"
        check_ts(event.ts, now=now)
    except RequestError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_events` wrote: ``rows`` events to ``path``; ``skipped`` bad rows, the
    first few described in ``problems`` as ``"event <stream id>: <why>"``."""

    path: Path
    rows: int
    skipped: int
    problems: tuple[str, ...]


def export_events(store: OnlineStore, out: str | Path, *, since: datetime | float | None = None,
                  until: datetime | float | None = None) -> ExportResult:
    """Write the events recorded in ``[since, until]`` (stream time) to a parquet file.

    Columns follow the interactions contract: ``user_id``, ``song_id``, ``ts`` (datetime,
    UTC, from the event), ``weight``, plus ``kind`` and ``event_id``. Rows that are not usable
    events (unparsable, or refused by :func:`event_problem`) are skipped and reported in the
    result (and the log); they never abort the export.
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
    problems: list[str] = []  # the first few, in stream order; ``skipped`` counts them all
    skipped = 0
    pending: list[tuple[str, str]] = []  # this batch's: unparsable rows arrive before the rest

    def bad(eid: str, why: str) -> None:
        pending.append((eid, why))

    now = time.time()
    for batch in store.read_events(ms(since) or 0, ms(until), on_bad=bad):
        for e in batch:
            why = event_problem(e, now=now)
            if why is not None:
                bad(e.event_id, why)
                continue
            cols["event_id"].append(e.event_id)
            cols["user_id"].append(e.user_id)
            cols["song_id"].append(e.song_id)
            cols["ts"].append(datetime.fromtimestamp(e.ts, tz=UTC).replace(tzinfo=None))
            cols["weight"].append(e.weight)
            cols["kind"].append(e.kind)
        skipped += len(pending)
        for eid, why in sorted(pending, key=lambda p: stream_key(p[0]))[: SHOWN_PROBLEMS - len(problems)]:
            problems.append(f"event {eid}: {why}")
        pending.clear()
    df = pl.DataFrame(cols, schema={"event_id": pl.Utf8, "user_id": pl.Utf8, "song_id": pl.Utf8,
                                    "ts": pl.Datetime("us"), "weight": pl.Float64,
                                    "kind": pl.Utf8})
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path)
    log.info("exported %d events to %s", df.height, path)
    if skipped:
        log.warning("skipped %d bad event row(s) of %s, first: %s", skipped, store.keys.events,
                    "; ".join(problems))
    return ExportResult(path, df.height, skipped, tuple(problems))
