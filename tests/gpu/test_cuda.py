"""CUDA paths (skipped without a GPU): APEX training and inference on CUDA match the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_rank.model import ApexHead
from apex_rank.predictor import ApexPredictor
from apex_rank.training import ApexTrainer, TrainConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fused_inference_on_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    head = ApexHead(768).eval()
    X = np.random.default_rng(0).normal(size=(4096, 768)).astype(np.float32)
    cpu = ApexPredictor(head, device="cpu").predict(X)
    gpu = ApexPredictor(head, device="cuda").predict(X)
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)  # TF32 may be on for CUDA matmuls


def test_training_on_cuda_with_mixed_precision_learns() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 64)).astype(np.float32)
    s = np.tanh(X @ rng.normal(size=64) / 8)
    Y = np.stack([50 + 40 * s, 3 + 1.5 * s], 1).astype(np.float32)
    cfg = TrainConfig(tasks=("score_streams", "coherence"), epochs=20, lr=3e-3, device="cuda", progress=False)
    result = ApexTrainer(cfg).fit(X[:3500], Y[:3500], X[3500:], Y[3500:])
    assert result.best_val_loss < result.history[0]["val_loss"]
