"""CandidateIndex: factory strings, padding, add without rebuild, remove, I/O round trip, recall floors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apex_rank.errors import ArtifactError, ConfigError, SchemaError, UnknownIdError
from apex_rank.ranking.index import CandidateIndex, l2_normalize

RNG = np.random.default_rng(0)
X = RNG.normal(size=(2000, 16)).astype(np.float32)
IDS = [f"s{i:05d}" for i in range(len(X))]
Q = RNG.normal(size=(50, 16)).astype(np.float32)


def _exact(k: int) -> np.ndarray:
    S = l2_normalize(Q) @ l2_normalize(X).T
    return np.argsort(-S, axis=1)[:, :k]


@pytest.mark.parametrize(
    "factory,floor", [("Flat", 1.0), ("IVF32,Flat", 0.8), ("HNSW16", 0.9), ("IVF32,PQ8x4", 0.25), ("PQ8x4", 0.25)]
)
def test_recall_floor_and_roundtrip(factory: str, floor: float, tmp_path: Path) -> None:
    idx = CandidateIndex(16, factory, nprobe=8, ef_search=128)
    idx.add(IDS, X)
    D, hits = idx.search(Q, 10)
    truth = _exact(10)
    recall = np.mean([len(set(hits[r]) & {IDS[j] for j in truth[r]}) / 10 for r in range(len(Q))])
    assert recall >= floor, recall
    assert D.dtype == np.float32 and hits.shape == (50, 10)
    idx.save(tmp_path / "i.faiss")
    back = CandidateIndex.load(tmp_path / "i.faiss", device="cpu")
    D2, hits2 = back.search(Q, 10)
    assert hits2.tolist() == hits.tolist()
    np.testing.assert_allclose(D2, D, rtol=1e-5)


def test_padding_when_fewer_than_k() -> None:
    idx = CandidateIndex(16, "Flat")
    idx.add(IDS[:3], X[:3])
    D, hits = idx.search(Q[:2], 5)
    assert hits[:, 3:].tolist() == [["", ""], ["", ""]] and np.isneginf(D[:, 3:]).all()
    empty = CandidateIndex(16, "Flat")
    D, hits = empty.search(Q[:1], 2)
    assert hits.tolist() == [["", ""]]


def test_add_without_rebuild_and_remove() -> None:
    idx = CandidateIndex(16, "IVF16,Flat")
    idx.add(IDS[:1000], X[:1000])
    idx.add(IDS[1000:], X[1000:])
    assert len(idx) == 2000
    _, hits = idx.search(X[1500], 1)
    assert hits[0, 0] == IDS[1500]
    assert idx.remove([IDS[1500]]) == 1
    _, hits = idx.search(X[1500], 3)
    assert IDS[1500] not in hits[0].tolist() and len(idx) == 1999
    with pytest.raises(UnknownIdError, match="'s01500' is not in the index"):
        idx.remove([IDS[1500]])
    with pytest.raises(SchemaError, match="'s00001' is already in the index"):
        idx.add([IDS[1]], X[:1])


def test_remove_unsupported_is_a_clear_error() -> None:
    idx = CandidateIndex(16, "HNSW16")
    idx.add(IDS[:10], X[:10])
    assert not idx.supports_remove
    with pytest.raises(ConfigError, match="does not support removing vectors"):
        idx.remove([IDS[0]])


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="factory string 'Bogus42'"):
        CandidateIndex(16, "Bogus42")
    idx = CandidateIndex(16, "Flat")
    with pytest.raises(SchemaError, match=r"must be \(n, 16\)"):
        idx.add(["a"], np.zeros((1, 8), np.float32))
    bad = X[:2].copy()
    bad[1, 0] = np.nan
    with pytest.raises(SchemaError, match="'b' holds NaN"):
        idx.add(["a", "b"], bad)
    with pytest.raises(ArtifactError, match="is missing"):
        CandidateIndex.load(tmp_path / "nope.faiss")
