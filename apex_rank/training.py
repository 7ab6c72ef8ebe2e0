"""Training the APEX head (official settings by default, see ``APEX_SPEC.md``).

Loss: MSE per task on the native scale, with unlabelled rows (NaN label) masked out of that
task's loss, combined by one of three rules:

- ``equal``: plain sum of task losses;
- ``weighted``: 5 × each popularity task + 1 × each aesthetic task (the paper's fixed weights);
- ``uncertainty`` (default, the paper's best): one learned log σ_t per task, initial 0,
  total = Σ L_t / (2·exp(log σ_t)²) + log σ_t.

AdamW (lr 1e-4, weight decay 1e-4), cosine annealing over the epochs, gradient clipping at
norm 1.0, early stopping on the total validation loss (patience 20), seed 42, bf16 autocast on
CUDA. Song mode trains on one vector per song; segment mode on one row per 30 s segment
carrying its song's labels, and evaluation averages segment predictions per song first.
Progress goes to a tqdm bar and ``logging``; epoch results are also passed to callbacks.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from apex_rank.device import resolve_device
from apex_rank.errors import ConfigError, SchemaError
from apex_rank.model import ApexHead
from apex_rank.tasks import resolve_tasks, task_spec

log = logging.getLogger(__name__)

LossKind = Literal["equal", "weighted", "uncertainty"]
EpochCallback = Callable[[int, dict[str, Any]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :class:`ApexTrainer` (defaults = the official release).

    Attributes
    ----------
    tasks: task set name or names to train. n_shared: 2 or 3 trunk blocks.
    loss: ``equal``, ``weighted`` or ``uncertainty``. lr, weight_decay: AdamW.
    epochs: cosine period and maximum epochs. patience: early-stopping patience (epochs).
    batch_size: rows per step. grad_clip: max gradient norm (0 disables).
    seed: seeds torch and the batch order. device: ``auto``/``cpu``/``cuda``.
    mixed_precision: bf16 autocast on CUDA (ignored on CPU). mode: ``song`` or ``segment``.
    dropout_shared, dropout_branch: dropout rates. progress: show a tqdm bar.
    """

    tasks: str | tuple[str, ...] = "full"
    n_shared: int = 2
    loss: LossKind = "uncertainty"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    epochs: int = 50
    patience: int = 20
    batch_size: int = 512
    grad_clip: float = 1.0
    seed: int = 42
    device: str = "auto"
    mixed_precision: bool = True
    mode: Literal["song", "segment"] = "song"
    dropout_shared: float = 0.3
    dropout_branch: float = 0.1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss not in ("equal", "weighted", "uncertainty"):
            raise ConfigError(f"loss must be 'equal', 'weighted' or 'uncertainty', got {self.loss!r}")
        if self.mode not in ("song", "segment"):
            raise ConfigError(f"mode must be 'song' or 'segment', got {self.mode!r}")
        for name in ("lr", "epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")


class MultiTaskLoss(nn.Module):
    """Masked per-task MSE combined by the configured rule (see module doc)."""

    def __init__(self, tasks: Sequence[str], kind: LossKind) -> None:
        super().__init__()
        self.kind = kind
        self.tasks = tuple(tasks)
        weights = [5.0 if task_spec(t).kind == "popularity" else 1.0 for t in self.tasks]
        self.register_buffer("fixed_weights", torch.tensor(weights))
        self.fixed_weights: torch.Tensor
        self.log_sigma = nn.Parameter(torch.zeros(len(self.tasks)), requires_grad=(kind == "uncertainty"))

    def task_losses(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked MSE per task (T,) and the labelled-row count per task (T,)."""
        mask = torch.isfinite(target)
        diff = torch.where(mask, pred.float() - torch.nan_to_num(target), torch.zeros_like(pred, dtype=torch.float32))
        count = mask.sum(0)
        losses = (diff**2).sum(0) / count.clamp(min=1)
        return losses, count

    def combine(self, losses: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        present = (count > 0).float()  # a task with no label in the batch contributes nothing
        if self.kind == "equal":
            return (losses * present).sum()
        if self.kind == "weighted":
            return (losses * self.fixed_weights * present).sum()
        terms = losses / (2.0 * torch.exp(self.log_sigma) ** 2) + self.log_sigma
        return (terms * present).sum()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.combine(*self.task_losses(pred, target))


@dataclass
class TrainResult:
    """What :meth:`ApexTrainer.fit` returns: the best model (by validation loss) and its story."""

    model: ApexHead
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    log_sigma: dict[str, float] = field(default_factory=dict)


def _as_arrays(X: np.ndarray, Y: np.ndarray, n_tasks: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.ascontiguousarray(X, dtype=np.float32)
    Y = np.ascontiguousarray(Y, dtype=np.float32)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0] or Y.shape[1] != n_tasks:
        raise SchemaError(f"{name}: expected X (n, d) and Y (n, {n_tasks}); got {X.shape} and {Y.shape}")
    if X.shape[0] == 0:
        raise SchemaError(f"{name}: no rows")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise SchemaError(f"{name}: embedding row {int(np.flatnonzero(bad)[0])} holds NaN or inf")
    if np.isinf(Y).any():
        raise SchemaError(f"{name}: labels hold inf (use NaN for a missing label)")
    return X, Y


class ApexTrainer:
    """Fit an :class:`ApexHead` on embeddings and (possibly partial) labels.

    Example
    -------
    >>> trainer = ApexTrainer(TrainConfig(epochs=5, progress=False))
    >>> result = trainer.fit(X_train, Y_train, X_val, Y_val)  # doctest: +SKIP
    >>> result.model  # best epoch's weights, in eval mode  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig | None = None, *, callbacks: Sequence[EpochCallback] = ()) -> None:
        self.config = config or TrainConfig()
        self.callbacks = list(callbacks)
        self.tasks = resolve_tasks(self.config.tasks if isinstance(self.config.tasks, str) else list(self.config.tasks))

    def fit(self, X_train: np.ndarray, Y_train: np.ndarray, X_val: np.ndarray, Y_val: np.ndarray) -> TrainResult:
        """Train with early stopping on (X_val, Y_val); Y columns follow ``self.tasks``, NaN = missing."""
        cfg = self.config
        T = len(self.tasks)
        X_train, Y_train = _as_arrays(X_train, Y_train, T, "training set")
        X_val, Y_val = _as_arrays(X_val, Y_val, T, "validation set")
        if X_val.shape[1] != X_train.shape[1]:
            raise SchemaError(f"validation width {X_val.shape[1]} != training width {X_train.shape[1]}")
        for j, t in enumerate(self.tasks):
            spec = task_spec(t)
            col = Y_train[:, j]
            lab = col[np.isfinite(col)]
            if lab.size and (lab.min() < spec.low or lab.max() > spec.high):
                raise SchemaError(
                    f"training labels of {t!r} leave [{spec.low}, {spec.high}]: min {lab.min()}, max {lab.max()}"
                )
            if lab.size == 0:
                log.warning("task %s has no labelled training rows; its branch will not learn", t)

        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        model = ApexHead(
            X_train.shape[1], self.tasks, n_shared=cfg.n_shared,
            dropout_shared=cfg.dropout_shared, dropout_branch=cfg.dropout_branch,
        ).to(device)
        criterion = MultiTaskLoss(self.tasks, cfg.loss).to(device)
        params = list(model.parameters()) + ([criterion.log_sigma] if cfg.loss == "uncertainty" else [])
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
        amp = cfg.mixed_precision and device.type == "cuda"

        Xt = torch.from_numpy(X_train).to(device)
        Yt = torch.from_numpy(Y_train).to(device)
        Xv = torch.from_numpy(X_val).to(device)
        Yv = torch.from_numpy(Y_val).to(device)
        n = Xt.shape[0]

        best_loss, best_epoch, best_state, bad_epochs = math.inf, -1, None, 0
        best_sigma = criterion.log_sigma.detach().cpu().clone()
        history: list[dict[str, Any]] = []
        bar = tqdm(range(cfg.epochs), desc="train APEX", unit="epoch", disable=not cfg.progress)
        for epoch in bar:
            model.train()
            perm = torch.from_numpy(rng.permutation(n)).to(device)
            total, steps = 0.0, 0
            for start in range(0, n, cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                if idx.numel() < 2:  # BatchNorm cannot train on a single row
                    continue
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    pred = model(Xt[idx])
                loss = criterion(pred, Yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                total += float(loss.detach())
                steps += 1
            sched.step()
            val_losses, val_count = self._evaluate_loss(model, criterion, Xv, Yv, amp, device)
            val_total = float(criterion.combine(val_losses, val_count).detach())
            logs = {
                "epoch": epoch,
                "train_loss": total / max(steps, 1),
                "val_loss": val_total,
                "val_task_mse": {t: float(v) for t, v in zip(self.tasks, val_losses.cpu())},
                "log_sigma": {t: float(v) for t, v in zip(self.tasks, criterion.log_sigma.detach().cpu())},
                "lr": sched.get_last_lr()[0],
            }
            history.append(logs)
            log.info("epoch %d train %.4f val %.4f per-task %s log-sigma %s", epoch, logs["train_loss"],
                     val_total, logs["val_task_mse"], logs["log_sigma"])
            for cb in self.callbacks:
                cb(epoch, logs)
            bar.set_postfix(train=f"{logs['train_loss']:.3f}", val=f"{val_total:.3f}")
            if val_total < best_loss - 1e-12:
                best_loss, best_epoch, bad_epochs = val_total, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                best_sigma = criterion.log_sigma.detach().cpu().clone()
            else:
                bad_epochs += 1
                if bad_epochs >= cfg.patience:
                    log.info("early stop at epoch %d (best %d, val %.4f)", epoch, best_epoch, best_loss)
                    break
        bar.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval().cpu()
        return TrainResult(
            model=model, best_epoch=best_epoch, best_val_loss=best_loss, history=history,
            log_sigma={t: float(v) for t, v in zip(self.tasks, best_sigma)},
        )

    @staticmethod
    @torch.no_grad()
    def _evaluate_loss(
        model: ApexHead, criterion: MultiTaskLoss, X: torch.Tensor, Y: torch.Tensor, amp: bool, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        preds = []
        for start in range(0, X.shape[0], 8192):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                preds.append(model(X[start : start + 8192]).float())
        return criterion.task_losses(torch.cat(preds), Y)
