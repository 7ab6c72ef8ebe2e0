"""``RecommenderEngine``: the offline ``Recommender`` behind the online ranker.

The online path and the offline path are the same code: a :class:`~apex_rank.ranking.state.
UserState` is rebuilt from the stored user record (CF factor, content profile, history,
activity; float32 bytes decode to the exact arrays that were published) and handed to
``Recommender.recommend_states``, which runs ``generate_candidates`` →
``build_feature_frame`` → ``Reranker.score`` → top-k exactly as ``Recommender.recommend``
does. Hence ``OnlineRanker.rank(u) == Recommender.recommend(u)`` for an unchanged state.

The Recommender mutates its song table and indexes when songs are added, so ranking and
adding are guarded by a readers-writer lock: many concurrent rankings, one exclusive add.

Micro-batching: concurrent ``rank_user`` calls are queued and a worker ranks whatever is
queued in one ``recommend_states`` call (up to ``max_batch`` users with the same ``k``).
The per-request cost of this path is mostly fixed per call (polars query overhead), so a batch
of 8 costs little more than one; results are identical because every feature and score is
row-wise (batch equals the concatenation of single-user results). A lone request never waits:
the worker takes what is queued, it does not hold a window open.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Collection, Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import polars as pl

from apex_rank.errors import ArtifactError
from apex_rank.ranking.recommender import Recommender, load_recommender
from apex_rank.ranking.state import UserState

from .engine import FallbackList, Item, SongBlock
from .store import UserRecord

log = logging.getLogger(__name__)


class _RWLock:
    """Many readers or one writer (writers wait for readers in flight to finish)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


def bundle_fingerprint(folder: str | Path) -> str:
    """sha256 (16 hex) of a bundle's ``manifest.json``: changes with every build."""
    path = Path(folder) / "manifest.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as err:
        raise ArtifactError(f"bundle manifest {path} cannot be read: {err}") from err


def state_from_record(user_id: str, rec: UserRecord | None) -> UserState:
    """The :class:`UserState` a stored record stands for (``None``: the empty, unknown state)."""
    if rec is None:
        return UserState(user_id, None, None, (), 0)
    return UserState(user_id, rec.factor, rec.profile, tuple(rec.history), int(rec.activity))


def record_from_state(state: UserState) -> UserRecord:
    """The stored form of a :class:`UserState` (float32 vectors, history as a list)."""
    f = None if state.cf_factor is None else np.asarray(state.cf_factor, dtype=np.float32)
    p = None if state.profile is None else np.asarray(state.profile, dtype=np.float32)
    return UserRecord(f, p, list(state.history), float(state.activity))


class RecommenderEngine:
    """A loaded Recommender bundle serving the online ranker (see the module doc).

    Parameters
    ----------
    recommender:
        The loaded bundle.
    bundle_dir:
        Folder it was loaded from (named in the published manifest).
    fallback_size:
        Length of the degraded-mode list (the Recommender's popularity-and-quality score).
    """

    def __init__(self, recommender: Recommender, bundle_dir: str | Path, *,
                 fallback_size: int = 1000, max_batch: int = 32) -> None:
        self.recommender = recommender
        self.bundle_dir = str(Path(bundle_dir).resolve())
        self.fingerprint = bundle_fingerprint(bundle_dir)
        self._lock = _RWLock()
        t = recommender.songs
        self._fallback = FallbackList(list(t.song_ids), np.asarray(t.quality, dtype=np.float64),
                                      fallback_size)
        self.max_batch = int(max_batch)
        self._queue: queue.Queue[tuple[UserState, int, frozenset[str], Future[list[Item]]] | None] = \
            queue.Queue()
        self._closed = threading.Event()
        self._worker: threading.Thread | None = None
        if self.max_batch > 1:
            self._worker = threading.Thread(target=self._serve_batches, name="apexrank-batch",
                                            daemon=True)
            self._worker.start()

    @classmethod
    def load(cls, bundle_dir: str | Path, *, device: str = "cpu", fallback_size: int = 1000,
             max_batch: int = 32) -> RecommenderEngine:
        """Load the bundle folder (FAISS index, CF, reranker, APEX predictor) in this process."""
        return cls(load_recommender(bundle_dir, device=device), bundle_dir,
                   fallback_size=fallback_size, max_batch=max_batch)

    def close(self) -> None:
        """Stop the batching worker (later calls rank directly); queued requests are answered."""
        if self._worker is not None and not self._closed.is_set():
            self._closed.set()
            self._queue.put(None)
            self._worker.join(timeout=30)

    def _rank_states(self, states: list[UserState], k: int,
                     excludes: list[frozenset[str]]) -> dict[str, list[Item]]:
        self._lock.acquire_read()
        try:
            df = self.recommender.recommend_states(states, k, excludes=[set(e) for e in excludes])
        finally:
            self._lock.release_read()
        out: dict[str, list[Item]] = {s.user_id: [] for s in states}
        for u, sid, sc, src in zip(df["user_id"].to_list(), df["song_id"].to_list(),
                                   df["score"].to_list(), df["source"].to_list(), strict=True):
            out[u].append((sid, sc, src))
        return out

    def _serve_batches(self) -> None:
        pending: list[tuple[UserState, int, frozenset[str], Future[list[Item]]]] = []
        while True:
            if not pending:
                item = self._queue.get()
                if item is None:
                    return
                pending.append(item)
            while len(pending) < 4 * self.max_batch:  # take what is queued, never wait
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after answering what is pending
                    break
                pending.append(nxt)
            # one call per k; a user id at most once per call (results are keyed by user id)
            k0 = pending[0][1]
            batch: list[tuple[UserState, int, frozenset[str], Future[list[Item]]]] = []
            rest: list[tuple[UserState, int, frozenset[str], Future[list[Item]]]] = []
            seen: set[str] = set()
            for it in pending:
                if it[1] == k0 and it[0].user_id not in seen and len(batch) < self.max_batch:
                    batch.append(it)
                    seen.add(it[0].user_id)
                else:
                    rest.append(it)
            pending = rest
            try:
                res = self._rank_states([b[0] for b in batch], k0, [b[2] for b in batch])
                for st, _, _, fut in batch:
                    fut.set_result(res[st.user_id])
            except BaseException as err:  # noqa: BLE001 - handed to every waiting caller
                for _, _, _, fut in batch:
                    fut.set_exception(err)

    @property
    def embedding_dim(self) -> int:
        return int(self.recommender.songs.embeddings.shape[1])

    @property
    def data_until_s(self) -> float:
        return float(self.recommender.songs.now_s)

    def rank_user(self, user_id: str, state: UserRecord | None, k: int,
                  exclude: Collection[str]) -> list[Item]:
        st = state_from_record(user_id, state)
        excl = frozenset(exclude)
        if self._worker is None or self._closed.is_set():
            return self._rank_states([st], k, [excl])[user_id]
        fut: Future[list[Item]] = Future()
        self._queue.put((st, k, excl, fut))
        return fut.result()

    def fallback(self, k: int, exclude: Collection[str]) -> list[Item]:
        return self._fallback.top(k, exclude)

    def has_song(self, song_id: str) -> bool:
        return bool(self.recommender.songs.index_of([song_id])[0] >= 0)

    def add_song(self, song_id: str, embedding: np.ndarray, priors: np.ndarray) -> None:
        """Add a song by its (raw) embedding; the Recommender recomputes the same priors."""
        frame = pl.DataFrame({"song_id": [song_id],
                              "embedding": [np.asarray(embedding, np.float32).tolist()]},
                             schema={"song_id": pl.String, "embedding": pl.List(pl.Float32)})
        self._lock.acquire_write()
        try:
            if not self.has_song(song_id):
                self.recommender.add_songs(frame)
        finally:
            self._lock.release_write()

    def predict_priors(self, embeddings: np.ndarray) -> np.ndarray:
        return np.asarray(self.recommender.apex.predict(np.asarray(embeddings, np.float32)),
                          dtype=np.float32)

    def song_block(self) -> SongBlock:
        t = self.recommender.songs
        age = (t.now_s - np.asarray(t.created_s, dtype=np.float64)) / 86400.0
        return SongBlock(ids=list(t.song_ids), priors=np.asarray(t.priors, np.float32),
                         popularity=np.asarray(t.popularity, np.float32),
                         age_days=np.nan_to_num(age, nan=-1.0).astype(np.float32),
                         is_cold=~np.asarray(t.warm, bool),
                         embeddings=np.asarray(t.embeddings, np.float32))

    def user_records(self) -> Iterator[tuple[str, UserRecord]]:
        rec = self.recommender
        for uid in rec.user_ids:
            yield uid, record_from_state(rec.user_state(uid))

    def n_users(self) -> int:
        return len(self.recommender.user_ids)
