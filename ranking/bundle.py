"""A recommender bundle: the parts a ``Recommender`` holds, saved to a folder and read back.

A bundle is a folder: ``manifest.json`` (kind ``apex-recommender``, schema, config, files with
their SHA-256, library versions, build report), ``songs.npz``, ``users.npz``, ``cf.npz``,
``content_map.npz`` (all ``allow_pickle=False``), the large arrays as plain ``.npy`` files
beside them (``songs.embeddings.npy``, ``songs.cf_factors.npy``, ``songs.pseudo_factors.npy``,
``users.profiles.npy``, ``users.hist_indices.npy``, ``cf.user_factors.npy``,
``cf.item_factors.npy``: memory-mapped copy-on-write by :func:`read_bundle` once their
checksums passed, so worker processes share the pages), ``content.faiss`` / ``pseudo_cf.faiss``
(+ ``.ids.json``), ``reranker.txt`` (LightGBM text) and ``apex/`` (the predictor folder). No
pickle anywhere.

:func:`save_bundle` writes :class:`RecommenderParts` atomically; :func:`read_bundle` reads them
back and cross-checks them (:func:`check_bundle`). ``Recommender.save`` and
``load_recommender`` (:mod:`.recommender`) are these two around the facade.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apex_rank.config import from_dict, to_dict
from apex_rank.errors import ArtifactError, ConfigError
from apex_rank.manifest import as_if_created, read_manifest, write_manifest
from apex_rank.npfiles import apart_file, read_arrays, save_arrays
from apex_rank.predictor import ApexPredictor
from apex_rank.ranking.cf import CFModel
from apex_rank.ranking.config import RecommenderConfig
from apex_rank.ranking.content_map import ContentToCF
from apex_rank.ranking.index import CandidateIndex
from apex_rank.ranking.reranker import Reranker
from apex_rank.ranking.state import SongTable, UserState
from apex_rank.tasks import APEX_TASKS

KIND = "apex-recommender"
# 2: relative log_popularity, age for cold songs, build-time cold simulation (schema-1 rerankers
# read those features differently, so schema-1 bundles are refused with a "rebuild" message);
# 3: ages from each user's latest interaction (users.npz ``last_seen``);
# 4: the large arrays in plain .npy files memory-mapped at load (``songs.<name>.npy`` for
# ``LARGE_SONG_ARRAYS``, ``users.<name>.npy`` for ``LARGE_USER_ARRAYS``, ``cf.user_factors.npy``,
# ``cf.item_factors.npy``): N serving processes share their pages;
# 5: what the online event update needs to continue the build's profiles exactly (users.npz
# ``hist_weights``, ``profile_mass``, ``profile_ref``; see ranking/state.py)
SCHEMA = 5
LARGE_SONG_ARRAYS = ("embeddings", "cf_factors", "pseudo_factors")
LARGE_USER_ARRAYS = ("profiles", "hist_indices", "hist_weights")
_OLDER_SCHEMA = {
    1: "its reranker features differ from this version's",
    2: "its reranker features differ from this version's",
    3: "its large arrays are inside .npz files, not in the .npy files this version memory-maps",
    4: "its users lack the history weights and profile mass online events continue the profile from",
}


@dataclass
class UserArrays:
    """The users of a bundle as arrays (dense user order = ``user_ids``): what ``users.npz``
    holds. Built by :func:`~apex_rank.ranking.build.user_arrays`; :meth:`state` reads one
    user's :class:`UserState` from it."""

    user_ids: list[str]
    profiles: np.ndarray  # (n_users, d) float32, zero rows = no profile
    has_profile: np.ndarray  # (n_users,) bool
    hist_indptr: np.ndarray  # CSR over catalogue positions, ordered by first interaction
    hist_indices: np.ndarray
    activity: np.ndarray  # (n_users,) int64
    last_seen: np.ndarray  # (n_users,) float64 time of the latest interaction (NaN unknown)
    hist_weights: np.ndarray  # (len(hist_indices),) float64 summed weight of each history song
    profile_mass: np.ndarray  # (n_users,) float64 norm of the recency-weighted sum (0: no profile)
    profile_ref: np.ndarray  # (n_users,) float64 reference time of that sum (NaN unknown)
    pos: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pos = {u: i for i, u in enumerate(self.user_ids)}

    def state(self, user_id: str, songs: SongTable, cf: CFModel) -> UserState:
        """The stored state of a user (CF factor from ``cf``, history as ids of ``songs``); an
        unknown user gets the empty state (→ the fallback list)."""
        i = self.pos.get(user_id)
        if i is None:
            return UserState(user_id, None, None, (), 0)
        lo, hi = self.hist_indptr[i], self.hist_indptr[i + 1]
        hist = tuple(songs.song_ids[j] for j in self.hist_indices[lo:hi])
        factor = cf.user_factor(user_id) if cf.has_user(user_id) else None
        prof = self.profiles[i].copy() if self.has_profile[i] else None
        return UserState(user_id, factor, prof, hist, int(self.activity[i]), float(self.last_seen[i]),
                         tuple(self.hist_weights[lo:hi].tolist()), float(self.profile_mass[i]),
                         float(self.profile_ref[i]))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for :func:`~apex_rank.npfiles.save_arrays` (no pickle)."""
        return {
            "user_ids": np.asarray(self.user_ids, dtype=str),
            "profiles": self.profiles,
            "has_profile": self.has_profile,
            "hist_indptr": self.hist_indptr,
            "hist_indices": self.hist_indices,
            "activity": self.activity,
            "last_seen": self.last_seen,
            "hist_weights": self.hist_weights,
            "profile_mass": self.profile_mass,
            "profile_ref": self.profile_ref,
        }

    @classmethod
    def from_arrays(cls, u: dict[str, np.ndarray]) -> UserArrays:
        return cls(u["user_ids"].tolist(), u["profiles"], u["has_profile"].astype(bool), u["hist_indptr"],
                   u["hist_indices"], u["activity"], u["last_seen"].astype(np.float64),
                   np.asarray(u["hist_weights"], dtype=np.float64), u["profile_mass"].astype(np.float64),
                   u["profile_ref"].astype(np.float64))


@dataclass
class RecommenderParts:
    """Everything a ``Recommender`` serves from and a bundle stores: what
    :func:`~apex_rank.ranking.build.build_parts` makes and :func:`read_bundle` reads back.

    Attributes
    ----------
    config: the :class:`RecommenderConfig` it was built with.
    songs: the catalogue (:class:`SongTable`). users: the stored users (:class:`UserArrays`).
    cf: the serving :class:`CFModel`. content_map: the content→CF map.
    content_index, pseudo_index: FAISS indexes over all songs' embeddings and the cold songs'
        pseudo factors.
    reranker: the LightGBM :class:`Reranker`. apex: the :class:`ApexPredictor`.
    report: build facts (row counts, timings, validation NDCG, the new-song floor).
    """

    config: RecommenderConfig
    songs: SongTable
    users: UserArrays
    cf: CFModel
    content_map: ContentToCF
    content_index: CandidateIndex
    pseudo_index: CandidateIndex
    reranker: Reranker
    apex: ApexPredictor
    report: dict[str, Any] = field(default_factory=dict)


def save_bundle(folder: str | Path, parts: RecommenderParts) -> Path:
    """Write the bundle folder (see module doc) atomically; returns it.

    The bundle is written into a temporary sibling folder and renamed into place, so a save
    killed halfway leaves the previous bundle whole (never old manifest next to new files).
    An existing ``folder`` is replaced only when it is empty or an apex-rank bundle (a
    :class:`ConfigError` otherwise); between the two renames that replace it, the name is
    briefly absent, never mixed.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"{folder} exists and is not a folder: cannot write a bundle there")
        if any(folder.iterdir()) and not is_bundle(folder):
            raise ConfigError(f"{folder} holds files and is not an apex-rank bundle: refusing to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    as_if_created(tmp)
    try:
        _write_bundle(tmp, parts)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / "bundle")
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_bundle(folder: Path, p: RecommenderParts) -> None:
    """Every component file and the manifest into ``folder`` (an empty folder)."""
    written = save_arrays(folder / "songs.npz", p.songs.to_arrays(), apart=LARGE_SONG_ARRAYS)
    written += save_arrays(folder / "users.npz", p.users.to_arrays(), apart=LARGE_USER_ARRAYS)
    written += [folder / "cf.npz", *(apart_file(folder / "cf.npz", a) for a in CFModel.FACTOR_ARRAYS)]
    p.cf.save(folder / "cf.npz", factors_apart=True)
    assert p.content_map.W is not None  # fitted in build
    np.savez(folder / "content_map.npz", W=p.content_map.W, regularization=np.asarray(p.content_map.regularization))
    files = [x.name for x in written] + ["content_map.npz", "reranker.txt"]
    files += [x.name for x in p.content_index.save(folder / "content.faiss")]
    files += [x.name for x in p.pseudo_index.save(folder / "pseudo_cf.faiss")]
    p.reranker.save(folder / "reranker.txt")
    p.apex.save(folder / "apex")
    files += ["apex/manifest.json", "apex/head.safetensors"]
    write_manifest(
        folder,
        kind=KIND,
        schema=SCHEMA,
        files=files,
        payload={
            "config": to_dict(p.config),
            "report": jsonable(p.report),
            "feature_importance": p.reranker.feature_importance().to_dicts(),
        },
    )


def is_bundle(folder: Path) -> bool:
    """True when ``folder/manifest.json`` says it is a recommender bundle (any schema)."""
    try:
        return json.loads((folder / "manifest.json").read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars as Python numbers and non-finite floats as None (JSON-safe)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def read_bundle(folder: str | Path, device: str = "auto") -> RecommenderParts:
    """Read the parts of a bundle written by :func:`save_bundle`, cross-checked.

    Raises :class:`~apex_rank.errors.ArtifactError` for a newer or older schema, a missing file,
    an unreadable component or parts that do not belong together, naming the file.
    """
    folder = Path(folder)
    man = read_manifest(folder, kind=KIND, max_schema=SCHEMA)
    if man["schema"] < SCHEMA:
        raise ArtifactError(
            f"{folder}/manifest.json: bundle schema {man['schema']} was built by an older apex-rank "
            f"({_OLDER_SCHEMA.get(man['schema'], 'another format')}; this version reads schema {SCHEMA}); "
            "rebuild it with `apex-rank build`"
        )
    try:
        cfg = from_dict(RecommenderConfig, man["config"])
    except (KeyError, ConfigError) as err:
        raise ArtifactError(f"{folder}/manifest.json: invalid config: {err}") from err

    try:
        songs = SongTable.from_arrays(read_arrays(folder / "songs.npz", apart=LARGE_SONG_ARRAYS))
        users = UserArrays.from_arrays(read_arrays(folder / "users.npz", apart=LARGE_USER_ARRAYS))
        cm = read_arrays(folder / "content_map.npz")
    except KeyError as err:
        raise ArtifactError(f"bundle {folder}: an array is missing: {err}") from err
    cmap = ContentToCF(float(cm["regularization"]))
    cmap.W = cm["W"]
    report = man.get("report") or {}
    cf = CFModel.load(folder / "cf.npz", mmap=True)
    content_index = CandidateIndex.load(folder / "content.faiss", device=device)
    pseudo_index = CandidateIndex.load(folder / "pseudo_cf.faiss", device=device)
    reranker = Reranker.load(folder / "reranker.txt", cfg.reranker)
    reranker.tree_weight = float(report.get("reranker_tree_weight", 1.0))
    gap = report.get("max_gap_s")  # absent in bundles built before it existed: no limit
    reranker.max_gap_s = float("inf") if gap is None else float(gap)
    apex = ApexPredictor.load(folder / "apex", device=device)
    parts = RecommenderParts(config=cfg, songs=songs, users=users, cf=cf, content_map=cmap,
                             content_index=content_index, pseudo_index=pseudo_index, reranker=reranker,
                             apex=apex, report=report)
    check_bundle(folder, parts)
    return parts


def check_bundle(folder: Path, p: RecommenderParts) -> None:
    """Cross-check the loaded parts (each file passed its checksum, but a bundle assembled
    from parts of several bundles, or written by a buggy build, must not serve): shapes agree
    with the catalogue, every index names catalogue songs, user histories point into it, and
    the arrays the features read are finite (a prior column may be all NaN: an untrained task)."""
    songs, users, cf = p.songs, p.users, p.cf
    n, d = len(songs), p.content_index.dim  # the width the index was built with

    def bad(name: str, what: str) -> ArtifactError:
        return ArtifactError(f"{folder / name}: {what}; the bundle's files do not belong together, rebuild it")

    def file(attr: str) -> str:
        return f"songs.{attr}.npy" if attr in LARGE_SONG_ARRAYS else "songs.npz"

    for attr, width in (("embeddings", d), ("cf_factors", cf.item_factors.shape[1]),
                        ("pseudo_factors", cf.item_factors.shape[1]), ("priors", len(APEX_TASKS))):
        arr = getattr(songs, attr)
        if arr.shape != (n, width):
            raise bad(file(attr), f"{attr} has shape {arr.shape}, expected ({n}, {width})")
    for attr in ("warm", "popularity", "created_s", "quality"):
        if getattr(songs, attr).shape != (n,):
            raise bad("songs.npz", f"{attr} has shape {getattr(songs, attr).shape}, expected ({n},)")
    for attr in ("embeddings", "cf_factors", "pseudo_factors", "popularity", "quality"):
        if not np.isfinite(getattr(songs, attr)).all():
            raise bad(file(attr), f"{attr} holds NaN or infinite values")
    fin = np.isfinite(songs.priors)
    if not (fin.all(axis=0) | (~fin).all(axis=0)).all():
        raise bad("songs.npz", "priors hold NaN or infinite values in a trained task's column")
    if p.apex.input_dim != d:
        raise bad("apex", f"the APEX predictor reads embeddings of width {p.apex.input_dim}, "
                          f"the content index's are {d}")
    if p.content_index.ids != songs.song_ids:
        raise bad("content.faiss", "the content index does not hold exactly the songs of songs.npz, in order")
    cold = [songs.song_ids[i] for i in np.flatnonzero(~songs.warm)]
    if sorted(p.pseudo_index.ids) != sorted(cold):
        raise bad("pseudo_cf.faiss", "the pseudo-CF index does not hold exactly the cold songs of songs.npz")
    if not set(cf.song_ids) <= set(songs.song_ids):
        raise bad("cf.npz", "the CF model names songs outside the catalogue")
    n_u = len(users.user_ids)
    ip, ix = users.hist_indptr, users.hist_indices
    if (len(ip) != n_u + 1 or ip[0] != 0 or ip[-1] != len(ix) or (np.diff(ip) < 0).any()
            or (len(ix) and (ix.min() < 0 or ix.max() >= n))):
        raise bad("users.npz", "user histories point outside the catalogue")
    if users.hist_weights.shape != ix.shape or users.profile_mass.shape != (n_u,) or users.profile_ref.shape != (n_u,):
        raise bad("users.npz", "history weights, profile masses or reference times do not match the users")
    if users.profiles.shape != (n_u, d) or not np.isfinite(users.profiles).all():
        raise bad("users.profiles.npy", f"profiles are not finite ({n_u}, {d}) vectors")
    if users.last_seen.shape != (n_u,) or np.isinf(users.last_seen).any():
        raise bad("users.npz", f"last_seen is not ({n_u},) times (NaN for unknown)")
