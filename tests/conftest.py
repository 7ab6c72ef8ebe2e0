"""Shared fixtures: a small synthetic world and a real Redis connection with a private prefix.

Redis tests use ``$APEX_RANK_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), a key prefix
unique to the test, and delete only their own keys afterwards: never FLUSHALL/FLUSHDB on the
shared server. Without a reachable server they are skipped with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from apex_rank.threads import prefer_passive_openmp

prefer_passive_openmp()  # before anything imports torch / lightgbm / faiss (see apex_rank.threads)

from apex_rank.synthetic import World, WorldConfig, make_world  # noqa: E402

REDIS_URL = os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session", autouse=True)
def _thread_pools() -> None:
    """Set torch/BLAS/OpenMP pools once, as the CLI does ($APEX_RANK_THREADS or all cores)."""
    from apex_rank.threads import configure_threads

    configure_threads()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One thread for a module whose numbers were fixed at one thread (torch reductions and
    LightGBM histograms sum in a thread-dependent order) or that trains many tiny models."""
    from apex_rank.threads import using_threads

    with using_threads(1):
        yield


@pytest.fixture(scope="session")
def small_world() -> World:
    """800 songs, 200 users, 32-d embeddings, 20% cold songs (seeded)."""
    return make_world(WorldConfig(n_songs=800, n_users=200, dim=32, interactions_per_user=30, seed=7))


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as err:
        pytest.skip(f"no Redis server reachable at {REDIS_URL}: {err}")
    return REDIS_URL


@pytest.fixture()
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A namespace unique to this test; every key under ``apexrank-test:{id}`` is deleted after."""
    import redis

    ns = f"test{uuid.uuid4().hex[:12]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    for pattern in (f"apexrank:{ns}:*", f"apexrank-test:{ns}:*"):
        batch = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(batch), 1000):
            client.delete(*batch[i : i + 1000])
