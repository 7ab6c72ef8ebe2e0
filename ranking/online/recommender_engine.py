"""``RecommenderEngine``: the offline ``Recommender`` behind the online ranker.

The online path and the offline path are the same code: a :class:`~apex_rank.ranking.state.
UserState` is rebuilt from the stored user record (CF factor, content profile, history,
activity; float32 bytes decode to the exact arrays that were published) and handed to
``Recommender.recommend_states``, which runs ``generate_candidates`` →
``build_feature_frame`` → ``Reranker.score`` → top-k exactly as ``Recommender.recommend``
does. Hence ``OnlineRanker.rank(u) == Recommender.recommend(u)`` for an unchanged state.

The Recommender mutates its song table and indexes when songs are added, so ranking and
adding are guarded by a readers-writer lock: many concurrent rankings, one exclusive add.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import polars as pl

from apex_rank.errors import ArtifactError
from apex_rank.ranking.recommender import Recommender, load_recommender
from apex_rank.ranking.state import UserState

from .engine import FallbackList, Item, SongBlock
from .store import UserRecord


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
                 fallback_size: int = 1000) -> None:
        self.recommender = recommender
        self.bundle_dir = str(Path(bundle_dir).resolve())
        self.fingerprint = bundle_fingerprint(bundle_dir)
        self._lock = _RWLock()
        t = recommender.songs
        self._fallback = FallbackList(list(t.song_ids), np.asarray(t.quality, dtype=np.float64),
                                      fallback_size)

    @classmethod
    def load(cls, bundle_dir: str | Path, *, device: str = "cpu") -> RecommenderEngine:
        """Load the bundle folder (FAISS index, CF, reranker, APEX predictor) in this process."""
        return cls(load_recommender(bundle_dir, device=device), bundle_dir)

    @property
    def embedding_dim(self) -> int:
        return int(self.recommender.songs.embeddings.shape[1])

    def rank_user(self, user_id: str, state: UserRecord | None, k: int,
                  exclude: Collection[str]) -> list[Item]:
        st = state_from_record(user_id, state)
        self._lock.acquire_read()
        try:
            df = self.recommender.recommend_states([st], k, excludes=[set(exclude)])
        finally:
            self._lock.release_read()
        return list(zip(df["song_id"].to_list(), df["score"].to_list(), df["source"].to_list(),
                        strict=True))

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
