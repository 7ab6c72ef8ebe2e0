"""``top_k_by_factors``: exact top-k of U·Vᵀ with exclusions, ties by item index, and a row's
answer independent of the batch it is computed in."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from apex_rank.ranking.cf import top_k_by_factors


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
    # one row alone equals its row of the batch (BLAS batch vs single kernels differ in the last bit)
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
