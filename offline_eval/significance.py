"""Paired significance over users: hybrid vs each baseline on a per-user metric.

For paired per-user values ``a_u`` (model A) and ``b_u`` (model B), ``d_u = a_u - b_u``,
``n`` users, mean ``d̄`` and sample standard deviation ``s_d``:

- paired t-test: ``t = d̄ / (s_d / √n)`` with ``n - 1`` degrees of freedom (two-sided p);
- randomization (sign-flip) test: p = (1 + #{r : |mean(σ_r · d)| ≥ |d̄|}) / (1 + R) over R
  random sign vectors σ_r ∈ {±1}^n (two-sided, seeded);
- effect size: Cohen's ``d_z = d̄ / s_d`` (0 when s_d = 0);
- 95% bootstrap interval of ``d̄``: the 2.5% and 97.5% percentiles of the mean of d over B
  resamples of users with replacement (seeded);
- Holm correction over m comparisons: sort p ascending ``p_(1) ≤ … ≤ p_(m)``,
  ``p̃_(j) = max_{i≤j} min(1, (m - i + 1) · p_(i))``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from apex_rank.errors import SchemaError


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adj = np.maximum.accumulate(adj)
    out = np.empty(m)
    out[order] = adj
    return out.tolist()


def paired_test(
    a: np.ndarray, b: np.ndarray, *, n_permutations: int = 10000, n_bootstrap: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Compare paired per-user values ``a`` and ``b`` (see module doc).

    Returns ``{"n", "mean_a", "mean_b", "mean_diff", "t", "p_t", "p_randomization",
    "effect_size_dz", "ci95_low", "ci95_high"}``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise SchemaError(f"paired values must be two 1-d arrays of one length; got {a.shape} and {b.shape}")
    n = a.size
    d = a - b
    res: dict[str, float] = {"n": float(n), "mean_a": float(a.mean()) if n else float("nan"),
                             "mean_b": float(b.mean()) if n else float("nan")}
    if n < 2:
        res.update(mean_diff=float(d.mean()) if n else float("nan"), t=float("nan"), p_t=float("nan"),
                   p_randomization=float("nan"), effect_size_dz=float("nan"),
                   ci95_low=float("nan"), ci95_high=float("nan"))
        return res
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        t, p_t = (0.0, 1.0) if mean == 0.0 else (float("inf") * np.sign(mean), 0.0)
    else:
        t = mean / (sd / np.sqrt(n))
        p_t = float(2.0 * stats.t.sf(abs(t), n - 1))
    rng = np.random.default_rng(seed)
    obs = abs(mean)
    count = 0
    for start in range(0, n_permutations, 1000):
        r = min(1000, n_permutations - start)
        signs = rng.integers(0, 2, size=(r, n), dtype=np.int8) * 2 - 1
        count += int((np.abs(signs @ d) / n >= obs - 1e-15).sum())
    p_rand = (1 + count) / (1 + n_permutations)
    boots = np.empty(n_bootstrap)
    for start in range(0, n_bootstrap, 500):
        r = min(500, n_bootstrap - start)
        idx = rng.integers(0, n, size=(r, n))
        boots[start : start + r] = d[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    res.update(mean_diff=mean, t=float(t), p_t=float(p_t), p_randomization=float(p_rand),
               effect_size_dz=mean / sd if sd > 0 else 0.0, ci95_low=float(lo), ci95_high=float(hi))
    return res


def compare_to_reference(
    per_user: Mapping[str, np.ndarray], reference: str, *, alpha: float = 0.05,
    n_permutations: int = 10000, n_bootstrap: int = 2000, seed: int = 0,
) -> dict[str, dict[str, float | bool]]:
    """``reference`` vs every other model in ``per_user`` (aligned arrays), Holm-corrected.

    Adds ``p_holm`` (Holm over the randomization p-values of all comparisons) and
    ``significant`` (``p_holm < alpha``) to each :func:`paired_test` result.
    """
    if reference not in per_user:
        raise SchemaError(f"reference model {reference!r} has no per-user values")
    others = [m for m in per_user if m != reference]
    results: dict[str, dict[str, float | bool]] = {}
    for i, m in enumerate(others):
        results[m] = dict(paired_test(per_user[reference], per_user[m], n_permutations=n_permutations,
                                      n_bootstrap=n_bootstrap, seed=seed + i))
    adj = holm([float(results[m]["p_randomization"]) for m in others])
    for m, p in zip(others, adj, strict=True):
        results[m]["p_holm"] = p
        results[m]["significant"] = bool(p < alpha)
    return results
