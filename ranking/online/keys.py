"""The versioned Redis key format of the online store, and the binary codecs of its fields.

Key format, schema 2 (every key starts with ``apexrank:<NS>:``, ``NS`` the namespace)
---------------------------------------------------------------------------------------

``<NS>``, ``<V>`` and ``<USER>`` stand for the namespace, a version number and a user id;
braces are literal: they are Redis Cluster *hash tags* (only the text between ``{`` and ``}``
picks the key's slot). Every key of the namespace but the user states carries the tag
``{<NS>}`` and so lives in one slot (the *namespace slot*); each user state carries its
user id, ``{<USER>}``, so one user's states of every version share a slot and users spread
over the cluster. Ids never hold braces (:func:`check_id`), so a tag is never cut short.

==========================================  ========  =============================================
key                                         type      holds
==========================================  ========  =============================================
``apexrank:<NS>:{<NS>}:current``            string    the published version ``V`` readers use (the
                                                      pointer)
``apexrank:<NS>:{<NS>}:seq``                string    counter handing out version numbers (``INCR``)
``apexrank:<NS>:{<NS>}:events``             stream    every recorded event: ``u`` user, ``s`` song,
                                                      ``k`` kind, ``t`` unix seconds, ``w`` weight
                                                      (kept across versions; never expires, trimmed
                                                      by length)
``apexrank:<NS>:{<NS>}:catalogue``          stream    announcements of ingested songs: ``s`` song,
                                                      ``v`` version (other ranker processes follow it)
``apexrank:<NS>:{<NS>}:warmlog``            stream    announcements of warmed factors: ``v`` version,
                                                      ``s`` the song ids written (comma-separated; ids
                                                      hold no comma); ranker processes follow it like
                                                      the catalogue
``apexrank:<NS>:{<NS>}:metrics``            hash      ``serve`` worker (``hostname-pid``) -> JSON
                                                      snapshot of its request metrics and the Redis
                                                      time it was written (every ``metrics_flush_s``;
                                                      a snapshot older than 5 periods is a dead
                                                      worker's and is dropped)
``apexrank:<NS>:v<V>:{<NS>}:meta``          string    JSON manifest of version ``V``; written last, so
                                                      its presence marks a complete publish
``apexrank:<NS>:v<V>:{<NS>}:songs``         hash      song id -> song record (``SONG_RECORD`` below)
``apexrank:<NS>:v<V>:{<NS>}:emb``           hash      song id -> content embedding, little-endian f32
                                                      (published songs: the bundle's L2-normalised
                                                      row; ingested songs: as given; loaders index it
                                                      and take the APEX priors from the record, never
                                                      re-predict)
``apexrank:<NS>:v<V>:{<NS>}:ingested``      set       song ids ingested into ``V`` after it was
                                                      published
``apexrank:<NS>:v<V>:{<NS>}:warm``          hash      song id -> warm record (below): the CF factor
                                                      the warm-up consumer solved from the song's
                                                      listeners since the bundle's cutoff (songs cold
                                                      in the bundle only); carried over at publish
``apexrank:<NS>:v<V>:u:{<USER>}``           hash      user state (:class:`~apex_rank.ranking.state.
                                                      UserState`): ``f`` CF factor (f32 bytes, absent
                                                      for users without one; for users the bundle has
                                                      no factor for, folded in from their history by
                                                      ``record_many`` and the warm-up consumer), ``p``
                                                      content profile (f32 bytes), ``m`` its mass and
                                                      ``r`` its reference time (JSON numbers; see
                                                      :mod:`~apex_rank.ranking.state`), ``h`` history
                                                      (JSON list of song ids in order of first
                                                      interaction, bounded), ``w`` each history song's
                                                      summed weight (JSON list), ``n`` activity (JSON
                                                      number), ``t`` time of the latest interaction
                                                      (JSON number of unix seconds; absent when
                                                      unknown); on a cluster also ``x``, a token of
                                                      the write that last replaced the state (read
                                                      by that write's retry only; readers ignore it)
==========================================  ========  =============================================

Every ``v<V>`` key carries a TTL: ``staging_ttl_s`` while a publish is running (a killed
publish leaves nothing behind for long), ``version_ttl_s`` once committed, and ``grace_s``
after a newer version replaced it; all of them match ``apexrank:<NS>:v<V>:*``. The song record
is 10 little-endian float32 values: the 7 APEX priors in ``APEX_TASKS`` order, popularity, age
in days, is_cold (0 or 1). The warm record is ``1 + f`` little-endian float32 values: the
song's play count since the bundle's cutoff (its popularity once warm), then its (f,) CF factor.
No pickle anywhere: vectors are raw float32 bytes, lists and manifests are JSON.

Schema 1 (before Redis Cluster) had the same keys without tags (``apexrank:<NS>:current``,
``apexrank:<NS>:v<V>:u:<USER>``, ...). Its data is not read: a store that finds no schema-2
pointer but a schema-1 one logs that the namespace must be published again (``apex-rank
publish``), and the old versions expire by their TTLs.

What is atomic (one server, and Redis Cluster)
----------------------------------------------

On one server every write of a batch is one ``MULTI``/``EXEC``: ``record_events`` appends the
events and replaces the users' states under a ``WATCH`` of the pointer and the users, so a
batch is written whole or not at all, and only while its version is current. A Redis Cluster
runs a transaction or a script on one slot only, so there (``redis+cluster://`` URLs):

- single-slot and atomic as on one server: the commit's compare-and-set of the pointer and
  its reading of the stream positions, a song's ingest and its catalogue announcement, the
  warm records and their warm-log announcement, and *the append of a batch of events to the
  stream together with the check that its version is current* (all namespace slot);
- per user, atomic: the read-compute-write of one user's state (a compare-and-set script on
  the user's slot that writes only if the state is still the one the update was computed
  from, else it is read and computed again, so concurrent writers lose no update; a script
  that redis-py runs again after a lost reply finds its own ``x`` token and writes nothing
  twice);
- not atomic: a batch as a whole. ``record_events`` first reads and computes every state
  (an update that raises writes nothing), then appends the events under the version check (a
  moved version raises :class:`~apex_rank.errors.VersionMovedError`, nothing written), then
  writes the states slot by slot. The event stream is the record: an event is acknowledged
  only once it is on the stream and its users are written; events on the stream before a
  commit's mark reach the new version by the publish's replay, later ones were checked
  against the new version, so the carry-over still lands every event exactly once in the new
  version. Between the append and the states' writes (about one round trip per node) a
  reader can see a state without the batch's events, a connection lost in that gap leaves
  events on the stream whose states were not written (the error says so; the next publish
  replays them), and two concurrent writers of one user may order its history unlike the
  stream. Pipelines without a transaction (publish writes, reads of several keys) are split by
  redis-py into one pipeline per node, written to every node before any reply is read.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from apex_rank.errors import RequestError, StoreError
from apex_rank.ranking.state import UserState
from apex_rank.schemas import ID_PATTERN, ID_RULE  # one id rule for tables and the online API

log = logging.getLogger(__name__)

KEY_SCHEMA = 2
SONG_RECORD_WIDTH = 10  # 7 priors, popularity, age_days, is_cold
NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def check_id(value: object, what: str) -> str:
    """Return ``value`` if it is a valid user or song id, else raise :class:`RequestError`.

    Ids follow the one rule of every entry point (:data:`apex_rank.schemas.ID_PATTERN`, also
    checked when tables are validated): 1-128 characters of letters, digits and
    ``_ . : @ / + -``; anything else (spaces, braces, control characters, glob characters) is
    refused before it reaches a key.
    """
    # fullmatch: re's "$" also matches before a final newline ("u1\n" passed with .match)
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise RequestError(f"{what} {value!r} is not a valid id ({ID_RULE})")
    return value


@dataclass(frozen=True)
class Keys:
    """Key builder for one namespace (schema 2, see the module doc).

    Example
    -------
    >>> Keys("prod").user(3, "u1")
    'apexrank:prod:v3:u:{u1}'
    >>> Keys("prod").current
    'apexrank:prod:{prod}:current'
    """

    namespace: str

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.match(self.namespace):
            raise StoreError(f"namespace {self.namespace!r} must be 1-64 letters, digits, _ or -")

    @property
    def root(self) -> str:
        """The prefix of every key of the namespace (``apexrank:<NS>:*`` matches them all)."""
        return f"apexrank:{self.namespace}"

    @property
    def tag(self) -> str:
        """The hash tag of the namespace slot."""
        return "{" + self.namespace + "}"

    @property
    def current(self) -> str:
        return f"{self.root}:{self.tag}:current"

    @property
    def seq(self) -> str:
        return f"{self.root}:{self.tag}:seq"

    @property
    def events(self) -> str:
        return f"{self.root}:{self.tag}:events"

    @property
    def catalogue(self) -> str:
        return f"{self.root}:{self.tag}:catalogue"

    @property
    def warm_log(self) -> str:
        return f"{self.root}:{self.tag}:warmlog"

    @property
    def metrics(self) -> str:
        return f"{self.root}:{self.tag}:metrics"

    @property
    def schema1_current(self) -> str:
        """Where schema 1 kept the pointer (read only to say that a namespace is old)."""
        return f"{self.root}:current"

    def version_prefix(self, version: int) -> str:
        """The prefix of every key of ``version`` (users' included)."""
        return f"{self.root}:v{int(version)}:"

    def _version_key(self, version: int, name: str) -> str:
        return f"{self.version_prefix(version)}{self.tag}:{name}"

    def meta(self, version: int) -> str:
        return self._version_key(version, "meta")

    def songs(self, version: int) -> str:
        return self._version_key(version, "songs")

    def emb(self, version: int) -> str:
        return self._version_key(version, "emb")

    def ingested(self, version: int) -> str:
        return self._version_key(version, "ingested")

    def warm(self, version: int) -> str:
        return self._version_key(version, "warm")

    def user(self, version: int, user_id: str) -> str:
        return f"{self.version_prefix(version)}u:{{{user_id}}}"


def encode_vector(vec: np.ndarray) -> bytes:
    """(d,) numbers -> raw little-endian float32 bytes."""
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


def decode_vector(raw: bytes, where: str) -> np.ndarray:
    """Raw float32 bytes -> (d,) float32 array; a wrong length is a :class:`StoreError`."""
    if len(raw) % 4:
        raise StoreError(f"{where}: {len(raw)} bytes is not a float32 vector")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def encode_song_record(priors: np.ndarray, popularity: float, age_days: float, is_cold: bool) -> bytes:
    """Pack one song record (see the module doc)."""
    rec = np.empty(SONG_RECORD_WIDTH, dtype="<f4")
    rec[:7] = priors
    rec[7], rec[8], rec[9] = popularity, age_days, 1.0 if is_cold else 0.0
    return rec.tobytes()


def decode_song_record(raw: bytes, where: str) -> dict[str, object]:
    """Unpack a song record into ``{"priors": (7,), "popularity", "age_days", "is_cold"}``."""
    vec = decode_vector(raw, where)
    if vec.shape[0] != SONG_RECORD_WIDTH:
        raise StoreError(f"{where}: song record has {vec.shape[0]} values, expected {SONG_RECORD_WIDTH}")
    return {
        "priors": vec[:7].copy(),
        "popularity": float(vec[7]),
        "age_days": float(vec[8]),
        "is_cold": bool(vec[9] > 0.5),
    }


def encode_warm_song(factor: np.ndarray, plays: float) -> bytes:
    """Pack one warm record (see the module doc): plays, then the (f,) factor."""
    return encode_vector(np.concatenate([[plays], np.asarray(factor, dtype=np.float64)]))


def decode_warm_song(raw: bytes, where: str) -> tuple[np.ndarray, float]:
    """Unpack a warm record into ``((f,) float32 factor, plays)``."""
    vec = decode_vector(raw, where)
    if vec.shape[0] < 2:
        raise StoreError(f"{where}: warm record has {vec.shape[0]} values, expected 1 + factor width")
    return vec[1:].copy(), float(vec[0])


def encode_history(history: list[str]) -> bytes:
    return json.dumps(list(history), separators=(",", ":")).encode()


def decode_history(raw: bytes | None, where: str) -> list[str]:
    if raw is None:
        return []
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise StoreError(f"{where}: history is not JSON") from err
    if not isinstance(value, list):
        raise StoreError(f"{where}: history is not a JSON list")
    return [str(v) for v in value]


def as_text(x: Any) -> str:
    """A Redis reply (bytes, str or None) as text."""
    return x.decode() if isinstance(x, bytes) else ("" if x is None else str(x))


def encode_user(state: UserState) -> dict[str, bytes]:
    """A user state as the fields of its hash (see the module doc)."""
    # numbers as repr(float): the bytes json.dumps writes for a finite float, 8x cheaper (a
    # batch of events encodes and decodes hundreds of users)
    fields: dict[str, bytes] = {
        "h": encode_history(list(state.history)),
        "w": b"[" + ",".join(repr(float(w)) for w in state.weights).encode() + b"]",
        "n": str(int(state.activity)).encode(),
    }
    if state.cf_factor is not None:
        fields["f"] = encode_vector(state.cf_factor)
    if state.profile is not None:
        fields["p"] = encode_vector(state.profile)
        fields["m"] = repr(float(state.profile_mass)).encode()
    if math.isfinite(state.last_seen_s):
        fields["t"] = repr(float(state.last_seen_s)).encode()
    if math.isfinite(state.profile_ref_s):
        fields["r"] = repr(float(state.profile_ref_s)).encode()
    return fields


def decode_user(user_id: str, raw: dict[Any, Any], where: str) -> UserState | None:
    """The fields of ``user_id``'s hash (``HGETALL``) as its state; ``None`` for an empty hash.
    Fields an older writer did not write read as: ``w`` one unit weight per history song, ``m``
    1, ``r`` unknown."""
    if not raw:
        return None
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    history = decode_history(f.get("h"), where)
    try:
        activity = int(float(f.get("n", b"0")))  # a JSON number, as float() reads it
        last_seen = float(f["t"]) if f.get("t") else float("nan")
        mass = float(f["m"]) if f.get("m") else 1.0
        ref = float(f["r"]) if f.get("r") else float("nan")
        weights = tuple(float(w) for w in json.loads(f["w"])) if f.get("w") else ()
    except (ValueError, TypeError) as err:
        raise StoreError(f"{where}: activity, last-seen, profile mass, reference time or history "
                         "weights field is not a number") from err
    if weights and len(weights) != len(history):
        raise StoreError(f"{where}: {len(weights)} history weights for {len(history)} history songs")
    return UserState(
        user_id,
        cf_factor=decode_vector(f["f"], where) if f.get("f") else None,
        profile=decode_vector(f["p"], where) if f.get("p") else None,
        history=tuple(history),
        activity=activity,
        last_seen_s=last_seen,
        history_weights=weights,
        profile_mass=mass,
        profile_ref_s=ref,
    )


def stream_id_before(ms: int) -> str:
    """The stream id just before millisecond ``ms`` (an exclusive start that includes ``ms``)."""
    return "0-0" if ms <= 0 else f"{ms - 1}-18446744073709551615"


def stream_key(eid: str) -> tuple[int, int]:
    """A stream id ``"ms-seq"`` as a comparable pair."""
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Event:
    """One recorded interaction, as read back from the event stream."""

    event_id: str
    user_id: str
    song_id: str
    kind: str
    ts: float
    weight: float


def _warn_bad_event(eid: str, reason: str) -> None:
    log.warning("event %s skipped: %s", eid, reason)


def decode_events(rows: Sequence[tuple[Any, dict[Any, Any]]],
                  on_bad: Callable[[str, str], None] | None) -> list[Event]:
    """Stream rows -> events; rows that are not events go to ``on_bad`` (see read_events)."""
    out = []
    for raw_id, raw in rows:
        eid = as_text(raw_id)
        try:
            f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                 for k, v in raw.items()}
        except UnicodeDecodeError:
            (on_bad or _warn_bad_event)(eid, "a field is not UTF-8 text")
            continue
        missing = [k for k in ("u", "s", "k", "t") if k not in f]
        if missing:
            (on_bad or _warn_bad_event)(eid, f"field(s) {', '.join(missing)} missing")
            continue
        try:
            ts = float(f["t"])
        except ValueError:
            (on_bad or _warn_bad_event)(eid, f"t {f['t']!r} is not a number")
            continue
        try:
            w = float(f.get("w", 1))
        except ValueError:
            (on_bad or _warn_bad_event)(eid, f"w {f['w']!r} is not a number")
            continue
        out.append(Event(eid, f["u"], f["s"], f["k"], ts, w))
    return out
