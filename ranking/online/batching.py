"""Micro-batching of concurrent ranking requests, without a worker thread.

A request arriving while no other is being ranked ranks itself in its own thread (no handoff:
at concurrency 1 a thread switch cost ~1.4 ms of a ~5 ms request). Requests arriving meanwhile
wait; the ranking thread ("leader") takes up to ``max_batch`` waiting requests with the same
``k`` and ``cold_share`` into one call of the ranking function until its own request is
answered, then steps down and a waiting request takes over. Part of the cost of a ranking call
is fixed (many small numpy and FAISS calls), so a batch of 8 costs well under 8 single calls;
results are identical when every candidate, feature and score is computed per row (a batch
equals the concatenation of single-user results), as :mod:`.engine`'s are. Nobody waits for a
batch to fill.

Example
-------
>>> batcher = MicroBatcher(lambda states, k, excludes, cold: {s.user_id: [] for s in states})
>>> from apex_rank.ranking.state import UserState
>>> batcher.rank(UserState("u1", None, None), 10, frozenset(), None)
[]
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from apex_rank.ranking.state import UserState

R = TypeVar("R")

#: ``rank(states, k, excludes, cold_share)`` -> the answer of each state, by user id.
RankFn = Callable[[list[UserState], int, list[frozenset[str]], float | None], dict[str, R]]


@dataclass
class _Request(Generic[R]):
    state: UserState
    k: int
    exclude: frozenset[str]
    cold_share: float | None
    future: Future[R]


class MicroBatcher(Generic[R]):
    """Ranks concurrent requests together (see the module doc).

    Parameters
    ----------
    rank:
        The ranking function: a batch of states, one ``k``, one exclusion set per state and one
        ``cold_share`` -> each state's answer by user id.
    max_batch:
        Most requests ranked in one call (1: every request alone, in its caller's thread).
    """

    def __init__(self, rank: RankFn[R], max_batch: int = 16) -> None:
        self._rank = rank
        self.max_batch = int(max_batch)
        self._pending: list[_Request[R]] = []
        self._cond = threading.Condition()
        self._leading = False  # a request thread is ranking the pending requests

    def rank(self, state: UserState, k: int, exclude: frozenset[str], cold_share: float | None) -> R:
        """The answer for one request; concurrent callers are ranked together."""
        if self.max_batch <= 1:
            return self._rank([state], k, [exclude], cold_share)[state.user_id]
        me: _Request[R] = _Request(state, k, exclude, cold_share, Future())
        with self._cond:
            self._pending.append(me)
            while not me.future.done() and self._leading:
                self._cond.wait()  # the leader ranks us, or steps down and one of us leads
            if me.future.done():
                return me.future.result()
            self._leading = True
        try:
            while not me.future.done():  # lead until our own request is answered
                with self._cond:
                    batch = self._take_batch()
                self._answer(batch)
                with self._cond:
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()
        return me.future.result()

    def _answer(self, batch: Sequence[_Request[R]]) -> None:
        try:
            res = self._rank([r.state for r in batch], batch[0].k, [r.exclude for r in batch],
                             batch[0].cold_share)
            for r in batch:
                r.future.set_result(res[r.state.user_id])
        except BaseException as err:  # noqa: BLE001 - handed to every caller of the batch
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(err)

    def _take_batch(self) -> list[_Request[R]]:
        """Up to ``max_batch`` pending requests with the first one's ``k`` and ``cold_share``, a
        user id at most once (answers are keyed by user id); removed from the pending list.
        Hold ``_cond``."""
        k0, c0 = self._pending[0].k, self._pending[0].cold_share
        batch: list[_Request[R]] = []
        rest: list[_Request[R]] = []
        seen: set[str] = set()
        for r in self._pending:
            if r.k == k0 and r.cold_share == c0 and r.state.user_id not in seen and len(batch) < self.max_batch:
                batch.append(r)
                seen.add(r.state.user_id)
            else:
                rest.append(r)
        self._pending = rest
        return batch
