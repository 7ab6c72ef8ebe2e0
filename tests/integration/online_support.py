"""Helpers of the online tests: a private redis-server with append-only persistence, and a
small Recommender bundle built once per test process.

The shared server at 127.0.0.1:6379 is never restarted: fault tests start their own
``redis-server`` on a free loopback port in a temp folder and stop it afterwards.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A redis-server child process on 127.0.0.1 with ``appendonly yes`` in ``folder``."""

    def __init__(self, folder: Path, *, password: str | None = None) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server binary is not installed")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OwnRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--protected-mode", "yes", "--enable-debug-command", "local", "--logfile", str(self.folder / "redis.log"),
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"own redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@lru_cache(maxsize=4)
def bundle_dir(seed: int = 7) -> str:
    """A small Recommender bundle (synthetic world, seeded) saved in a temp folder.

    Cheap settings (a few APEX epochs, a small reranker, few ALS iterations): these tests check
    serving, not model quality, and must build in seconds on shared cores.
    """
    from apex_rank.ranking.cf import CFConfig
    from apex_rank.ranking.recommender import ApexFitConfig, Recommender, RecommenderConfig
    from apex_rank.ranking.reranker import RerankerConfig
    from apex_rank.synthetic import WorldConfig, make_world
    from apex_rank.threads import using_threads

    world = make_world(WorldConfig(n_songs=800, n_users=200, dim=32, interactions_per_user=30, seed=seed))
    cfg = RecommenderConfig(apex=ApexFitConfig(epochs=2, patience=1, batch_size=512),
                            reranker=RerankerConfig(n_estimators=15, early_stopping_rounds=5),
                            cf=CFConfig(factors=16, iterations=5), seed=seed)
    with using_threads(1):  # cores are shared: one thread avoids oversubscription in tiny fits
        rec = Recommender.build(world.songs, world.embeddings, world.interactions, config=cfg)
    out = Path(tempfile.mkdtemp(prefix=f"apexrank-online-bundle{seed}-"))
    rec.save(out)
    return str(out)
