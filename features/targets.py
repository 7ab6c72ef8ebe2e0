"""Popularity targets: raw play/like counts → 0-100 scores, as in APEX.

score = 100 · p^γ, where p ∈ [0, 1] is the count's percentile within its platform's training
distribution. Definitions, fixed here so every split agrees:

- percentile of a training count c: p = (r̄(c) − 1) / (n − 1), with r̄(c) the *average*
  1-based rank of c among the n training counts (ties share their mean rank);
- zero counts: p = 0 exactly, whatever their number (a song nobody played is the floor);
- other splits: p is interpolated linearly in log1p(count) between the training knots
  (0 → 0, then each distinct positive training count → its p); counts above the training
  maximum get 1, counts between 0 and the smallest positive training count interpolate from 0;
- platforms: fitted per platform when a platform column is given; a platform not seen in
  training uses the pooled mapping (with a log line);
- null counts stay null (unlabelled), negative or NaN counts are a :class:`SchemaError`.

The mapping is fitted on the training split only (:meth:`PopularityTransform.fit`), so no
information leaks from validation or test counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apex_rank.errors import NotFittedError, SchemaError

log = logging.getLogger(__name__)

POOLED = "__all__"


def _knots(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation knots (log1p(count), p) from training counts, p by average rank."""
    n = counts.size
    values, inverse_counts = np.unique(counts, return_counts=True)
    # Average 1-based rank of each distinct value: (#below) + (ties + 1) / 2.
    below = np.concatenate([[0], np.cumsum(inverse_counts)[:-1]])
    avg_rank = below + (inverse_counts + 1) / 2.0
    p = (avg_rank - 1.0) / (n - 1.0) if n > 1 else np.ones_like(avg_rank)
    p = np.where(values == 0, 0.0, p)
    if values[0] != 0:  # anchor the floor: a zero count always maps to p = 0
        values = np.concatenate([[0.0], values])
        p = np.concatenate([[0.0], p])
    return np.log1p(values.astype(np.float64)), p.astype(np.float64)


@dataclass
class PopularityTransform:
    """Percentile-power transform of popularity counts (see module doc).

    Example
    -------
    >>> t = PopularityTransform(gamma=1.0).fit(np.array([0, 1, 5, 10, 100]))
    >>> t.transform(np.array([0, 10, 1000])).round(1).tolist()
    [0.0, 75.0, 100.0]
    """

    gamma: float = 1.0
    knots: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.gamma > 0 and np.isfinite(self.gamma)):
            raise SchemaError(f"gamma must be a positive finite number, got {self.gamma}")

    @staticmethod
    def _check(counts: np.ndarray, name: str) -> np.ndarray:
        c = np.asarray(counts, dtype=np.float64)
        finite = c[~np.isnan(c)]
        if np.isinf(finite).any() or (finite < 0).any():
            bad = finite[(finite < 0) | np.isinf(finite)][0]
            raise SchemaError(f"{name}: popularity count {bad} is negative or infinite")
        return c

    def fit(self, counts: np.ndarray | Sequence[float], platforms: Sequence[str] | None = None, *,
            name: str = "counts") -> PopularityTransform:
        """Fit on training counts (NaN = unknown, ignored); per platform when given."""
        c = self._check(np.asarray(counts, dtype=np.float64), name)
        keep = ~np.isnan(c)
        if keep.sum() == 0:
            raise SchemaError(f"{name}: no known counts to fit the popularity transform on")
        self.knots = {}
        xs, ps = _knots(c[keep])
        self.knots[POOLED] = (xs.tolist(), ps.tolist())
        if platforms is not None:
            plat = np.asarray(platforms, dtype=object)
            if plat.shape[0] != c.shape[0]:
                raise SchemaError(f"{name}: {plat.shape[0]} platforms for {c.shape[0]} counts")
            for pname in sorted({str(p) for p in plat[keep]}):
                sel = keep & (plat == pname)
                xs, ps = _knots(c[sel])
                self.knots[pname] = (xs.tolist(), ps.tolist())
        return self

    def percentile(self, counts: np.ndarray | Sequence[float], platforms: Sequence[str] | None = None) -> np.ndarray:
        """p ∈ [0, 1] for each count (NaN stays NaN)."""
        if not self.knots:
            raise NotFittedError("PopularityTransform.fit must be called before transform")
        c = self._check(np.asarray(counts, dtype=np.float64), "counts")
        out = np.full(c.shape, np.nan)
        if platforms is None:
            groups = {POOLED: np.ones(c.shape, dtype=bool)}
        else:
            plat = np.asarray(platforms, dtype=object)
            groups = {str(p): plat == p for p in set(plat.tolist())}
        for pname, sel in groups.items():
            key = pname if pname in self.knots else POOLED
            if key != pname:
                log.info("platform %r was not in the training split; using the pooled percentiles", pname)
            xs, ps = self.knots[key]
            m = sel & ~np.isnan(c)
            out[m] = np.interp(np.log1p(c[m]), xs, ps, left=0.0, right=1.0)
        return out

    def transform(self, counts: np.ndarray | Sequence[float], platforms: Sequence[str] | None = None) -> np.ndarray:
        """Scores 100 · p^γ in [0, 100] (NaN stays NaN)."""
        return 100.0 * np.power(self.percentile(counts, platforms), self.gamma)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "percentile-power", "gamma": self.gamma, "knots": self.knots}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PopularityTransform:
        if data.get("kind") != "percentile-power":
            raise SchemaError(f"not a percentile-power transform: kind {data.get('kind')!r}")
        knots = {k: (list(v[0]), list(v[1])) for k, v in data["knots"].items()}
        return cls(gamma=float(data["gamma"]), knots=knots)
