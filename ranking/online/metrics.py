"""Request metrics of the HTTP service, summed over its workers through the store.

:class:`Metrics` is a tiny thread-safe Prometheus registry (request counters and latency
histograms per route); :class:`MetricsFlusher` shares one worker's registry with the others:
each worker writes a snapshot of its own registry to the store every ``flush_s`` seconds,
stamped with the store's clock (so hosts' clocks do not matter), and ``GET /metrics`` adds the
others' latest snapshots to its own live numbers; a snapshot older than five periods is a dead
worker's and is dropped. Everything goes through the store contract
(:meth:`~.store.OnlineStore.write_worker_metrics` and its siblings).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

from .store import OnlineStore

log = logging.getLogger(__name__)


_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


Snapshot = dict[str, Any]  # {"requests": [[route, status, n], ...], "hist", "sums", "degraded"}


class Metrics:
    """Tiny thread-safe Prometheus registry: request counters and latency histograms."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.hist: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.degraded = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            h = self.hist.setdefault(route, [0] * (len(_BUCKETS) + 1))
            for i, b in enumerate(_BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[-1] += 1
            self.sums[route] = self.sums.get(route, 0.0) + seconds

    def snapshot(self) -> Snapshot:
        """A JSON-ready copy of the registry (what a worker writes to Redis)."""
        with self._lock:
            return {"requests": [[r, s, n] for (r, s), n in self.requests.items()],
                    "hist": {r: list(h) for r, h in self.hist.items()},
                    "sums": dict(self.sums), "degraded": self.degraded}

    def render(self, others: Sequence[Snapshot] = ()) -> str:
        """Prometheus text of this registry plus ``others`` (other workers' snapshots, already
        checked by :func:`parse_snapshot`); ``apexrank_workers`` counts the registries summed."""
        requests: dict[tuple[str, int], int] = {}
        hist: dict[str, list[int]] = {}
        sums: dict[str, float] = {}
        degraded = 0
        for snap in (self.snapshot(), *others):
            for route, status, n in snap["requests"]:
                requests[(route, status)] = requests.get((route, status), 0) + n
            for route, h in snap["hist"].items():
                acc = hist.setdefault(route, [0] * (len(_BUCKETS) + 1))
                hist[route] = [a + b for a, b in zip(acc, h, strict=True)]
            for route, x in snap["sums"].items():
                sums[route] = sums.get(route, 0.0) + x
            degraded += snap["degraded"]

        lines = ["# HELP apexrank_requests_total HTTP requests by route and status.",
                 "# TYPE apexrank_requests_total counter"]
        for (route, status), n in sorted(requests.items()):
            lines.append(f'apexrank_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += ["# HELP apexrank_errors_total HTTP responses with status >= 400.",
                  "# TYPE apexrank_errors_total counter"]
        errs: dict[str, int] = {}
        for (route, status), n in requests.items():
            if status >= 400:
                errs[route] = errs.get(route, 0) + n
        for route, n in sorted(errs.items()):
            lines.append(f'apexrank_errors_total{{route="{route}"}} {n}')
        lines += ["# HELP apexrank_degraded_total Rankings answered from the fallback list.",
                  "# TYPE apexrank_degraded_total counter",
                  f"apexrank_degraded_total {degraded}",
                  "# HELP apexrank_request_seconds Request latency.",
                  "# TYPE apexrank_request_seconds histogram"]
        for route, h in sorted(hist.items()):
            for b, n in zip(_BUCKETS, h, strict=False):
                lines.append(f'apexrank_request_seconds_bucket{{route="{route}",le="{b}"}} {n}')
            lines.append(f'apexrank_request_seconds_bucket{{route="{route}",le="+Inf"}} {h[-1]}')
            lines.append(f'apexrank_request_seconds_sum{{route="{route}"}} {sums.get(route, 0.0):.6f}')
            lines.append(f'apexrank_request_seconds_count{{route="{route}"}} {h[-1]}')
        lines += ["# HELP apexrank_workers Worker processes whose metrics are summed here.",
                  "# TYPE apexrank_workers gauge",
                  f"apexrank_workers {1 + len(others)}"]
        return "\n".join(lines) + "\n"


def parse_snapshot(raw: bytes | str) -> Snapshot | None:
    """A snapshot read back from Redis, or ``None`` if it is not one this version can add
    (malformed JSON, wrong types, another histogram layout)."""
    try:
        d = json.loads(raw)
        snap: Snapshot = {
            "requests": [[str(r), int(s), int(n)] for r, s, n in d["requests"]],
            "hist": {str(r): [int(x) for x in h] for r, h in d["hist"].items()},
            "sums": {str(r): float(x) for r, x in d["sums"].items()},
            "degraded": int(d["degraded"]),
            "at": float(d.get("at", 0.0)),
        }
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if any(len(h) != len(_BUCKETS) + 1 for h in snap["hist"].values()):
        return None
    return snap


class MetricsFlusher:
    """Shares one worker's :class:`Metrics` through the store (see the module doc).

    A daemon thread writes the registry's snapshot into the hash ``apexrank:<NS>:{<NS>}:metrics``
    (field: the worker) every ``flush_s`` seconds; :meth:`others` reads the other workers'
    snapshots written within the last ``5 * flush_s`` seconds (one HGETALL, no key scan), all
    through the store contract (:meth:`~.store.OnlineStore.write_worker_metrics` and its
    siblings), so ages are measured on the store's clock. Store failures are logged and never
    raised: ``/metrics`` then shows this worker's numbers only.
    """

    def __init__(self, metrics: Metrics, store: OnlineStore, *, flush_s: float = 2.0,
                 worker: str | None = None) -> None:
        if flush_s <= 0:
            raise ValueError(f"flush_s must be > 0, got {flush_s}")
        self.metrics = metrics
        self.store = store
        self.flush_s = float(flush_s)
        self.worker = worker or f"{socket.gethostname()}-{os.getpid()}"
        self.key = store.keys.metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="apexrank-metrics", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and remove this worker's snapshot (its numbers leave the sum now
        rather than when they grow stale)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.flush_s + 5.0)
            self._thread = None
        with contextlib.suppress(Exception):
            self.store.drop_worker_metrics([self.worker])

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush_now()

    def flush_now(self) -> bool:
        """Write the snapshot now; ``False`` (logged) if Redis did not take it."""
        try:
            self.store.write_worker_metrics(self.worker, self.metrics.snapshot())
        except Exception as err:  # noqa: BLE001 - metrics must never take the worker down
            if not self._failing:
                log.warning("cannot write metrics to %s: %s: %s", self.key, type(err).__name__, err)
            self._failing = True
            return False
        self._failing = False
        return True

    def others(self) -> list[Snapshot]:
        """The latest snapshots of the other live workers; ``[]`` if Redis is unreachable."""
        try:
            now, raws = self.store.read_worker_metrics()
        except Exception as err:  # noqa: BLE001 - render the local numbers instead
            log.debug("cannot read other workers' metrics: %s: %s", type(err).__name__, err)
            return []
        out: list[Snapshot] = []
        stale: list[str] = []
        for worker, raw in raws.items():
            if worker == self.worker:
                continue
            snap = parse_snapshot(raw)
            if snap is None or now - snap["at"] > 5 * self.flush_s:
                stale.append(worker)  # a dead worker's (or unreadable): dropped from the sum
            else:
                out.append(snap)
        if stale:
            with contextlib.suppress(Exception):
                self.store.drop_worker_metrics(stale)
        return out
