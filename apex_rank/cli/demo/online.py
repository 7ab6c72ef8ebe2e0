"""The online stage of ``apex-rank demo``: publish, rank, play a song, ingest a song, rank
again, and watch a new song warm up from its first plays.

:func:`online_stage` yields the lines the demo prints. It uses Redis when one answers at
``redis_url`` (a private namespace, deleted at the end) and an in-process store with the same
interface otherwise, and says which.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from apex_rank.ranking.online.config import OnlineConfig
from apex_rank.ranking.online.engine import RankingEngine
from apex_rank.ranking.online.events import Interaction, record, record_many
from apex_rank.ranking.online.ingest import ingest
from apex_rank.ranking.online.memory_store import InProcessStore
from apex_rank.ranking.online.publisher import publish
from apex_rank.ranking.online.ranker import OnlineRanker
from apex_rank.ranking.online.redis_store import RedisStore, redact_url
from apex_rank.ranking.online.store import OnlineStore, open_store
from apex_rank.ranking.online.warmup import WarmUpConsumer, bundle_cf_loader
from apex_rank.synthetic import World


def _top(ranker: OnlineRanker, user: str, k: int) -> list[str]:
    return [i.song_id for i in ranker.rank(user, k).items]


def _warm_up(ranker: OnlineRanker, store: OnlineStore, engine: RankingEngine, cfg: OnlineConfig,
             user: str, exclude: set[str]) -> Iterator[str]:
    """The first cold song ranked below 50 for ``user`` is played by the 20 users closest to
    ``user`` in CF taste; the background warm-up consumer solves its factor, and ``user``'s list
    is polled until the song arrives through the ``als`` source (the ranker has no follower
    thread here: it follows by hand). Its rank before and after are reported."""
    cf, songs = engine.recommender.cf, engine.recommender.songs
    U = cf.user_factors / np.maximum(np.linalg.norm(cf.user_factors, axis=1, keepdims=True), 1e-12)
    anchor = cf.user_ids.index(user) if cf.has_user(user) else 0
    fans = [cf.user_ids[i] for i in np.argsort(-(U @ U[anchor]), kind="stable")[:21] if cf.user_ids[i] != user][:20]

    def where(song: str) -> tuple[int, str] | None:
        items = ranker.rank(user, cfg.max_k).items
        return next(((r, i.source) for r, i in enumerate(items, 1) if i.song_id == song), None)

    ranked = ranker.rank(user, cfg.max_k).items
    pos = songs.index_of([i.song_id for i in ranked])
    later = [(r, i) for r, (i, p) in enumerate(zip(ranked, pos, strict=True), 1)
             if r > 50 and p >= 0 and not songs.warm[p] and i.song_id not in exclude]
    if not later:
        yield f"   warm-up: no new song ranked below 50 for {user}; skipped"
        return
    rank0, item0 = later[0]
    song = item0.song_id
    with WarmUpConsumer(store, cf_loader=bundle_cf_loader(engine=engine), config=cfg).start():
        t0 = time.perf_counter()
        record_many(store, [Interaction(f, song) for f in fans], config=cfg)
        found = where(song)
        while (found is None or found[1] != "als") and time.perf_counter() - t0 < 30:
            time.sleep(0.02)
            ranker.follow_once()
            found = where(song)
        took = time.perf_counter() - t0
    after = "not ranked" if found is None else f"rank {found[0]} via '{found[1]}'"
    yield (f"   warm-up: new song {song}, rank {rank0} for {user} via '{item0.source}', played by the 20 "
           f"users closest in taste: {took:.2f} s later {after} (a CF factor from the ALS item step "
           "over its listeners, solved by the background consumer; no retrain)")


def online_stage(world: World, bundle_dir: str | Path, *,
                 redis_url: str = "redis://127.0.0.1:6379/0", seed: int = 0) -> Iterator[str]:
    """Run the online stage on the Recommender bundle in ``bundle_dir`` (built from the
    synthetic ``world``; see the module doc); yields report lines. The bundle is loaded once:
    the engine serves the online ranker and its Recommender answers the parity check."""
    engine = RankingEngine.load(bundle_dir)
    rec = engine.recommender
    ns = f"demo{seed}x{int(time.time())}"
    store = open_store(redis_url, ns, timeout_s=2.0, fallback=True)
    if isinstance(store, RedisStore):
        yield f"   store: Redis at {redact_url(redis_url)}, namespace {ns!r} (deleted at the end)"
    else:
        yield (f"   store: NO Redis reachable at {redact_url(redis_url)}: using the IN-PROCESS "
               "store (same interface, nothing shared or persisted)")
    cfg = OnlineConfig(namespace=ns, version_ttl_s=3600)
    try:
        res = publish(engine, store, config=cfg)
        yield (f"   published version {res.version}: {res.n_songs} songs, {res.n_users} users in "
               f"{res.seconds:.2f} s; the 'current' pointer moved atomically")
        ranker = OnlineRanker(store, config=cfg, engine=engine)
        users = rec.user_ids[:20]
        same = sum(_top(ranker, u, 10) == rec.recommend(u, k=10)["song_id"].to_list() for u in users)
        yield f"   parity: online rank == Recommender.recommend for {same}/{len(users)} users"
        user = users[0]
        before = _top(ranker, user, 5)
        yield f"   {user} top-5 before:       {before}"
        played = before[0]
        record(store, user, played, "play", config=cfg)
        after = _top(ranker, user, 5)
        yield f"   after playing {played}: {after}  (played song is history now)"
        # A new song close to the user's taste: a near-twin (small noise) of the best-ranked cold
        # song in their list, arriving through ingest (APEX priors computed now).
        top20 = _top(ranker, user, 20)
        top50 = _top(ranker, user, 50)
        pos = rec.songs.index_of(top50)
        cold = [s for s, i in zip(top50, pos, strict=True) if i >= 0 and not rec.songs.warm[i]]
        twin = cold[0] if cold else top50[0]
        kind = "cold" if cold else "warm"
        raw = world.embeddings.filter(world.embeddings["song_id"] == twin)
        rng = np.random.default_rng(seed)
        emb = np.asarray(raw["embedding"][0], np.float32)
        emb = emb + 0.02 * float(np.std(emb)) * rng.normal(size=emb.shape).astype(np.float32)
        new_id = f"new-song-{seed}"
        t0 = time.perf_counter()
        ing = ingest(ranker, new_id, embedding=emb)
        pri = ", ".join(f"{x:.2f}" for x in ing.priors)
        yield (f"   ingested {new_id} (a near-twin of {kind} song {twin}) in "
               f"{1000 * (time.perf_counter() - t0):.0f} ms; APEX priors [{pri}]; announced on the "
               "catalogue stream")
        final = _top(ranker, user, 50)
        where = f"now at rank {final.index(new_id) + 1}" if new_id in final else "not in the top 50"
        dropped = [s for s in top20 if s not in final[:20]]
        yield (f"   {user} after ingest: {new_id} {where} (twin {twin} at rank "
               f"{final.index(twin) + 1 if twin in final else '>50'}); left the top 20: {dropped}")
        yield from _warm_up(ranker, store, engine, cfg, user, exclude={new_id})
        d = ranker.rank("someone-new", 3)
        yield (f"   unknown user -> cold-user path: {[i.song_id for i in d.items]} "
               f"(sources {sorted({i.source for i in d.items})})")
        ranker.close()
    finally:
        if isinstance(store, RedisStore):
            batch = list(store.client.scan_iter(match=f"apexrank:{ns}:*", count=1000))
            for i in range(0, len(batch), 1000):
                store.client.delete(*batch[i : i + 1000])
        elif isinstance(store, InProcessStore):
            store.close()
