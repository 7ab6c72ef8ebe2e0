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

Catalogue scale (10^6-10^8 songs): :class:`CatalogueIndexConfig` sizes a PCA + IVF-PQ index
(factory string, lists, training sample, memory per million songs; the numbers behind each
default are in ``docs/scale.md`` and ``python -m bench.faiss_scale``) and
:func:`build_catalogue_index` trains it on a sample and adds the vectors in chunks with a
progress bar. With ``max_shard_bytes`` a :class:`CandidateIndex` keeps its vectors in several
FAISS indexes of at most that size (cloned from one trained index) and searches them as one
``faiss.IndexShards``; each shard is its own file, so a shard can be memory-mapped or moved to
another process.

``save`` writes a JSON manifest (``path.ids.json``, schema :data:`INDEX_SCHEMA`) with every
index file's size and SHA-256; ``load`` verifies them before FAISS reads a byte (a truncated or
foreign file is an :class:`~apex_rank.errors.ArtifactError` naming it, never a native crash) and
checks the read index against the manifest (width, metric, vector count).

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
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apex_rank.errors import ArtifactError, ConfigError, SchemaError, UnknownIdError
from apex_rank.manifest import file_checksum

log = logging.getLogger(__name__)

_IDS_SUFFIX = ".ids.json"
INDEX_SCHEMA = 2
"""Version of the ``.ids.json`` manifest: 1 (no schema field) listed ids only; 2 adds the
index files with their sizes and SHA-256 (one per shard)."""


def _faiss():
    import faiss

    return faiss


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation into a new contiguous float32 array (zero rows stay zero)."""
    X = np.array(X, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    np.divide(X, norms, out=X, where=norms > 0)
    return X


def _layers(index: Any) -> Iterator[Any]:
    """``index`` and the indexes it wraps (id maps, transforms, refinement), outermost first."""
    faiss = _faiss()
    cur = faiss.downcast_index(index)
    while cur is not None:
        yield cur
        if isinstance(cur, faiss.IndexRefine):
            cur = faiss.downcast_index(cur.base_index)
        elif isinstance(cur, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
            cur = faiss.downcast_index(cur.index)
        else:
            cur = None


def _ivf_of(index: Any) -> Any:
    faiss = _faiss()
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexIVF):
            return layer
    return None


def bytes_per_vector(index: Any) -> int:
    """Memory one more vector costs in a FAISS index: its code plus its id (an IVF list entry
    holds an int64 id; an id map adds the id twice, forward and reverse)."""
    faiss = _faiss()
    per = 0
    code = None
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexIDMap2):
            per += 16
        elif isinstance(layer, faiss.IndexIDMap):
            per += 8
        elif isinstance(layer, faiss.IndexRefine):
            per += faiss.downcast_index(layer.refine_index).sa_code_size()
        elif isinstance(layer, faiss.IndexIVF):
            code = int(layer.code_size) + 8
        elif isinstance(layer, faiss.IndexHNSW):
            # float32 vector, int32 links of the bottom layer, offsets and levels (upper layers: ~1/M of it)
            code = 4 * layer.d + 4 * layer.hnsw.nb_neighbors(0) + 16
        elif code is None and not isinstance(layer, faiss.IndexPreTransform):
            code = int(layer.sa_code_size())
    return per + (code or 0)


def fixed_bytes(index: Any) -> int:
    """Bytes of a trained index before any vector is added (coarse centroids, PQ codebooks,
    transform matrices): its serialized size."""
    empty = _faiss().clone_index(index)
    empty.reset()
    return int(_faiss().serialize_index(empty).nbytes)


@dataclass(frozen=True)
class CatalogueIndexConfig:
    """A PCA + IVF-PQ index for catalogues of 10^6-10^8 songs (see ``docs/scale.md``).

    The factory string is ``PCAR{reduce_dim},IVF{nlist},PQ{pq_bytes}`` (``reduce_dim`` 0: no
    PCA), with ``,Refine(SQ8)`` when ``refine`` is set, searched with ``nprobe`` lists. Per song
    it costs ``pq_bytes`` + 8 bytes (code and id: 72 MB per million songs), and with ``refine``
    also d bytes of 8-bit scalar-quantised vector + 16 bytes of id map (856 MB per million at
    d = 768; :meth:`bytes_per_song`), plus a fixed part (centroids, codebooks, the PCA matrix;
    :meth:`memory_bytes`). The PCA's random rotation spreads variance over the PQ's
    sub-vectors, the cheap part of what OPQ does (OPQ64_256 trained 13x slower on this machine).
    With ``refine`` the PQ search fetches ``refine_k`` · k candidates and reorders them by the
    8-bit vectors: recall@100 0.959 instead of 0.883 on the 10^5-song sample at nprobe 64
    (``docs/scale.md``).

    Attributes
    ----------
    reduce_dim:
        Width after PCA with random rotation (0 keeps the input width).
    pq_bytes:
        PQ sub-quantizers of 8 bits = bytes per song code; must divide the reduced width.
    lists_per_sqrt:
        nlist is about ``lists_per_sqrt`` · √n, rounded to a power of two (16 384 at 10^7).
    train_per_list:
        Training vectors per IVF list; the sample is ``max(min_train, train_per_list · nlist)``
        vectors, at most all of them. Chosen from recall@100 against exact search on a
        10^5-song sample (1024 lists, ``python -m bench.faiss_scale --train-study``): 10, 20,
        40, 80 per list gave 0.894, 0.941, 0.959, 0.961 at nprobe 64 (0.782, 0.855, 0.887,
        0.889 at nprobe 16); 40 is within 0.002 of twice the sample.
    min_train:
        Floor of the training sample (PQ codebooks: 256 centroids per sub-quantizer).
    nprobe:
        Lists scanned per query.
    refine, refine_k:
        Keep an 8-bit copy of every vector and rescore ``refine_k`` · k PQ hits with it.
    max_shard_bytes:
        Split the vectors over FAISS indexes of at most this many bytes each (0: one index).
    """

    reduce_dim: int = 256
    pq_bytes: int = 64
    lists_per_sqrt: float = 4.0
    train_per_list: int = 40
    min_train: int = 20_000
    nprobe: int = 64
    refine: bool = True
    refine_k: int = 4
    max_shard_bytes: int = 0

    def __post_init__(self) -> None:
        if self.reduce_dim < 0 or self.pq_bytes < 1 or self.nprobe < 1 or self.train_per_list < 1:
            raise ConfigError(f"catalogue index settings out of range: {self}")
        if self.reduce_dim and self.reduce_dim % self.pq_bytes:
            raise ConfigError(f"pq_bytes {self.pq_bytes} must divide reduce_dim {self.reduce_dim}")
        if self.max_shard_bytes < 0:
            raise ConfigError(f"max_shard_bytes must be >= 0, got {self.max_shard_bytes}")

    def lists_for(self, n_songs: int) -> int:
        """IVF lists: a power of two near ``lists_per_sqrt`` · √n, at most n / 39."""
        want = self.lists_per_sqrt * math.sqrt(max(1, n_songs))
        nlist = 2 ** max(0, round(math.log2(max(1.0, want))))
        while nlist > 1 and nlist * 39 > n_songs:
            nlist //= 2
        return nlist

    def factory(self, n_songs: int, dim: int) -> str:
        if self.reduce_dim and self.reduce_dim > dim:
            raise ConfigError(f"reduce_dim {self.reduce_dim} is wider than the vectors ({dim})")
        width = self.reduce_dim or dim
        if width % self.pq_bytes:
            raise ConfigError(f"pq_bytes {self.pq_bytes} must divide the vector width {width}")
        pre = f"PCAR{self.reduce_dim}," if self.reduce_dim and self.reduce_dim < dim else ""
        return f"{pre}IVF{self.lists_for(n_songs)},PQ{self.pq_bytes}" + (",Refine(SQ8)" if self.refine else "")

    def train_size(self, n_songs: int) -> int:
        return min(n_songs, max(self.min_train, self.train_per_list * self.lists_for(n_songs)))

    def bytes_per_song(self, dim: int) -> int:
        """PQ code plus int64 id in an IVF list; with ``refine`` also the 8-bit vector and the
        id map's two int64 (what :func:`bytes_per_vector` counts for the built index)."""
        return self.pq_bytes + 8 + (dim + 16 if self.refine else 0)

    def memory_bytes(self, n_songs: int, dim: int) -> int:
        """Resident bytes of the index: fixed part (coarse centroids, PQ codebooks, PCA matrix)
        plus :meth:`bytes_per_song` per song; the string ids (about 60 bytes each in Python)
        are not included."""
        width = self.reduce_dim or dim
        # the PCA keeps its full d x d eigenvector matrix besides the d' x d projection
        pca = dim * dim + dim * width + 3 * dim if self.reduce_dim and self.reduce_dim < dim else 0
        fixed = 4 * (self.lists_for(n_songs) * width + 256 * width + pca + (2 * dim if self.refine else 0))
        return fixed + n_songs * self.bytes_per_song(dim)


def build_catalogue_index(
    ids: Sequence[str],
    vectors: np.ndarray,
    config: CatalogueIndexConfig | None = None,
    *,
    chunk: int = 100_000,
    seed: int = 0,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> CandidateIndex:
    """Train a :class:`CatalogueIndexConfig` index on a random sample of ``vectors`` (n, d)
    (a memory map works: only the sample and one chunk are read at a time), then add every
    vector in chunks of ``chunk`` rows with a tqdm bar. Vectors are L2-normalised (cosine).
    ``timings``, when given, receives ``train_s`` and ``add_s``."""
    import time

    cfg = config or CatalogueIndexConfig()
    X = vectors
    if X.ndim != 2:
        raise SchemaError(f"vectors must be (n, d); got shape {X.shape}")
    n, d = X.shape
    if len(ids) != n:
        raise SchemaError(f"{len(ids)} ids for {n} vectors")
    need = max(39 * 2, 256, cfg.reduce_dim)  # two lists, the PQ codebooks' 256 centroids, the PCA's width
    if n < need:
        raise ConfigError(f"a catalogue index needs at least {need} vectors, got {n}; "
                          "use CandidateIndex(dim, 'Flat') for small catalogues")
    index = CandidateIndex(d, cfg.factory(n, d), nprobe=cfg.nprobe, refine_k=cfg.refine_k,
                           max_shard_bytes=cfg.max_shard_bytes, device="cpu")
    t0 = time.perf_counter()
    rows = np.sort(np.random.default_rng(seed).choice(n, cfg.train_size(n), replace=False))
    index.train(np.asarray(X[rows], dtype=np.float32))
    t1 = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=n, unit="song", desc=f"index {index.factory}", disable=not progress) as bar:
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            index.add(ids[s:e], np.asarray(X[s:e], dtype=np.float32))
            bar.update(e - s)
    if timings is not None:
        timings.update(train_s=t1 - t0, add_s=time.perf_counter() - t1)
    return index


class CandidateIndex:
    """A FAISS inner-product index with string ids (see module doc).

    Parameters
    ----------
    dim:
        Vector width d.
    factory:
        FAISS factory string without the metric (``Flat``, ``IVF{n},Flat``, ``HNSW{m}``, ``PQ{m}``,
        ``IVF{n},PQ{m}``, ``PCAR{d'},IVF{n},PQ{m}``...). IVF/PQ indexes are trained on the first
        ``add`` (or by :meth:`train`).
    normalize:
        L2-normalise vectors and queries (cosine similarity).
    nprobe, ef_search, refine_k:
        Search-time knobs for IVF, HNSW and refined (``...,Refine(...)``) indexes.
    device:
        ``auto`` (GPU when a GPU build sees one), ``cpu`` or ``cuda``. A sharded index searches
        on the CPU.
    max_shard_bytes:
        When > 0, vectors go to shards of at most this many bytes (estimated: the trained index's
        serialized size plus :func:`bytes_per_vector` per vector), searched as one
        ``faiss.IndexShards``. Results equal one index holding every vector (the shards share
        the trained quantizer and codebooks).
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
        max_shard_bytes: int = 0,
        refine_k: int = 4,
    ) -> None:
        if dim < 1:
            raise ConfigError(f"index dim must be >= 1, got {dim}")
        if max_shard_bytes < 0:
            raise ConfigError(f"max_shard_bytes must be >= 0, got {max_shard_bytes}")
        self.dim = int(dim)
        self.factory = factory.strip()
        self.normalize = normalize
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.refine_k = refine_k
        self.device = device
        self.max_shard_bytes = int(max_shard_bytes)
        faiss = _faiss()
        upper = self.factory.upper()
        try:
            raw = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ConfigError(f"FAISS factory string {self.factory!r} is not valid: {err}") from err
        # IVF indexes (behind a transform too) store our ids themselves and remove in place; the
        # rest go behind an id map (a refined index cannot take ids, so it does too)
        self._is_ivf = _ivf_of(raw) is not None and "REFINE" not in upper and "RFLAT" not in upper
        index = raw if self._is_ivf else faiss.index_factory(self.dim, f"IDMap2,{self.factory}",
                                                             faiss.METRIC_INNER_PRODUCT)
        ivf = _ivf_of(index)
        if ivf is not None and hasattr(ivf, "do_polysemous_training"):
            # index_factory turns it on for IVF-PQ; it only serves polysemous_ht search (never
            # used here) and made training 6x slower or worse (docs/scale.md)
            ivf.do_polysemous_training = False
        self._shards: list[Any] = [index]
        self._fixed_bytes: int | None = None
        self._ids: list[str | None] = []
        self._pos: dict[str, int] = {}
        self._gpu: object | None = None
        self._joined: Any = None  # IndexShards over self._shards, rebuilt after add/remove
        self._lookup: np.ndarray | None = None  # ids + [""] as an object array, rebuilt after add/remove
        self._apply_search_params()

    @property
    def _index(self) -> Any:
        """The first (or only) FAISS index."""
        return self._shards[0]

    # ------------------------------------------------------------------ properties
    @property
    def supports_remove(self) -> bool:
        """Flat and IVF indexes can drop vectors in place; HNSW, bare PQ and refined ones cannot."""
        base = self.factory.split(",")[0].upper()
        return self._is_ivf or base == "FLAT"

    @property
    def ntotal(self) -> int:
        return sum(int(s.ntotal) for s in self._shards)

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def memory_bytes(self) -> int:
        """Estimated resident bytes of the FAISS indexes (fixed part per shard + per vector)."""
        if not self.is_trained:
            return 0
        return self.n_shards * self._fixed() + self.ntotal * bytes_per_vector(self._index)

    def __len__(self) -> int:
        return len(self._pos)

    def __contains__(self, song_id: object) -> bool:
        return song_id in self._pos

    @property
    def ids(self) -> list[str]:
        """Live ids in insertion order."""
        return [s for s in self._ids if s is not None]

    # ------------------------------------------------------------------ mutation
    def _prepare(self, vectors: np.ndarray, what: str) -> np.ndarray:
        X = np.asarray(vectors, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise SchemaError(f"{what} must be (n, {self.dim}); got shape {X.shape}")
        return X

    def train(self, vectors: np.ndarray) -> None:
        """Train the (untrained) index on a sample (n, d); :meth:`add` trains on its first
        batch when this was not called."""
        X = self._prepare(vectors, "training vectors")
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            raise SchemaError(f"training vector {int(np.flatnonzero(bad)[0])} holds NaN or inf")
        if self.is_trained:
            raise ConfigError(f"FAISS index {self.factory!r} is already trained")
        X = l2_normalize(X) if self.normalize else np.ascontiguousarray(X)
        log.info("training FAISS index %r on %d vectors", self.factory, X.shape[0])
        try:
            self._index.train(X)
        except RuntimeError as err:
            raise ConfigError(
                f"FAISS index {self.factory!r} cannot be trained on {X.shape[0]} vectors: {err}"
            ) from err

    def _fixed(self) -> int:
        if self._fixed_bytes is None:
            self._fixed_bytes = fixed_bytes(self._index)
        return self._fixed_bytes

    def empty_copy(self, *, max_shard_bytes: int | None = None) -> CandidateIndex:
        """An empty index with this one's settings and trained state (quantizer, codebooks,
        transform), optionally with another shard budget: vectors added to it get the same
        codes as here."""
        out = CandidateIndex(self.dim, self.factory, normalize=self.normalize, nprobe=self.nprobe,
                             ef_search=self.ef_search, device=self.device, refine_k=self.refine_k,
                             max_shard_bytes=self.max_shard_bytes if max_shard_bytes is None else max_shard_bytes)
        out._shards = [self._new_shard()]
        out._apply_search_params()
        return out

    def _new_shard(self) -> Any:
        shard = _faiss().clone_index(self._index)
        shard.reset()
        return shard

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add vectors (n, d) under new string ids; an id already present is an error."""
        X = self._prepare(vectors, "index vectors")
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
        if not self.is_trained:
            self.train(X)
        X = l2_normalize(X) if self.normalize else np.ascontiguousarray(X)
        start = len(self._ids)
        labels = np.arange(start, start + X.shape[0], dtype=np.int64)
        if self.max_shard_bytes:
            per = bytes_per_vector(self._index)
            room = (self.max_shard_bytes - self._fixed()) // max(1, per)
            if room < 1:
                raise ConfigError(f"max_shard_bytes {self.max_shard_bytes} leaves no room for a vector: the trained "
                                  f"index {self.factory!r} alone takes {self._fixed()} bytes per shard")
            done = 0
            while done < X.shape[0]:
                last = self._shards[-1]
                free = room - int(last.ntotal)
                if free <= 0:
                    self._shards.append(self._new_shard())
                    continue
                e = min(X.shape[0], done + free)
                last.add_with_ids(X[done:e], labels[done:e])
                done = e
        else:
            self._index.add_with_ids(X, labels)
        for j, s in enumerate(ids):
            self._ids.append(s)
            self._pos[s] = start + j
        self._changed()

    def _changed(self) -> None:
        self._gpu = None
        self._joined = None
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
        sel = _faiss().IDSelectorBatch(labels)
        n = sum(int(shard.remove_ids(sel)) for shard in self._shards)
        for s in ids:
            self._ids[self._pos.pop(s)] = None
        self._changed()
        return n

    # ------------------------------------------------------------------ search
    def _apply_search_params(self) -> None:
        faiss = _faiss()
        for shard in self._shards:
            for layer in _layers(shard):
                if isinstance(layer, faiss.IndexIVF):
                    layer.nprobe = self.nprobe
                elif isinstance(layer, faiss.IndexHNSW):
                    layer.hnsw.efSearch = self.ef_search
                elif isinstance(layer, faiss.IndexRefine):
                    layer.k_factor = float(self.refine_k)

    def _searcher(self) -> object:
        faiss = _faiss()
        if len(self._shards) > 1:
            if self._joined is None:
                # threaded=False: each shard's search uses faiss's OpenMP pool (apex_rank.threads)
                # instead of one extra thread per shard; successive_ids=False: our labels are global
                joined = faiss.IndexShards(self.dim, False, False)
                joined.metric_type = faiss.METRIC_INNER_PRODUCT  # merge by largest score
                for shard in self._shards:
                    joined.add_shard(shard)
                self._joined = joined
            return self._joined
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
        bad = ~np.isfinite(Q).all(axis=1)
        if bad.any():
            raise SchemaError(f"query row {int(np.flatnonzero(bad)[0])} holds NaN or inf")
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
    @staticmethod
    def _shard_path(path: Path, i: int) -> Path:
        return path if i == 0 else path.with_name(f"{path.name}.shard{i}")

    def save(self, path: str | Path) -> list[Path]:
        """Write ``path`` (faiss CPU index; further shards ``path.shard1``...) and the manifest
        ``path.ids.json``; returns every path written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        written = []
        for i, shard in enumerate(self._shards):
            p = self._shard_path(path, i)
            _faiss().write_index(shard, str(p))
            written.append(p)
        meta = {
            "schema": INDEX_SCHEMA,
            "dim": self.dim,
            "factory": self.factory,
            "normalize": self.normalize,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "refine_k": self.refine_k,
            "max_shard_bytes": self.max_shard_bytes,
            "shards": [{"file": p.name, "ntotal": int(s.ntotal), **file_checksum(p)}
                       for p, s in zip(written, self._shards, strict=True)],
            "ids": self._ids,
        }
        ids_path = path.with_name(path.name + _IDS_SUFFIX)
        ids_path.write_text(json.dumps(meta))
        return [*written, ids_path]

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> CandidateIndex:
        """Read an index written by :meth:`save`, verifying every file against the manifest
        before FAISS reads it."""
        path = Path(path)
        ids_path = path.with_name(path.name + _IDS_SUFFIX)
        for p in (path, ids_path):
            if not p.is_file():
                raise ArtifactError(f"index file {p} is missing")
        try:
            meta = json.loads(ids_path.read_text())
            schema = int(meta.get("schema", 1))
            if schema > INDEX_SCHEMA:
                raise ArtifactError(f"{ids_path}: schema {schema} is newer than this apex-rank reads ({INDEX_SCHEMA})")
            obj = cls(
                int(meta["dim"]),
                str(meta["factory"]),
                normalize=bool(meta["normalize"]),
                nprobe=int(meta["nprobe"]),
                ef_search=int(meta["ef_search"]),
                device=device,
                max_shard_bytes=int(meta.get("max_shard_bytes", 0)),
                refine_k=int(meta.get("refine_k", 4)),
            )
            # schema 1 (bundles checksum their files themselves): one file, nothing to verify here
            shards = meta["shards"] if schema >= 2 else [{"file": path.name, "ntotal": None}]
            ids = list(meta["ids"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, ConfigError) as err:
            raise ArtifactError(f"index manifest {ids_path} cannot be read: {err}") from err
        if not isinstance(shards, list) or not shards:
            raise ArtifactError(f"index manifest {ids_path}: 'shards' must list the index files")
        read = []
        for i, sh in enumerate(shards):
            p = cls._shard_path(path, i)
            if not isinstance(sh, dict) or sh.get("file") != p.name:
                raise ArtifactError(f"index manifest {ids_path}: shard {i} must be the file {p.name}")
            if not p.is_file():
                raise ArtifactError(f"index file {p} is missing")
            if "sha256" in sh:
                got = file_checksum(p)
                if got["bytes"] != sh.get("bytes") or got["sha256"] != sh.get("sha256"):
                    raise ArtifactError(
                        f"index file {p}: {got['bytes']} bytes with a SHA-256 other than {ids_path} records "
                        f"({sh.get('bytes')} bytes): truncated, changed or taken from another index; rebuild it")
            try:
                index = _faiss().read_index(str(p))
            except RuntimeError as err:
                raise ArtifactError(f"index file {p} cannot be read by FAISS: {err}") from err
            if index.d != obj.dim or index.metric_type != _faiss().METRIC_INNER_PRODUCT:
                raise ArtifactError(f"index file {p} holds a {index.d}-wide index with metric {index.metric_type}; "
                                    f"{ids_path} describes a {obj.dim}-wide inner-product index")
            if sh.get("ntotal") is not None and int(index.ntotal) != int(sh["ntotal"]):
                raise ArtifactError(f"index file {p} holds {index.ntotal} vectors, {ids_path} records {sh['ntotal']}")
            read.append(index)
        obj._shards = read
        obj._ids = ids
        obj._changed()
        obj._pos = {s: i for i, s in enumerate(obj._ids) if s is not None}
        if obj.ntotal != len(obj._pos):
            raise ArtifactError(f"index {path} holds {obj.ntotal} vectors but {ids_path} lists {len(obj._pos)} ids")
        obj._apply_search_params()
        return obj
