"""Helpers of the online tests: a private redis-server with append-only persistence (plain,
password or TLS), and a small Recommender bundle built once per test process.

The shared server at 127.0.0.1:6379 is never restarted: fault tests start their own
``redis-server`` on a free loopback port in a temp folder and stop it afterwards.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from apex_rank.synthetic import World


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed_cert(folder: Path, name: str = "redis") -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1 in ``folder`` (made once, with the
    ``openssl`` binary); returns ``(cert, key)``. Skips the test when openssl is missing."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl binary is not installed (needed for the TLS redis-server)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    if not (cert.exists() and key.exists()):
        done = subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            pytest.skip(f"openssl could not make a self-signed certificate: {done.stderr.strip()[-300:]}")
    return cert, key


class OwnRedis:
    """A redis-server child process on 127.0.0.1 with ``appendonly yes`` in ``folder``.

    ``tls=True`` serves TLS only (``--port 0 --tls-port``) with a self-signed certificate made
    in ``folder``; ``url`` is then ``rediss://...?ssl_ca_certs=<that certificate>``, so a
    client verifies the server against it. The test is skipped when openssl is missing or
    redis-server refuses the TLS options (built without TLS).
    """

    def __init__(self, folder: Path, *, password: str | None = None, tls: bool = False) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server binary is not installed")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.tls = tls
        auth = f":{password}@" if password else ""
        self.cert: Path | None = None
        self.key: Path | None = None
        if tls:
            self.cert, self.key = self_signed_cert(self.folder)
            self.url = (f"rediss://{auth}127.0.0.1:{self.port}/0"
                        f"?ssl_ca_certs={quote(str(self.cert), safe='/')}")
        else:
            self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def _listen_args(self) -> list[str]:
        if not self.tls:
            return ["--port", str(self.port)]
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-auth-clients", "no"]

    def start(self) -> OwnRedis:
        stderr_path = self.folder / "redis.stderr"
        with open(stderr_path, "wb") as stderr:  # config errors go here, before the logfile opens
            self.proc = subprocess.Popen(
                ["redis-server", *self._listen_args(), "--bind", "127.0.0.1", "--dir", str(self.folder),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                 "--protected-mode", "yes", "--enable-debug-command", "local",
                 "--logfile", str(self.folder / "redis.log"),
                 *(["--requirepass", self.password] if self.password else [])],
                stdout=subprocess.DEVNULL, stderr=stderr)
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # exited: a refused option or a taken port
                break
            try:
                client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=1)
                try:
                    if client.ping():
                        return self
                finally:
                    client.close()
            except redis.RedisError:
                time.sleep(0.05)
        said = self._said()
        self.stop()
        if self.tls and "tls" in said.lower() and "bad directive" in said.lower():
            pytest.skip(f"redis-server refuses the TLS options (built without TLS?): {said[-300:]}")
        raise RuntimeError(f"own redis-server on port {self.port} did not start: {said[-500:]}")

    def _said(self) -> str:
        """The tail of the server's stderr and log (why it did not start)."""
        parts = []
        for name in ("redis.stderr", "redis.log"):
            try:
                parts.append((self.folder / name).read_text(errors="replace")[-1000:])
            except OSError:
                pass
        return "\n".join(p.strip() for p in parts if p.strip())

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
def bundle_world(seed: int = 7) -> World:
    """The synthetic world :func:`bundle_dir` builds its bundle from."""
    from apex_rank.synthetic import WorldConfig, make_world

    return make_world(WorldConfig(n_songs=800, n_users=200, dim=32, interactions_per_user=30, seed=seed))


@lru_cache(maxsize=4)
def bundle_dir(seed: int = 7) -> str:
    """A small Recommender bundle (synthetic world, seeded) saved in a temp folder.

    Cheap settings (a few APEX epochs, a small reranker, few ALS iterations): these tests check
    serving, not model quality, and must build in seconds on shared cores.
    """
    from apex_rank.ranking.cf import CFConfig
    from apex_rank.ranking.recommender import ApexFitConfig, Recommender, RecommenderConfig
    from apex_rank.ranking.reranker import RerankerConfig
    from apex_rank.threads import using_threads

    world = bundle_world(seed)
    cfg = RecommenderConfig(apex=ApexFitConfig(epochs=2, patience=1, batch_size=512),
                            reranker=RerankerConfig(n_estimators=15, early_stopping_rounds=5),
                            cf=CFConfig(factors=16, iterations=5), seed=seed)
    with using_threads(1):  # cores are shared: one thread avoids oversubscription in tiny fits
        rec = Recommender.build(world.songs, world.embeddings, world.interactions, config=cfg)
    out = Path(tempfile.mkdtemp(prefix=f"apexrank-online-bundle{seed}-"))
    rec.save(out)
    return str(out)


class BackgroundWriter:
    """A thread recording plays through its own store while a test does something else (a
    publish, a failover): users in turn, songs stepping by 7. ``counts[user]`` grows by one per
    acknowledged play (start it with the plays recorded before); what the thread raised is in
    ``failures``. A context manager: started on entry, stopped and joined on exit."""

    def __init__(self, url: str, namespace: str, users: list[str], songs: list[str], config: Any,
                 counts: dict[str, int]) -> None:
        self.url, self.namespace, self.users, self.songs, self.config = url, namespace, users, songs, config
        self.counts = counts
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        from apex_rank.ranking.online import RedisStore, record

        w = RedisStore(self.url, self.namespace)
        i = 0
        try:
            while not self._stop.is_set():
                u = self.users[i % len(self.users)]
                record(w, u, self.songs[(7 * i) % len(self.songs)], "play", config=self.config)
                self.counts[u] += 1
                i += 1
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.failures.append(err)
        finally:
            w.close()

    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
