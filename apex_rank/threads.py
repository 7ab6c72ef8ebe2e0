"""The one place that decides thread pools: torch intra-op threads, BLAS (OpenBLAS/MKL),
OpenMP (faiss, LightGBM, implicit) and the LightGBM ``num_threads`` parameter.

Call :func:`configure_threads` once at program start (the CLI does). Libraries read
:func:`thread_count` instead of guessing. implicit's ALS runs its own parallel loop and wants
BLAS single-threaded (it warns otherwise): wrap its fit in :func:`blas_single_threaded`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

_THREADS: int | None = None


def prefer_passive_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``), and idle
    OpenBLAS threads too (``OPENBLAS_THREAD_TIMEOUT=4``: numpy's OpenBLAS runs its own pthread
    pool, whose workers otherwise spin for 2^28 cycles after every call), unless the user chose.

    Spinning workers of one library (LightGBM, torch, faiss, numpy's BLAS) steal the cores
    another library or process needs; on a 2-core machine shared with other work that made
    LightGBM and torch 10-16x slower in our measurements, and the exact ALS top-k
    (``top_k_by_factors``, numpy matrix products between FAISS and LightGBM calls) 1.3x slower
    in batches and 2.8x for one user (``bench.als_topk``). The runtimes read the variables
    when they load, so this must run before numpy, torch, faiss or lightgbm is imported: the
    CLI and the test suite call it first thing.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _default_threads() -> int:
    env = os.environ.get("APEX_RANK_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            log.warning("APEX_RANK_THREADS=%r is not an integer; ignoring it", env)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def thread_count() -> int:
    """Threads that compute-heavy libraries should use (set by :func:`configure_threads`)."""
    return _THREADS if _THREADS is not None else _default_threads()


def configure_threads(n_threads: int | None = None) -> int:
    """Set torch, faiss (OpenMP) and BLAS pools to ``n_threads`` (default: all usable cores,
    or ``$APEX_RANK_THREADS``). Returns the number chosen.
    """
    global _THREADS
    n = int(n_threads) if n_threads is not None else _default_threads()
    if n < 1:
        from apex_rank.errors import ConfigError

        raise ConfigError(f"n_threads must be >= 1, got {n}")
    _THREADS = n
    import torch

    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:  # faiss is a dependency, but keep core importable without it
        pass
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")
    log.debug("thread pools set to %d", n)
    return n


@contextlib.contextmanager
def using_threads(n_threads: int) -> Iterator[int]:
    """Run the block with every pool set to ``n_threads``, then restore the previous setting."""
    before = thread_count()
    try:
        yield configure_threads(n_threads)
    finally:
        configure_threads(before)


@contextlib.contextmanager
def blas_single_threaded() -> Iterator[None]:
    """Limit BLAS to one thread inside the block (what implicit's ALS asks for)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def thread_report() -> dict[str, object]:
    """What the pools are set to now, for benchmark and report headers."""
    import torch
    from threadpoolctl import threadpool_info

    info: dict[str, object] = {"apex_rank_threads": thread_count(), "torch": torch.get_num_threads()}
    for pool in threadpool_info():
        info[f"{pool.get('user_api')}:{pool.get('internal_api')}"] = pool.get("num_threads")
    return info
