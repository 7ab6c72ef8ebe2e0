"""The APEX multi-task head (official architecture) and its fused inference path.

Architecture (``APEX_SPEC.md``): a shared trunk of 2 (or 3) blocks ``Linear → BatchNorm1d →
GELU → Dropout(0.3)`` taking the song embedding (768 for MERT-95M) down to 256, then one branch
per task, ``256→128→64`` blocks with Dropout(0.1) and a final ``Linear(64, 1)``; the output is
``sigmoid(z) * scale + shift`` so each task stays in its range. Module names reproduce the
official state_dict keys (``shared.{i}.block.0.weight``, ``branch_{task}.branch.2.bias``, ...),
so the authors' checkpoint loads with ``load_state_dict(strict=True)``.

:class:`FusedApexHead` is the inference-only form: BatchNorm folded into the preceding Linear,
the first layer of the seven branches as one wide product, and on CPU every Linear with its
activation run as one oneDNN matrix product that applies bias and GELU (or the final sigmoid)
to each output tile while it is in cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from apex_rank.errors import ConfigError
from apex_rank.tasks import resolve_tasks, task_spec

#: Trunk widths after the input, by number of shared blocks (official variants).
TRUNK_WIDTHS: dict[int, tuple[int, ...]] = {2: (512, 256), 3: (512, 384, 256)}
BRANCH_WIDTHS: tuple[int, int] = (128, 64)


class _Block(nn.Module):
    """Linear → BatchNorm1d → GELU → Dropout, stored as ``block`` (official key layout)."""

    def __init__(self, d_in: int, d_out: int, dropout: float) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Branch(nn.Module):
    """One task's tower: two blocks then ``Linear(64, 1)``, stored as ``branch``."""

    def __init__(self, d_in: int, dropout: float) -> None:
        super().__init__()
        h1, h2 = BRANCH_WIDTHS
        self.branch = nn.Sequential(_Block(d_in, h1, dropout), _Block(h1, h2, dropout), nn.Linear(h2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x)


class ApexHead(nn.Module):
    """APEX multi-task regression head.

    Parameters
    ----------
    input_dim:
        Width of the song embedding (768 for MERT-v1-95M, 1024 for MERT-v1-330M).
    tasks:
        ``"full"`` (7 tasks), ``"popularity"`` (2) or a list of task names; kept in canonical order.
    n_shared:
        2 (official best) or 3 shared trunk blocks.
    dropout_shared, dropout_branch:
        Dropout rates (0.3 and 0.1 officially).

    Example
    -------
    >>> head = ApexHead()
    >>> sum(p.numel() for p in head.parameters())
    817799
    >>> head.eval()(torch.randn(4, 768)).shape
    torch.Size([4, 7])
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(
        self,
        input_dim: int = 768,
        tasks: str | Sequence[str] = "full",
        *,
        n_shared: int = 2,
        dropout_shared: float = 0.3,
        dropout_branch: float = 0.1,
    ) -> None:
        super().__init__()
        if n_shared not in TRUNK_WIDTHS:
            raise ConfigError(f"n_shared must be one of {sorted(TRUNK_WIDTHS)}, got {n_shared}")
        if input_dim < 1:
            raise ConfigError(f"input_dim must be positive, got {input_dim}")
        self.input_dim = int(input_dim)
        self.n_shared = int(n_shared)
        self.tasks: tuple[str, ...] = resolve_tasks(tasks if isinstance(tasks, str) else list(tasks))
        widths = (self.input_dim, *TRUNK_WIDTHS[n_shared])
        self.shared = nn.ModuleList(_Block(a, b, dropout_shared) for a, b in zip(widths[:-1], widths[1:]))
        for t in self.tasks:
            self.add_module(f"branch_{t}", _Branch(widths[-1], dropout_branch))
        specs = [task_spec(t) for t in self.tasks]
        self.register_buffer("scale", torch.tensor([s.scale for s in specs]), persistent=False)
        self.register_buffer("shift", torch.tensor([s.shift for s in specs]), persistent=False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.shared:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, input_dim) → (n, n_tasks) predictions on each task's native scale."""
        h = self.trunk(x)
        z = torch.cat([getattr(self, f"branch_{t}")(h) for t in self.tasks], dim=1)
        return torch.sigmoid(z) * self.scale + self.shift


def _fold_bn(linear: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (out, in) and bias (out,) of ``bn(linear(x))`` in eval mode as one affine map."""
    if not isinstance(linear, nn.Linear) or not isinstance(bn, nn.BatchNorm1d):
        raise TypeError(f"expected Linear and BatchNorm1d, got {type(linear).__name__} and {type(bn).__name__}")
    if bn.running_var is None or bn.running_mean is None:
        raise TypeError("BatchNorm1d without running statistics cannot be folded")
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_var)
    s = gamma / torch.sqrt(bn.running_var + bn.eps)
    w = linear.weight * s[:, None]
    b = (linear.bias - bn.running_mean) * s + beta
    return w.detach(), b.detach()


def has_fused_linear() -> bool:
    """Whether this torch build has oneDNN's fused linear (``mkldnn._linear_pointwise``, the op
    torch's own compiler emits for Linear + activation on CPU)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class FusedApexHead(nn.Module):
    """Inference-only equivalent of an :class:`ApexHead` in eval mode (dropout off, BN folded).

    Built from a trained head with :meth:`from_head`; equal to it within float32 rounding.

    Why it is fast on CPU (``python -m bench.apex_head --profile``, batch 4096, 2-core AMD
    EPYC): the plain module, and this class before issue 15, spent their time in MKL's sgemm,
    which on this AMD CPU runs about half as fast as oneDNN's matrix product at the same shapes,
    plus a separate pass per GELU (erf over 4096 x 2112 values), a copy of the broadcast bias
    into every output (``addmm``) and the batched branch products over a transposed view. Here
    every layer is one oneDNN product whose bias and exact (erf) GELU, or the final sigmoid, are
    applied to each output tile while it is in cache; each task's second layer reads its 128
    columns of the wide first layer's output in place (from :attr:`per_task_rows` rows). What
    remains beyond the matrix products alone (x1.04-1.13 of them in bench runs under load) is
    mostly the GELU arithmetic itself, which no layout removes.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, head: ApexHead) -> None:
        super().__init__()
        self.tasks = head.tasks
        trunk = []
        for block in head.shared:
            seq = cast(nn.Sequential, block.get_submodule("block"))
            trunk.append(_fold_bn(seq[0], seq[1]))
        # Weights (out, in), contiguous: the layout oneDNN's linear and F.linear take without a copy.
        self.trunk_w = nn.ParameterList(nn.Parameter(w.contiguous(), requires_grad=False) for w, _ in trunk)
        self.trunk_b = nn.ParameterList(nn.Parameter(b, requires_grad=False) for _, b in trunk)
        l1, l2, l3 = [], [], []
        for t in head.tasks:
            seq = getattr(head, f"branch_{t}").branch
            l1.append(_fold_bn(seq[0].block[0], seq[0].block[1]))
            l2.append(_fold_bn(seq[1].block[0], seq[1].block[1]))
            l3.append((seq[2].weight.detach(), seq[2].bias.detach()))
        # First branch layer of all tasks as one (T*128, 256) product.
        self.w1 = nn.Parameter(torch.cat([w for w, _ in l1], 0).contiguous(), requires_grad=False)
        self.b1 = nn.Parameter(torch.cat([b for _, b in l1], 0), requires_grad=False)
        # Second and third layers per task, (T, 64, 128) and (T, 1, 64): task t's product reads
        # its 128 columns of the first layer's output in place.
        self.w2 = nn.Parameter(torch.stack([w for w, _ in l2]).contiguous(), requires_grad=False)
        self.b2 = nn.Parameter(torch.stack([b for _, b in l2]), requires_grad=False)
        self.w3 = nn.Parameter(torch.stack([w for w, _ in l3]).contiguous(), requires_grad=False)
        self.b3 = nn.Parameter(torch.stack([b for _, b in l3]), requires_grad=False)
        self.register_buffer("scale", head.scale.clone(), persistent=False)
        self.register_buffer("shift", head.shift.clone(), persistent=False)
        self.h1 = BRANCH_WIDTHS[0]
        #: Use oneDNN's fused Linear + activation for inputs on the CPU (else F.linear, then it).
        self.onednn = has_fused_linear()

    @classmethod
    def from_head(cls, head: ApexHead) -> FusedApexHead:
        return cls(head).eval()

    #: Rows per block: bounds the intermediates of a large batch (the predictor passes up to
    #: 65536 rows) to 4096 x 896 floats. With the GELU applied inside the matrix product there
    #: is no separate pass left to keep in cache: blocks of 512 rows were no faster at 4096.
    block_rows = 4096
    #: From this many rows (and with oneDNN) each task's second and third layer run as oneDNN
    #: products with bias and activation inside; below it as two batched products over the
    #: tasks, because 14 small calls cost ~35 us each: at 4096 rows per task was 61 ms against
    #: 71 ms batched, at 64 rows 2.0 ms against 1.4 ms.
    per_task_rows = 512

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.block_rows:
            return torch.cat([self._forward_block(b) for b in torch.split(x, self.block_rows)])
        return self._forward_block(x)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, activation: str) -> torch.Tensor:
        """``activation(x @ w.T + b)``: ``gelu`` (exact, erf, as ``nn.GELU()``) or ``sigmoid``."""
        if self.onednn and x.device.type == "cpu":
            return torch.ops.mkldnn._linear_pointwise(x, w, b, activation, [None] if activation == "gelu" else [],
                                                      "none" if activation == "gelu" else "")
        act = nn.functional.gelu if activation == "gelu" else torch.sigmoid
        return act(nn.functional.linear(x, w, b))

    def _forward_block(self, x: torch.Tensor) -> torch.Tensor:
        for w, b in zip(self.trunk_w, self.trunk_b):
            x = self._linear(x, w, b, "gelu")
        h = self._linear(x, self.w1, self.b1, "gelu")  # (n, T*128)
        n, t, h1 = h.shape[0], len(self.tasks), self.h1
        if self.onednn and h.device.type == "cpu" and n >= self.per_task_rows:
            z = torch.cat([
                self._linear(self._linear(h[:, i * h1 : (i + 1) * h1], self.w2[i], self.b2[i], "gelu"),
                             self.w3[i], self.b3[i], "sigmoid")
                for i in range(t)], 1)  # (n, T)
        else:
            hb = h.view(n, t, h1).transpose(0, 1)  # (T, n, 128)
            hb = nn.functional.gelu(torch.baddbmm(self.b2[:, None, :], hb, self.w2.transpose(1, 2)))  # (T, n, 64)
            z = torch.sigmoid(torch.baddbmm(self.b3[:, None, :], hb, self.w3.transpose(1, 2))[:, :, 0].t())
        return z * self.scale + self.shift
