"""Online ranking over a shared store (Redis in production, in-process for the demo).

Modules, in data-flow order: :mod:`.keys` (the versioned key format and codecs),
:mod:`.store` (the store contract; :mod:`.redis_store` and :mod:`.memory_store` implement it),
:mod:`.engine` (a loaded bundle and the ranking pipeline; :mod:`.batching` ranks concurrent
requests together), :mod:`.publisher` (stage a version, move ``current`` atomically),
:mod:`.bundles` (a bundle's fingerprint, the local folder serving a version),
:mod:`.ranker` (``OnlineRanker.rank``), :mod:`.events` (events and their export),
:mod:`.ingest` (new songs),
:mod:`.warmup` (plays move CF factors between retrains: the background consumer) and
:mod:`.service` (the FastAPI app; needs the ``serve`` extra, imported only when serving) with
:mod:`.metrics` (its request metrics, summed over workers through the store).
"""

from __future__ import annotations

from apex_rank.errors import RequestError
from apex_rank.ranking.state import UserState

from .config import OnlineConfig
from .events import EVENT_WEIGHTS, Interaction, export_events, record, record_many
from .ingest import ingest
from .keys import Keys
from .memory_store import InProcessStore
from .publisher import PublishResult, publish
from .ranker import OnlineRanker, RankedItem, Ranking
from .redis_store import RedisStore
from .store import OnlineStore, open_store
from .warmup import WarmUp, WarmUpConsumer, bundle_cf_loader

__all__ = [
    "EVENT_WEIGHTS", "InProcessStore", "Interaction", "Keys", "OnlineConfig", "OnlineRanker", "OnlineStore",
    "PublishResult", "RankedItem", "Ranking", "RedisStore", "RequestError", "UserState", "WarmUp",
    "WarmUpConsumer", "bundle_cf_loader", "export_events", "ingest", "open_store", "publish", "record",
    "record_many",
]
