"""``CandidateIndex``: FAISS nearest-neighbour search over song vectors, keyed by string ids.

The index is described by a FAISS factory string (``Flat``, ``IVF256,Flat``, ``HNSW32``,
``PQ16``, ``IVF256,PQ16``...) and searched by inner product. With ``normalize=True`` (the
default) every vector and query is L2-normalised first, so scores are cosine similarities.

String ids map to int64 FAISS ids that are never reused; ``add`` appends without a rebuild,
``remove`` works for Flat and IVF indexes and raises a clear error for the rest (HNSW, PQ).
Search returns ``(scores, ids)`` of shape (n, k) with ``-inf`` / ``""`` padding when fewer than
k results exist. ``save``/``load`` always write the CPU form (``faiss.write_index`` + a JSON id
list). When a GPU build of faiss sees a GPU (``faiss.get_num_gpus() > 0``) and the device allows
it, searches run on a GPU copy of the CPU master (kept in sync after every add/remove).

Example
-------
>>> import numpy as np
>>> idx = CandidateIndex(4, "Flat")
>>> idx.add(["a", "b"], np.eye(2, 4, dtype=np.float32))
>>> scores, ids = idx.search(np.eye(1, 4, dtype=np.float32), 3)
>>> ids[0].tolist()
['a', 'b', '']
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from apex_rank.errors import ArtifactError, ConfigError, SchemaError, UnknownIdError

log = logging.getLogger(__name__)

_IDS_SUFFIX = ".ids.json"


def _faiss():
    import faiss

    return faiss


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation into a new contiguous float32 array (zero rows stay zero)."""
    X = np.array(X, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    np.divide(X, norms, out=X, where=norms > 0)
    return X


class CandidateIndex:
    """A FAISS inner-product index with string ids (see module doc).

    Parameters
    ----------
    dim:
        Vector width d.
    factory:
        FAISS factory string without the metric (``Flat``, ``IVF{n},Flat``, ``HNSW{m}``, ``PQ{m}``,
        ``IVF{n},PQ{m}``...). IVF/PQ indexes are trained on the first ``add``.
    normalize:
        L2-normalise vectors and queries (cosine similarity).
    nprobe, ef_search:
        Search-time knobs for IVF and HNSW indexes.
    device:
        ``auto`` (GPU when a GPU build sees one), ``cpu`` or ``cuda``.
    """

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        *,
        normalize: bool = True,
        nprobe: int = 16,
        ef_search: int = 128,
        device: str = "auto",
    ) -> None:
        if dim < 1:
            raise ConfigError(f"index dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.factory = factory.strip()
        self.normalize = normalize
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.device = device
        faiss = _faiss()
        base = self.factory.split(",")[0].upper()
        self._is_ivf = base.startswith("IVF")
        spec = self.factory if self._is_ivf else f"IDMap2,{self.factory}"
        try:
            self._index = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ConfigError(f"FAISS factory string {self.factory!r} is not valid: {err}") from err
        self._ids: list[str | None] = []
        self._pos: dict[str, int] = {}
        self._gpu: object | None = None
        self._lookup: np.ndarray | None = None  # ids + [""] as an object array, rebuilt after add/remove
        self._apply_search_params()

    # ------------------------------------------------------------------ properties
    @property
    def supports_remove(self) -> bool:
        """Flat and IVF indexes can drop vectors in place; HNSW and bare PQ cannot."""
        base = self.factory.split(",")[0].upper()
        return self._is_ivf or base == "FLAT"

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return len(self._pos)

    def __contains__(self, song_id: object) -> bool:
        return song_id in self._pos

    @property
    def ids(self) -> list[str]:
        """Live ids in insertion order."""
        return [s for s in self._ids if s is not None]

    # ------------------------------------------------------------------ mutation
    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add vectors (n, d) under new string ids; an id already present is an error."""
        X = np.asarray(vectors, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise SchemaError(f"index vectors must be (n, {self.dim}); got shape {X.shape}")
        if len(ids) != X.shape[0]:
            raise SchemaError(f"{len(ids)} ids for {X.shape[0]} vectors")
        if X.shape[0] == 0:
            return
        seen: set[str] = set()
        for s in ids:
            if s in self._pos or s in seen:
                raise SchemaError(f"song_id {s!r} is already in the index (remove it first)")
            seen.add(s)
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            raise SchemaError(f"vector of song_id {ids[int(np.flatnonzero(bad)[0])]!r} holds NaN or inf")
        X = l2_normalize(X) if self.normalize else np.ascontiguousarray(X)
        if not self._index.is_trained:
            log.info("training FAISS index %r on %d vectors", self.factory, X.shape[0])
            try:
                self._index.train(X)
            except RuntimeError as err:
                raise ConfigError(
                    f"FAISS index {self.factory!r} cannot be trained on {X.shape[0]} vectors: {err}"
                ) from err
        start = len(self._ids)
        labels = np.arange(start, start + X.shape[0], dtype=np.int64)
        self._index.add_with_ids(X, labels)
        for j, s in enumerate(ids):
            self._ids.append(s)
            self._pos[s] = start + j
        self._gpu = None
        self._lookup = None

    def remove(self, ids: Sequence[str]) -> int:
        """Remove ids (unknown ones are an error); returns how many were removed."""
        if not self.supports_remove:
            raise ConfigError(
                f"FAISS index {self.factory!r} does not support removing vectors; use a Flat or IVF "
                "index, or rebuild the index without these songs"
            )
        missing = [s for s in ids if s not in self._pos]
        if missing:
            raise UnknownIdError(f"song_id {missing[0]!r} is not in the index ({len(missing)} unknown ids)")
        labels = np.asarray([self._pos[s] for s in ids], dtype=np.int64)
        n = int(self._index.remove_ids(_faiss().IDSelectorBatch(labels)))
        for s in ids:
            self._ids[self._pos.pop(s)] = None
        self._gpu = None
        self._lookup = None
        return n

    # ------------------------------------------------------------------ search
    def _apply_search_params(self) -> None:
        faiss = _faiss()
        inner = faiss.downcast_index(self._index.index) if not self._is_ivf else self._index
        if self._is_ivf:
            faiss.extract_index_ivf(self._index).nprobe = self.nprobe
        elif hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = self.ef_search

    def _searcher(self) -> object:
        faiss = _faiss()
        if self.device == "cpu" or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
            return self._index
        if "HNSW" in self.factory.upper():  # no GPU implementation
            return self._index
        if self._gpu is None:
            try:
                res = faiss.StandardGpuResources()
                co = faiss.GpuClonerOptions()
                self._gpu = faiss.index_cpu_to_gpu(res, 0, self._index, co)
                self._gpu_res = res
                if self._is_ivf:
                    faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", self.nprobe)
            except (RuntimeError, AttributeError) as err:
                log.warning("FAISS GPU copy of %r failed (%s); searching on CPU", self.factory, err)
                self.device = "cpu"
                return self._index
        return self._gpu

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for each query row.

        Returns
        -------
        scores:
            (n, k) float32, ``-inf`` where fewer than k results exist.
        ids:
            (n, k) object array of song ids, ``""`` as padding.
        """
        scores, labels = self.search_labels(queries, k)
        if self._lookup is None or len(self._lookup) != len(self._ids) + 1:
            self._lookup = np.asarray(self._ids + [""], dtype=object)
        return scores, self._lookup[np.where(labels >= 0, labels, len(self._ids))]

    def search_labels(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` with int64 labels (positions in :attr:`labels`) instead of ids:
        ``(scores (n, k) float32 with -inf padding, labels (n, k) int64 with -1 padding)``."""
        Q = np.asarray(queries, dtype=np.float32)
        if Q.ndim == 1:
            Q = Q[None, :]
        if Q.ndim != 2 or Q.shape[1] != self.dim:
            raise SchemaError(f"queries must be (n, {self.dim}); got shape {Q.shape}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        n = Q.shape[0]
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        labels = np.full((n, k), -1, dtype=np.int64)
        if n == 0 or self.ntotal == 0:
            return scores, labels
        Q = l2_normalize(Q) if self.normalize else np.ascontiguousarray(Q)
        kk = min(k, self.ntotal)
        D, hits = self._searcher().search(Q, kk)  # type: ignore[attr-defined]
        valid = hits >= 0
        scores[:, :kk] = np.where(valid, D, -np.inf)
        labels[:, :kk] = np.where(valid, hits, -1)
        return scores, labels

    @property
    def labels(self) -> list[str | None]:
        """The id of every label :meth:`search_labels` can return, by label (None: removed)."""
        return self._ids

    def labels_of(self, ids: Sequence[str]) -> np.ndarray:
        """The label of each id, -1 for ids not in the index."""
        return np.asarray([self._pos.get(s, -1) for s in ids], dtype=np.int64)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> list[Path]:
        """Write ``path`` (faiss CPU index) and ``path.ids.json``; returns both paths."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self._index, str(path))
        meta = {
            "dim": self.dim,
            "factory": self.factory,
            "normalize": self.normalize,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "ids": self._ids,
        }
        ids_path = path.with_name(path.name + _IDS_SUFFIX)
        ids_path.write_text(json.dumps(meta))
        return [path, ids_path]

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> CandidateIndex:
        """Read an index written by :meth:`save`."""
        path = Path(path)
        ids_path = path.with_name(path.name + _IDS_SUFFIX)
        for p in (path, ids_path):
            if not p.is_file():
                raise ArtifactError(f"index file {p} is missing")
        try:
            meta = json.loads(ids_path.read_text())
            obj = cls(
                int(meta["dim"]),
                str(meta["factory"]),
                normalize=bool(meta["normalize"]),
                nprobe=int(meta["nprobe"]),
                ef_search=int(meta["ef_search"]),
                device=device,
            )
            obj._index = _faiss().read_index(str(path))
        except (json.JSONDecodeError, KeyError, RuntimeError) as err:
            raise ArtifactError(f"index {path} cannot be read: {err}") from err
        obj._ids = list(meta["ids"])
        obj._lookup = None
        obj._pos = {s: i for i, s in enumerate(obj._ids) if s is not None}
        if obj.ntotal != len(obj._pos):
            raise ArtifactError(f"index {path} holds {obj.ntotal} vectors but {ids_path} lists {len(obj._pos)} ids")
        obj._apply_search_params()
        return obj
