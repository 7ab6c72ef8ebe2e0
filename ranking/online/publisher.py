"""Publish a bundle to the online store: stage a new version, then move ``current`` atomically.

Steps: read the pointer (``expected``), take a fresh version number ``V``, write the song
records and embeddings and the user states under ``v{V}`` in pipelined batches with the short
staging TTL, write the manifest last, give the version its long TTL, then one compare-and-set
moves ``current`` from ``expected`` to ``V``. The previous version then expires after the
grace period. A publish killed at any point leaves ``current`` untouched (its keys expire with
the staging TTL; a re-run takes a new version and completes). Of two publishers racing from
the same pointer exactly one commit succeeds; the loser gets a :class:`StoreError` and its
staged keys expire within a minute.

Carry-over (``carry=True``, the default): a bundle knows the interactions up to its training
cutoff (``engine.data_until_s``); what was recorded online since then must not vanish when its
version replaces the old one. Before the commit, songs ingested since the cutoff (catalogue
stream) that the bundle lacks are copied into the staged version, then events recorded since
the cutoff (event stream) are replayed onto the staged user states with the same update as
:func:`~.events.record`. ``record`` and ``ingest`` write only to the version that is current
at that instant (checked inside their transaction), and the commit returns both streams'
positions at the moment the pointer moved, so after the commit the entries between the
pre-commit replay and that moment are replayed onto the new version too: every event and
ingest lands in the new version exactly once. (Events replayed after the commit may land
after a newer event of the same user in its history; the window is one round trip long.)

Warmed factors (:mod:`.warmup`) are carried by solving them again from the events since the
cutoff with the new bundle's factors (:func:`~.warmup.replay_warmup`), into the staged version
before the commit; factors of two fits are not comparable, so they are never copied across
versions. After the commit the warm-up consumer, which follows the pointer, continues from the
manifest's ``events_since_ms``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from apex_rank.errors import ContentionError, StoreError, VersionMovedError
from apex_rank.ranking.state import UserState

from .config import OnlineConfig
from .engine import RankingEngine
from .events import EventUpdate, event_problem
from .keys import KEY_SCHEMA, Event, decode_vector, encode_song_record, stream_id_before, stream_key
from .store import OnlineStore
from .warmup import replay_warmup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishResult:
    """What a publish did: the new version, the one it replaced, counts and seconds taken."""

    version: int
    previous: int | None
    n_songs: int
    n_users: int
    seconds: float
    carried_songs: int = 0
    replayed_events: int = 0
    warmed_songs: int = 0
    warmed_users: int = 0


def publish(engine: RankingEngine, store: OnlineStore, *, config: OnlineConfig | None = None,
            progress: bool = False, on_batch: Callable[[int, int], None] | None = None,
            extra_meta: dict[str, Any] | None = None, carry: bool = True,
            carry_since_s: float | None = None) -> PublishResult:
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
    carry:
        Carry songs ingested and events recorded since the bundle's cutoff onto the new
        version (see the module doc).
    carry_since_s:
        The cutoff (unix seconds, stream time); default ``engine.data_until_s``.

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
        batch: list[tuple[str, UserState]] = []
        for uid, state in engine.user_states():
            batch.append((uid, state))
            if len(batch) >= bs:
                store.write_users(version, batch, cfg.staging_ttl_s)
                step(len(batch))
                batch = []
        if batch:
            store.write_users(version, batch, cfg.staging_ttl_s)
            step(len(batch))
        since_ms = int(1000 * (engine.data_until_s if carry_since_s is None else carry_since_s))
        carried = replayed = warmed_songs = warmed_users = 0
        if carry:
            known = set(block.ids)
            carried, cat_pos = carry_songs(store, version, known, stream_id_before(since_ms), None,
                                           cfg.staging_ttl_s, require_current=False)
            replayed, ev_pos = replay_events(store, version, stream_id_before(since_ms), None, cfg,
                                             EventUpdate.of(engine, cfg), require_current=False)
            warmed_songs, warmed_users = replay_warmup(store, version, engine.cf_model,
                                                       stream_id_before(since_ms), config=cfg,
                                                       require_current=False)
        meta = {
            "schema": KEY_SCHEMA,
            "version": version,
            "bundle_dir": engine.bundle_dir,
            "fingerprint": engine.fingerprint,
            "created_at": datetime.now(UTC).isoformat(),
            "n_songs": n_songs,
            "n_users": n_users,
            "embedding_dim": engine.embedding_dim,
            "events_since_ms": since_ms,  # where the warm-up consumer starts on this version
            **(extra_meta or {}),
        }
        store.write_meta(version, meta, cfg.staging_ttl_s)
        store.expire_version(version, cfg.version_ttl_s)
        moved, before, ev_mark, cat_mark = store.commit(version, expected)
    finally:
        if bar is not None:
            bar.close()
    if moved and carry:
        try:
            n, _ = carry_songs(store, version, known, cat_pos, cat_mark, cfg.version_ttl_s,
                               require_current=True)
            m, _ = replay_events(store, version, ev_pos, ev_mark, cfg, EventUpdate.of(engine, cfg),
                                 require_current=True)
            carried, replayed = carried + n, replayed + m
        except VersionMovedError as err:  # a newer publish committed and carries them itself
            log.warning("carry-over after the commit of version %d stopped: %s", version, err)
        except StoreError as err:  # the version is live: report, do not fail the publish
            log.error("version %d is current but the carry-over after its commit failed (%s); "
                      "events recorded during the publish are in the stream, a re-publish "
                      "carries them", version, err)
    if not moved:
        store.expire_version(version, 60)
        raise StoreError(
            f"publish of version {version} lost a race: {store.keys.current} moved from "
            f"{expected} to {before} while it was writing; nothing of version {version} was served")
    if before is not None:
        store.expire_version(before, cfg.grace_s)
    secs = time.perf_counter() - t0
    log.info("version %d is current (was %s); %d songs, %d users in %.1f s; carried %d ingested "
             "songs and %d events, warmed %d songs and %d users", version, before, n_songs, n_users,
             secs, carried, replayed, warmed_songs, warmed_users)
    return PublishResult(version, before, n_songs, n_users, secs, carried, replayed, warmed_songs,
                         warmed_users)


def carry_songs(store: OnlineStore, version: int, known: set[str], after_id: str,
                until_id: str | None, ttl_s: int, *, require_current: bool) -> tuple[int, str]:
    """Copy songs announced on the catalogue stream after ``after_id`` (up to ``until_id``) into
    ``version`` when it lacks them, from the version they were ingested into. ``known`` (the
    version's song ids) is extended. Returns (songs copied, last stream id read)."""
    n, last = 0, after_id
    while True:
        page = store.read_catalogue(last)
        rows = [r for r in page if until_id is None or stream_key(r[0]) <= stream_key(until_id)]
        wanted: dict[int, dict[str, None]] = {}  # version ingested into -> song ids, in order
        for _, sid, ver in rows:
            if ver != version and sid not in known:
                wanted.setdefault(ver, {})[sid] = None
        for ver, sids in wanted.items():  # one read per source version and page
            for sid, (rec, emb) in zip(sids, store.read_songs(ver, list(sids)), strict=True):
                if sid in known:
                    continue
                if rec is None or emb is None:
                    log.warning("song %s ingested into version %d is gone (expired?); not carried "
                                "to version %d", sid, ver, version)
                    continue
                vec = decode_vector(emb, f"{store.keys.emb(ver)}[{sid}]")
                store.add_song(version, sid, rec, vec, ttl_s, require_current=require_current)
                known.add(sid)
                n += 1
        if rows:
            last = rows[-1][0]
        if not rows or len(rows) < len(page):
            return n, last


def replay_events(store: OnlineStore, version: int, after_id: str, until_id: str | None,
                  config: OnlineConfig, rule: EventUpdate, *, require_current: bool) -> tuple[int, str]:
    """Apply the events recorded after stream id ``after_id`` (up to ``until_id``) to the user
    states of ``version``, in stream order, with ``rule`` (what ``record_many`` applies).
    Events naming a song ``version`` lacks are skipped (counted in a warning).
    Returns (events applied, last stream id read)."""
    n, skipped, implausible, last = 0, 0, 0, after_id
    for batch in store.read_events(0, after_id=after_id, until_id=until_id):
        if not batch:
            continue
        last = batch[-1].event_id
        ok = [e for e in batch if event_problem(e) is None]  # an older writer's ts 1e300 or ms
        implausible += len(batch) - len(ok)
        batch = ok
        by_user: dict[str, list[Event]] = {}
        for e in batch:
            by_user.setdefault(e.user_id, []).append(e)
        songs = sorted({e.song_id for e in batch})
        emb = {sid: decode_vector(raw, f"{store.keys.emb(version)}[{sid}]")
               for sid, (_, raw) in zip(songs, store.read_songs(version, songs), strict=True)
               if raw is not None}

        usable = sum(e.song_id in emb for e in batch)
        n, skipped = n + usable, skipped + len(batch) - usable

        def update(uid: str, old: UserState | None, by_user: dict[str, list[Event]] = by_user,
                   emb: dict[str, np.ndarray] = emb) -> UserState:
            st = old  # pure: a transaction retried after a concurrent write calls it again
            for e in by_user[uid]:
                if e.song_id in emb:
                    st = rule.step(uid, st, e.song_id, emb[e.song_id], e.weight, e.ts)
            return rule.fold(st) if st is not None else UserState(uid, None, None, profile_mass=0.0,
                                                                  profile_ref_s=rule.ref_s)

        ttl = config.version_ttl_s if require_current else config.staging_ttl_s
        try:
            store.update_users(version, list(by_user), update, ttl, require_current=require_current)
        except ContentionError:
            # a writer looping on some of these users won every retry of the batch (nothing was
            # written): one transaction per user, each watching one key, is rarely beaten
            for uid in by_user:
                store.update_users(version, [uid], update, ttl, require_current=require_current)
    if implausible:
        log.warning("%d replayed events are not plausible (ids, kind, weight or time); skipped", implausible)
    if skipped:
        log.warning("%d replayed events name songs version %d lacks; skipped", skipped, version)
    return n, last
