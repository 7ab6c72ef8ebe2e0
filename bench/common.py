"""Helpers shared by the benchmarks: timing medians and a header describing the machine."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function: one warm-up each, then ``repeats`` rounds running
    every function once, the order rotated each round (a load change hits all alike)."""
    names = list(fns)
    for name in names:
        fns[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            out[name].append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def machine_header() -> dict[str, Any]:
    """Machine, device, thread settings and library versions, printed at the top of each bench."""
    import os

    import torch

    from apex_rank.manifest import library_versions
    from apex_rank.threads import thread_report

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "device": dev,
        "threads": thread_report(),
        "versions": library_versions(),
    }


def print_header(title: str) -> dict[str, Any]:
    import json

    head = machine_header()
    print(f"# {title}")
    print(json.dumps(head, indent=None, default=str))
    return head
