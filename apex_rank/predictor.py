"""``ApexPredictor``: a trained APEX head ready for inference, with pickle-free persistence.

A predictor folder holds ``head.safetensors`` (the state_dict in the official key layout) and
``manifest.json`` (kind ``apex-predictor``, schema version, task list, widths, the encoder the
embeddings must come from, and the popularity-target transform parameters). ``load`` rebuilds
the head and checks every tensor's shape. The authors' ``best_model.pt`` is read with
``torch.load(weights_only=True)`` by :meth:`ApexPredictor.from_official_checkpoint`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from apex_rank.device import resolve_device
from apex_rank.errors import CheckpointError, SchemaError
from apex_rank.manifest import read_manifest, write_manifest
from apex_rank.model import TRUNK_WIDTHS, ApexHead, FusedApexHead
from apex_rank.schemas import embedding_matrix
from apex_rank.tasks import APEX_TASKS, TASK_SETS

log = logging.getLogger(__name__)

KIND = "apex-predictor"
SCHEMA = 1
WEIGHTS = "head.safetensors"
# rows per forward pass: a row's scores depend on how many rows share its matrix product (CPU
# kernels differ by size), so an engine that must match `predict` bit for bit cuts the same blocks
PREDICT_ROWS = 65536


class ApexPredictor:
    """Predict the seven APEX scores from song embeddings.

    Parameters
    ----------
    head:
        A trained :class:`ApexHead` (any task subset).
    encoder:
        Id of the encoder whose embeddings the head expects (checked by callers that know it).
    target_transform:
        JSON-able parameters of the popularity-target transform the labels were made with.
    device:
        ``auto``/``cpu``/``cuda`` for inference.

    Example
    -------
    >>> pred = ApexPredictor(ApexHead())
    >>> pred.predict(np.zeros((3, 768), np.float32)).shape
    (3, 7)
    """

    def __init__(
        self,
        head: ApexHead,
        *,
        encoder: str | None = None,
        segmenting: str | None = None,
        target_transform: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        device: str = "auto",
    ) -> None:
        self.head = head.eval()
        self.encoder = encoder
        self.segmenting = segmenting  # how the audio was cut (AudioConfig.segmenting), None unknown
        self.target_transform = target_transform or {}
        self.extra = extra or {}
        self.device = resolve_device(device)
        self._fused = FusedApexHead.from_head(self.head).to(self.device)
        self._cols = np.array([APEX_TASKS.index(t) for t in self.head.tasks])

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.head.tasks

    @property
    def input_dim(self) -> int:
        return self.head.input_dim

    def bad_prior_rows(self, priors: np.ndarray) -> np.ndarray:
        """(n,) bool: the rows of (n, 7) priors that are not what :meth:`predict` returns for a
        sound input: a trained task's value not finite, an untrained task's value not NaN (a head
        trained without aesthetic labels predicts NaN for those tasks; that is not a fault)."""
        P = np.asarray(priors, dtype=np.float64)
        trained = np.isin(APEX_TASKS, self.tasks)
        return ~(np.isfinite(P) == trained[None, :]).all(axis=1) | np.isinf(P).any(axis=1)

    def predict(self, embeddings: np.ndarray, *, batch_size: int = PREDICT_ROWS) -> np.ndarray:
        """(n, d) embeddings → (n, 7) float32 in ``APEX_TASKS`` order.

        Tasks the head was not trained for (a popularity-only head) are NaN columns.
        """
        X = np.asarray(embeddings, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.input_dim:
            raise SchemaError(f"embeddings must be (n, {self.input_dim}); got shape {X.shape}")
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            raise SchemaError(f"embedding row {int(np.flatnonzero(bad)[0])} holds NaN or inf")
        out = np.full((X.shape[0], len(APEX_TASKS)), np.nan, dtype=np.float32)
        if X.shape[0] == 0:
            return out
        parts = []
        for start in range(0, X.shape[0], batch_size):
            xb = torch.from_numpy(np.require(X[start : start + batch_size], requirements=["C", "W"])).to(self.device)
            parts.append(self._fused(xb).float().cpu().numpy())
        out[:, self._cols] = np.concatenate(parts)
        return out

    def score_songs(
        self, song_ids: Sequence[str], embeddings: np.ndarray, *, batch_size: int = PREDICT_ROWS
    ) -> pl.DataFrame:
        """A table ``song_id`` + one float32 column per APEX task."""
        if len(song_ids) != len(embeddings):
            raise SchemaError(f"{len(song_ids)} song ids for {len(embeddings)} embedding rows")
        P = self.predict(embeddings, batch_size=batch_size)
        cols: dict[str, Any] = {"song_id": pl.Series(list(song_ids), dtype=pl.String)}
        for j, t in enumerate(APEX_TASKS):
            cols[t] = pl.Series(P[:, j], dtype=pl.Float32)
        return pl.DataFrame(cols)

    def score_embeddings(
        self, emb: pl.DataFrame, *, source: str = "embeddings", batch_size: int = PREDICT_ROWS
    ) -> pl.DataFrame:
        """An embeddings table → ``song_id`` + the 7 task columns: the pure batch step of
        ``apex-rank predict``, on one machine and in each Ray actor (``--engine ray``).

        Refuses embeddings of another encoder or audio rule than the head's (naming ``source``, the file) and
        rows :func:`embedding_matrix` rejects (wrong width, NaN, a repeated id; naming the song).
        """
        if self.encoder and "encoder" in emb.columns and emb.height and emb["encoder"][0] != self.encoder:
            raise SchemaError(
                f"{source}: embeddings come from encoder {emb['encoder'][0]!r} but the model expects {self.encoder!r}"
            )
        if self.segmenting and "segmenting" in emb.columns and emb.height:
            other = emb["segmenting"].drop_nulls().unique().to_list()
            if any(rule != self.segmenting for rule in other):
                raise SchemaError(f"{source}: embeddings were cut by the audio rule {other[0]} but the model "
                                  f"was trained on {self.segmenting}")
        ids, X = embedding_matrix(emb, expected_width=self.input_dim)
        return self.score_songs(ids, X, batch_size=batch_size)

    # ---------------------------------------------------------------- persistence
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(folder / WEIGHTS))
        write_manifest(
            folder, kind=KIND, schema=SCHEMA, files=[WEIGHTS],
            payload={
                "tasks": list(self.tasks),
                "input_dim": self.input_dim,
                "n_shared": self.head.n_shared,
                "encoder": self.encoder,
                "segmenting": self.segmenting,
                "target_transform": self.target_transform,
                "extra": self.extra,
            },
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "auto") -> ApexPredictor:
        folder = Path(folder)
        man = read_manifest(folder, kind=KIND, max_schema=SCHEMA)
        try:
            head = ApexHead(int(man["input_dim"]), list(man["tasks"]), n_shared=int(man["n_shared"]))
        except KeyError as err:
            raise CheckpointError(f"{folder}/manifest.json lacks the field {err}") from err
        try:
            state = load_file(str(folder / WEIGHTS))
        except Exception as err:
            raise CheckpointError(f"{folder / WEIGHTS} is not a readable safetensors file: {err}") from err
        _load_state_checked(head, state, str(folder / WEIGHTS))
        return cls(head, encoder=man.get("encoder"), segmenting=man.get("segmenting"),
                   target_transform=man.get("target_transform") or {},
                   extra=man.get("extra") or {}, device=device)

    @classmethod
    def from_official_checkpoint(cls, path: str | Path, *, device: str = "auto") -> ApexPredictor:
        """Load the authors' released ``best_model.pt`` (task set and shared-block count from the file)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
                warnings.simplefilter("ignore", UserWarning)
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            # torch's own message advises weights_only=False, which would run the file's code:
            # never relay it (the cause stays chained for debugging)
            raise CheckpointError(
                f"{path} is not a weights-only PyTorch checkpoint (tensors and plain containers only; "
                f"{type(err).__name__} while reading it)"
            ) from err
        if not isinstance(ckpt, dict) or "model_state" not in ckpt:
            keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(f"{path}: expected a dict with 'model_state' (official APEX layout); found {keys}")
        state = ckpt["model_state"]
        task = ckpt.get("task", "full")
        if task not in TASK_SETS:
            raise CheckpointError(f"{path}: unknown task set {task!r}; expected one of {list(TASK_SETS)}")
        n_shared = int(ckpt.get("shared", 2))
        if n_shared not in TRUNK_WIDTHS:
            raise CheckpointError(f"{path}: 'shared' is {n_shared}; expected one of {sorted(TRUNK_WIDTHS)}")
        w0 = state.get("shared.0.block.0.weight") if isinstance(state, dict) else None
        if not isinstance(w0, torch.Tensor) or w0.ndim != 2:
            raise CheckpointError(f"{path}: 'model_state' lacks the tensor 'shared.0.block.0.weight'")
        head = ApexHead(int(w0.shape[1]), task, n_shared=n_shared)
        _load_state_checked(head, state, str(path))
        extra = {
            k: ckpt[k] for k in ("mode", "epoch", "val_loss") if k in ckpt and isinstance(ckpt[k], (int, float, str))
        }
        extra["source"] = "official-checkpoint"
        return cls(head, encoder="mert-v1-95m" if head.input_dim == 768 else None, extra=extra, device=device)


def _load_state_checked(head: ApexHead, state: dict[str, torch.Tensor], where: str) -> None:
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: state_dict does not match the APEX head ({len(missing)} missing keys, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    for key, ref in expected.items():
        if not isinstance(state[key], torch.Tensor):
            raise CheckpointError(f"{where}: {key!r} is a {type(state[key]).__name__}, not a tensor")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
            )
        if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            raise CheckpointError(f"{where}: tensor {key!r} holds NaN or inf")
    head.load_state_dict(state, strict=True)
    head.eval()
