"""The online stage of ``apex-rank demo``: publish, rank, play a song, ingest a song, rank again.

:func:`online_demo` yields the lines the CLI prints (library code does not print). It uses
Redis when one answers at ``redis_url`` (a private namespace, deleted at the end) and an
in-process store with the same interface otherwise, and says which.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import OnlineConfig
from .events import ingest, record
from .publisher import publish
from .ranker import OnlineRanker
from .store import InProcessStore, RedisStore, open_store, redact_url


def _top(ranker: OnlineRanker, user: str, k: int) -> list[str]:
    return [i.song_id for i in ranker.rank(user, k).items]


def online_demo(world: Any, predictor: Any, bundle_dir: str | Path, *,
                redis_url: str = "redis://127.0.0.1:6379/0", seed: int = 0) -> Iterator[str]:
    """Run the online stage on a synthetic ``world`` (see the module doc); yields report lines.

    ``bundle_dir`` is used when it already holds a Recommender bundle, else one is built there
    from ``world`` with ``predictor`` as the APEX model.
    """
    from apex_rank.ranking.recommender import Recommender, load_recommender

    from .recommender_engine import RecommenderEngine

    bundle = Path(bundle_dir)
    if not (bundle / "manifest.json").is_file():
        t0 = time.perf_counter()
        Recommender.build(world.songs, world.embeddings, world.interactions, apex=predictor).save(bundle)
        yield f"   built a Recommender bundle in {bundle} ({time.perf_counter() - t0:.1f} s)"
    engine = RecommenderEngine.load(bundle)
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
        rec = load_recommender(bundle)
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
