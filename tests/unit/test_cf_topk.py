"""ALS retrieval. ``top_k_by_factors``: exact top-k of U·Vᵀ with exclusions, ties by item index,
a row's answer independent of the batch it is computed in, equal to the faiss.knn path it
replaced (issue 15). ``FactorIndexSource``: the approximate online source, its recall floor."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from apex_rank.config import from_dict, to_dict
from apex_rank.errors import ConfigError
from apex_rank.ranking import cf
from apex_rank.ranking.candidates import FactorIndexConfig, FactorIndexSource
from apex_rank.ranking.cf import top_k_by_factors
from apex_rank.ranking.online.config import OnlineConfig
from apex_rank.ranking.state import UserState
from bench.als_topk import factor_like, previous_top_k


def _brute(U: np.ndarray, V: np.ndarray, k: int, excl: list[list[int]]) -> list[list[int]]:
    S = U.astype(np.float64) @ V.astype(np.float64).T
    out = []
    for i, row in enumerate(S):
        cand = [j for j in range(V.shape[0]) if j not in set(excl[i])]
        cand.sort(key=lambda j: (-row[j], j))
        out.append(cand[:k])
    return out


def _mask(excl: list[list[int]], n_items: int) -> sp.csr_matrix:
    indptr = np.cumsum([0] + [len(e) for e in excl])
    cols = np.asarray([j for e in excl for j in e], dtype=np.int64)
    return sp.csr_matrix((np.ones(len(cols), np.float32), cols, indptr), shape=(len(excl), n_items))


def test_matches_brute_force_with_exclusions_and_ties() -> None:
    rng = np.random.default_rng(3)
    V = rng.standard_normal((3000, 16)).astype(np.float32)
    V[100:140] = V[7]  # 41 exact ties: broken by item index
    U = rng.standard_normal((60, 16)).astype(np.float32)
    U[0] = V[7] * 3  # user 0 ranks the tied block first
    excl = [sorted(rng.choice(3000, size=int(rng.integers(0, 400)), replace=False).tolist()) for _ in range(60)]
    excl[0] = [100, 105]
    names = [f"s{j}" for j in range(3000)]
    ids, sc = top_k_by_factors(U, V, names, 50, exclude=_mask(excl, 3000))
    want = _brute(U, V, 50, excl)
    assert [[int(x[1:]) for x in row] for row in ids.tolist()] == want
    assert ids[0, :5].tolist() == ["s7", "s101", "s102", "s103", "s104"]
    assert np.all(np.diff(sc, axis=1) <= 0)
    # one row alone equals its row of the batch (BLAS products of 1 and of 60 rows differ in the last bit)
    for i in (0, 13, 59):
        one, one_sc = top_k_by_factors(U[i : i + 1], V, names, 50, exclude=_mask([excl[i]], 3000))
        assert one[0].tolist() == ids[i].tolist()
        np.testing.assert_array_equal(one_sc[0], sc[i])


def test_pads_when_fewer_items_remain() -> None:
    V = np.eye(4, dtype=np.float32)
    U = np.asarray([[1, 2, 3, 4]], dtype=np.float32)
    ids, sc = top_k_by_factors(U, V, ["a", "b", "c", "d"], 6, exclude=_mask([[3, 0]], 4))
    assert ids[0].tolist() == ["c", "b", "", "", "", ""]
    assert sc[0, :2].tolist() == [3.0, 2.0] and np.isneginf(sc[0, 2:]).all()


@pytest.mark.parametrize(
    ("n_items", "k", "chunk"), [(3000, 50, 1024), (20000, 100, 7), (20000, 10, 1024), (2000, 500, 64)]
)
def test_blas_path_equals_the_previous_faiss_knn_path(n_items: int, k: int, chunk: int) -> None:
    """Issue 15: the BLAS path returns what the faiss.knn path returned (ids, order, scores)."""
    V, U = factor_like(n_items, 40, f=32, seed=n_items + k)
    V[500:530] = V[11]  # a tied block
    U[0] = V[11] * 2.0
    rng = np.random.default_rng(k)
    excl = [sorted(rng.choice(n_items, size=int(rng.integers(0, 300)), replace=False).tolist()) for _ in range(40)]
    excl[0] = [11, 515]
    names = [f"s{j}" for j in range(n_items)]
    ids, sc = top_k_by_factors(U, V, names, k, exclude=_mask(excl, n_items), chunk=chunk)
    want_i, want_s = previous_top_k(U, V, k, _mask(excl, n_items))
    lookup = np.asarray(names + [""], dtype=object)
    assert ids.tolist() == lookup[want_i].tolist()
    np.testing.assert_array_equal(sc, want_s)  # the same float64 rescoring: equal bit for bit


def test_a_batch_equals_the_concatenation_of_single_users() -> None:
    """float32 BLAS products of one row and of many rows differ in the last bit; the float64
    rescoring of every candidate within the error bound keeps each row's answer identical."""
    V, U = factor_like(30000, 48, f=64, seed=5)
    V[100:120] = V[3]
    U[1] = V[3]
    rng = np.random.default_rng(2)
    excl = [sorted(rng.choice(30000, size=int(rng.integers(0, 200)), replace=False).tolist()) for _ in range(48)]
    names = [f"s{j}" for j in range(30000)]
    ids, sc = top_k_by_factors(U, V, names, 100, exclude=_mask(excl, 30000))
    for chunk in (5, 1024):
        ids2, sc2 = top_k_by_factors(U, V, names, 100, exclude=_mask(excl, 30000), chunk=chunk)
        assert ids2.tolist() == ids.tolist()
        np.testing.assert_array_equal(sc2, sc)
    for i in range(48):
        one, one_sc = top_k_by_factors(U[i : i + 1], V, names, 100, exclude=_mask([excl[i]], 30000))
        assert one[0].tolist() == ids[i].tolist(), i
        np.testing.assert_array_equal(one_sc[0], sc[i])


def test_a_misleading_sample_falls_back_to_a_full_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row whose sampled scores are its best ones gets a threshold above its k-th best: it is
    searched again over all items, and the answer is still exact."""
    n_items, k = 20000, 120
    rng = np.random.default_rng(9)
    V = rng.standard_normal((n_items, 16)).astype(np.float32)
    U = rng.standard_normal((6, 16)).astype(np.float32)
    step = max(cf.SAMPLE_OVERSHOOT * k, cf.SAMPLE_MIN_TARGET) // cf.SAMPLE_RANK
    V[: 10 * step : step] = U[0] * 3.0  # 10 sampled items are user 0's best: t is the 8th of them
    calls: list[int] = []
    inner = cf._row_candidates

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(cf, "_row_candidates", counting)
    excl = [[] for _ in range(6)]
    ids, _ = top_k_by_factors(U, V, [f"s{j}" for j in range(n_items)], k, exclude=_mask(excl, n_items))
    assert len(calls) >= 1
    assert [[int(x[1:]) for x in row] for row in ids.tolist()] == _brute(U, V, k, excl)


def test_leaves_the_faiss_blas_threshold_alone() -> None:
    """Nothing process-global changes: FAISS's threshold is what it was (other threads' Flat
    searches depend on it for their batch-equals-single results)."""
    import faiss

    before = faiss.cvar.distance_compute_blas_threshold
    V, U = factor_like(5000, 64, f=16)
    top_k_by_factors(U, V, [f"s{j}" for j in range(5000)], 20)
    assert faiss.cvar.distance_compute_blas_threshold == before


# ---------------------------------------------------------------------------- approximate (IVF)
def test_ivf_source_recall_floor_at_20k_songs() -> None:
    """The online ``als`` source with its default settings finds >= 95 % of the exact top-100
    (history excluded) on factor-like data; scanning 64 of 512 lists, it is really approximate."""
    V, U = factor_like(20000, 300, seed=1)
    names = [f"s{j:05d}" for j in range(20000)]
    rng = np.random.default_rng(4)
    hist = [sorted(rng.choice(20000, size=30, replace=False).tolist()) for _ in range(300)]
    states = [UserState(f"u{i}", U[i], None, tuple(names[j] for j in h), len(h)) for i, h in enumerate(hist)]
    src = FactorIndexSource(names, V, FactorIndexConfig())
    assert src.index.factory == "IVF512,Flat" and src.index.nprobe == 64
    got, got_sc = src.retrieve_batch(states, 100, [set(s.history) for s in states])
    want, _ = top_k_by_factors(U, V, names, 100, exclude=_mask(hist, 20000))
    recall = np.mean([len(set(g) & set(w)) / 100 for g, w in zip(got.tolist(), want.tolist(), strict=True)])
    assert recall >= 0.95, recall
    # the extra coordinate leaves the scores the inner products u·v
    pos = {s: j for j, s in enumerate(names)}
    j = np.asarray([pos[s] for s in got[0]])
    np.testing.assert_allclose(got_sc[0], V[j] @ U[0], rtol=1e-5, atol=1e-6)
    assert not set(got[0]) & set(states[0].history)


def test_factor_index_config_rules() -> None:
    cfg = FactorIndexConfig()
    assert cfg.lists_for(100_000) == 1264 and cfg.lists_for(20_000) == 512 and cfg.lists_for(200) == 5
    assert FactorIndexConfig(nlist=300).lists_for(100) == 100
    with pytest.raises(ConfigError, match=r"als_index.nprobe must be >= 1, got 0"):
        FactorIndexConfig(nprobe=0)
    with pytest.raises(ConfigError, match=r"als_index.nlist must be >= 0"):
        FactorIndexConfig(nlist=-1)
    online = from_dict(OnlineConfig, {"als_index": {"min_songs": 10, "nprobe": 8}})
    assert online.als_index == FactorIndexConfig(min_songs=10, nprobe=8)
    assert from_dict(OnlineConfig, to_dict(online)) == online
    with pytest.raises(ConfigError, match="bogus"):
        from_dict(OnlineConfig, {"als_index": {"bogus": 1}})
