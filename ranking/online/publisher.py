"""Publish a bundle to the online store: stage a new version, then move ``current`` atomically.

Steps: read the pointer (``expected``), take a fresh version number ``V``, write the song
records and embeddings and the user states under ``v{V}`` in pipelined batches with the short
staging TTL, write the manifest last, give the version its long TTL, then one compare-and-set
moves ``current`` from ``expected`` to ``V``. The previous version then expires after the
grace period. A publish killed at any point leaves ``current`` untouched (its keys expire with
the staging TTL; a re-run takes a new version and completes). Of two publishers racing from
the same pointer exactly one commit succeeds; the loser gets a :class:`StoreError` and its
staged keys expire within a minute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from apex_rank.errors import StoreError

from .config import OnlineConfig
from .engine import RankingEngine
from .keys import KEY_SCHEMA, encode_song_record
from .store import OnlineStore, UserRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishResult:
    """What a publish did: the new version, the one it replaced, counts and seconds taken."""

    version: int
    previous: int | None
    n_songs: int
    n_users: int
    seconds: float


def publish(engine: RankingEngine, store: OnlineStore, *, config: OnlineConfig | None = None,
            progress: bool = False, on_batch: Callable[[int, int], None] | None = None,
            extra_meta: dict[str, Any] | None = None) -> PublishResult:
    """Publish ``engine``'s bundle to ``store`` (see the module doc).

    Parameters
    ----------
    engine:
        The loaded bundle (its song table, user states, bundle folder).
    store:
        Target store; its namespace decides the keys.
    config:
        Batch size and TTLs (:class:`OnlineConfig`).
    progress:
        Show a tqdm progress bar (on stderr).
    on_batch:
        Called with (items written, items total) after every batch (tests, dashboards).
    extra_meta:
        Extra JSON-able fields for the version manifest.

    Returns
    -------
    PublishResult

    Raises
    ------
    StoreError
        The store failed, or another publisher moved ``current`` first (lost race).
    """
    cfg = config or OnlineConfig()
    t0 = time.perf_counter()
    expected = store.current_version()
    version = store.next_version()
    block = engine.song_block()
    n_songs, n_users = len(block.ids), engine.n_users()
    total = n_songs + n_users
    log.info("publishing %d songs, %d users as version %d (current %s)", n_songs, n_users,
             version, expected)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="rec", desc=f"publish v{version}")
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if bar is not None:
            bar.update(n)
        if on_batch is not None:
            on_batch(done, total)

    try:
        bs = cfg.batch_size
        emb = np.ascontiguousarray(block.embeddings, dtype=np.float32)
        for lo in range(0, n_songs, bs):
            hi = min(n_songs, lo + bs)
            records = [encode_song_record(block.priors[i], float(block.popularity[i]),
                                          float(block.age_days[i]), bool(block.is_cold[i]))
                       for i in range(lo, hi)]
            store.write_songs(version, block.ids[lo:hi], records, emb[lo:hi], cfg.staging_ttl_s)
            step(hi - lo)
        batch: list[tuple[str, UserRecord]] = []
        for uid, rec in engine.user_records():
            batch.append((uid, rec))
            if len(batch) >= bs:
                store.write_users(version, batch, cfg.staging_ttl_s)
                step(len(batch))
                batch = []
        if batch:
            store.write_users(version, batch, cfg.staging_ttl_s)
            step(len(batch))
        meta = {
            "schema": KEY_SCHEMA,
            "version": version,
            "bundle_dir": engine.bundle_dir,
            "fingerprint": engine.fingerprint,
            "created_at": datetime.now(UTC).isoformat(),
            "n_songs": n_songs,
            "n_users": n_users,
            "embedding_dim": engine.embedding_dim,
            **(extra_meta or {}),
        }
        store.write_meta(version, meta, cfg.staging_ttl_s)
        store.expire_version(version, cfg.version_ttl_s)
        moved, before = store.commit(version, expected)
    finally:
        if bar is not None:
            bar.close()
    if not moved:
        store.expire_version(version, 60)
        raise StoreError(
            f"publish of version {version} lost a race: {store.keys.current} moved from "
            f"{expected} to {before} while it was writing; nothing of version {version} was served")
    if before is not None:
        store.expire_version(before, cfg.grace_s)
    secs = time.perf_counter() - t0
    log.info("version %d is current (was %s); %d songs, %d users in %.1f s", version, before,
             n_songs, n_users, secs)
    return PublishResult(version, before, n_songs, n_users, secs)
