"""Content → CF map: a ridge regression E → V fitted on warm songs, giving pseudo factors V̂.

A cold song has an embedding E but no CF factor; ``ContentToCF.predict(E)`` gives V̂ = [E, 1]·W
with W = argmin ‖[E, 1]W − V‖² + λ‖W‖² (bias unpenalised) over the warm songs. A user factor u
then scores a cold song by u·V̂, the "pseudo-CF" score.

Example
-------
>>> import numpy as np
>>> E = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
>>> m = ContentToCF(1.0).fit(E, E[:, :3] * 2)
>>> m.predict(E[:2]).shape
(2, 3)
"""

from __future__ import annotations

import numpy as np

from apex_rank.errors import ConfigError, NotFittedError, SchemaError


class ContentToCF:
    """Ridge map from content embeddings (n, d) to CF factors (n, f)."""

    def __init__(self, regularization: float = 1.0) -> None:
        if regularization < 0:
            raise ConfigError(f"content_map regularization must be >= 0, got {regularization}")
        self.regularization = float(regularization)
        self.W: np.ndarray | None = None

    def fit(self, E: np.ndarray, V: np.ndarray) -> ContentToCF:
        """Fit on warm songs: E (n, d) embeddings, V (n, f) their CF factors."""
        E = np.asarray(E, dtype=np.float64)
        V = np.asarray(V, dtype=np.float64)
        if E.ndim != 2 or V.ndim != 2 or E.shape[0] != V.shape[0]:
            raise SchemaError(f"content map needs E (n, d) and V (n, f) with the same n; got {E.shape}, {V.shape}")
        if E.shape[0] == 0:
            raise SchemaError("content map needs at least one warm song to fit on")
        X = np.hstack([E, np.ones((E.shape[0], 1))])
        reg = self.regularization * np.eye(X.shape[1])
        reg[-1, -1] = 0.0
        self.W = np.linalg.solve(X.T @ X + reg + 1e-8 * np.eye(X.shape[1]), X.T @ V).astype(np.float32)
        return self

    def predict(self, E: np.ndarray) -> np.ndarray:
        """Pseudo factors V̂ (n, f), contiguous float32."""
        if self.W is None:
            raise NotFittedError("ContentToCF is not fitted")
        E = np.asarray(E, dtype=np.float32)
        if E.ndim != 2 or E.shape[1] != self.W.shape[0] - 1:
            raise SchemaError(f"embeddings must be (n, {self.W.shape[0] - 1}); got {E.shape}")
        return np.ascontiguousarray(E @ self.W[:-1] + self.W[-1], dtype=np.float32)
