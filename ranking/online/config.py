"""``OnlineConfig``: every knob of the online layer in one frozen dataclass (TOML ``[online]``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from apex_rank.errors import ConfigError
from apex_rank.ranking.candidates import FactorIndexConfig

from .access import AccessConfig
from .audio import AudioIngestConfig


@dataclass(frozen=True)
class OnlineConfig:
    """Settings of the publisher, ranker, events and service.

    Attributes
    ----------
    namespace:
        Key namespace ``NS`` in ``apexrank:<NS>:...`` (see :mod:`.keys`).
    budget_ms:
        Latency budget of the ranker's Redis round trip (socket timeout); beyond it, or when
        Redis is down, ``rank`` answers from the in-process fallback marked ``degraded``.
    retry_s:
        After a Redis failure the ranker stays on the fallback this long before trying again
        (so a dead server costs one timeout per ``retry_s``, not one per request).
    batch_size:
        Songs or users per pipelined batch when publishing.
    staging_ttl_s, version_ttl_s, grace_s:
        TTL of a version's keys while it is being published, once it is committed, and after
        a newer version replaced it (readers in flight finish on the old one).
    history_len:
        Bound of a user's history as events extend it (the publisher writes the bundle's
        history whole, so online excludes exactly what offline excludes). The content profile
        follows the bundle's half-life mean (:mod:`~apex_rank.ranking.state`), not a setting here.
    events_maxlen:
        Approximate length cap of the event stream (``XADD MAXLEN ~``).
    max_k:
        Largest ``k`` a caller may ask for.
    fallback_size:
        Length of the precomputed popularity-and-quality fallback list.
    follow_interval_s:
        How often the catalogue follower wakes to check the stream and the ``current`` pointer.
    max_body_bytes:
        Request-size limit of the HTTP service.
    max_batch:
        Most concurrent requests one engine call ranks together (1 disables micro-batching).
        A batch equals single calls bit for bit: the ``als`` source rescores its candidates
        row by row in float64, and FAISS's exhaustive (Flat) searches of the other sources use
        BLAS, whose float results differ in the last bit from the one-query path, only from
        ``faiss.cvar.distance_compute_blas_threshold`` queries (128000 in faiss 1.15; it was 20
        in older releases, so keep ``max_batch`` under 20 on those).
    als_index:
        When the ``als`` source is answered from an approximate index, and how
        (:class:`~apex_rank.ranking.candidates.FactorIndexConfig`); below its ``min_songs``
        warm songs online ranking equals offline ranking exactly.
    freeze_gc:
        After loading a version, collect once and ``gc.freeze()`` what is loaded, so that the
        cyclic GC never walks the bundle's ~300k containers during a request (a full collection
        of a 100k-song bundle holds the GIL for ~140 ms). Process-wide; turn it off if the host
        process manages its own GC.
    data_check_s:
        How often a ranker confirms that the version it serves still has its keys (the pointer,
        the manifest and the song hash; one pipelined round trip, in the follower thread or, with
        none, in the first request after the period). A version whose keys are gone, as after a
        Redis restart that lost its data, is answered from the fallback list marked
        ``degraded`` and reported by ``/health``.
    access:
        API keys, quotas and HTTP limits of the service
        (:class:`~apex_rank.ranking.online.access.AccessConfig`, TOML ``[online.access]``).
    audio:
        Audio ingest: the allow-list root of paths, size, duration and time limits, worker
        processes (:class:`~apex_rank.ranking.online.audio.AudioIngestConfig`, TOML
        ``[online.audio]``).
    """

    namespace: str = "default"
    budget_ms: float = 50.0
    retry_s: float = 1.0
    batch_size: int = 2000
    staging_ttl_s: int = 3600
    version_ttl_s: int = 90 * 86400
    grace_s: int = 600
    history_len: int = 500
    events_maxlen: int = 10_000_000
    max_k: int = 500
    fallback_size: int = 1000
    follow_interval_s: float = 0.5
    max_body_bytes: int = 64 * 1024
    max_batch: int = 16
    freeze_gc: bool = True
    als_index: FactorIndexConfig = field(default_factory=FactorIndexConfig)
    data_check_s: float = 2.0
    access: AccessConfig = field(default_factory=AccessConfig)
    audio: AudioIngestConfig = field(default_factory=AudioIngestConfig)

    def __post_init__(self) -> None:
        for name in ("budget_ms", "retry_s", "follow_interval_s", "data_check_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"online.{name} must be > 0, got {getattr(self, name)}")
        for name in ("batch_size", "staging_ttl_s", "version_ttl_s", "grace_s", "history_len",
                     "events_maxlen", "max_k", "fallback_size", "max_body_bytes", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"online.{name} must be >= 1, got {getattr(self, name)}")
