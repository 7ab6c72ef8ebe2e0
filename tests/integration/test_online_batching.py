"""Micro-batching in RankingEngine: concurrent callers are ranked together by whichever of
them leads, each gets exactly its own answer, and a lone caller ranks alone."""

from __future__ import annotations

import threading

import pytest

from apex_rank.ranking.online.engine import RankingEngine
from apex_rank.ranking.pipeline import ServingPipeline

from .online_support import bundle_dir

pytestmark = pytest.mark.integration


def test_concurrent_callers_share_calls_and_get_their_own_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = RankingEngine.load(bundle_dir(7), max_batch=8)
    rec = engine.recommender
    users = rec.user_ids[:48]
    states = {u: rec.user_state(u) for u in users}
    want = {u: [(s, sc, src) for s, sc, src in rec.recommend(u, k=7).select("song_id", "score", "source").iter_rows()]
            for u in users}
    calls: list[int] = []
    inner = ServingPipeline.rank

    def counting(self, states_, k, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(states_))
        return inner(self, states_, k, **kwargs)

    monkeypatch.setattr(ServingPipeline, "rank", counting)  # the engine's one ranking call per batch
    got: dict[str, list[tuple[str, float, str]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(12)

    def caller(j: int) -> None:
        start.wait()
        try:
            for u in users[j::12]:
                got[u] = engine.rank_user(u, states[u], 7, ())
        except BaseException as err:  # noqa: BLE001 - asserted below
            errors.append(err)

    threads = [threading.Thread(target=caller, args=(j,)) for j in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert got == want  # every caller got exactly its own ranking
    assert sum(calls) == len(users) and max(calls) > 1 and max(calls) <= 8  # shared, bounded calls
    calls.clear()
    assert engine.rank_user(users[0], states[users[0]], 7, ()) == want[users[0]] and calls == [1]
