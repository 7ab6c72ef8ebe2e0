"""The APEX head: official architecture, official checkpoint layout, fused inference path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apex_rank import APEX_TASKS, CheckpointError, ConfigError
from apex_rank.model import ApexHead, FusedApexHead, has_fused_linear
from apex_rank.predictor import ApexPredictor


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    ("tasks", "n_shared", "expected"),
    [("full", 2, 817_799), ("popularity", 2, 609_794), ("full", 3, 982_791)],
)
def test_parameter_counts_match_the_paper(tasks: str, n_shared: int, expected: int) -> None:
    assert n_params(ApexHead(768, tasks, n_shared=n_shared)) == expected


def test_state_dict_uses_official_key_names() -> None:
    keys = set(ApexHead().state_dict())
    assert "shared.0.block.0.weight" in keys
    assert "shared.1.block.1.running_var" in keys
    for t in APEX_TASKS:
        assert f"branch_{t}.branch.0.block.0.weight" in keys
        assert f"branch_{t}.branch.1.block.1.running_mean" in keys
        assert f"branch_{t}.branch.2.bias" in keys


def test_outputs_stay_in_each_task_range() -> None:
    torch.manual_seed(0)
    head = ApexHead(16).eval()
    y = head(torch.randn(256, 16) * 50)
    assert (y[:, :2] >= 0).all() and (y[:, :2] <= 100).all()
    assert (y[:, 2:] >= 1).all() and (y[:, 2:] <= 5).all()


def test_task_subset_is_kept_in_canonical_order() -> None:
    head = ApexHead(8, ["clarity", "score_streams"])
    assert head.tasks == ("score_streams", "clarity")


def test_bad_shared_count_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="n_shared"):
        ApexHead(768, n_shared=4)


def _randomise_bn(head: ApexHead, seed: int = 0) -> ApexHead:
    """Give BatchNorm layers non-trivial running stats and affine params (as after training)."""
    g = torch.Generator().manual_seed(seed)
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return head.eval()


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "linear-then-gelu"])
@pytest.mark.parametrize(("tasks", "n_shared"), [("full", 2), ("full", 3), ("popularity", 2)])
def test_fused_head_equals_plain_module(tasks: str, n_shared: int, onednn: bool) -> None:
    if onednn and not has_fused_linear():
        pytest.skip("this torch build has no oneDNN fused linear")
    torch.manual_seed(1)
    head = _randomise_bn(ApexHead(768, tasks, n_shared=n_shared))
    x = torch.randn(1300, 768)
    with torch.no_grad():
        plain = head(x)
    fused = FusedApexHead.from_head(head)
    fused.onednn = onednn
    fused.block_rows = 512  # three blocks; the last one, 276 rows, takes the batched-branch path
    out = fused(x)
    assert out.shape == plain.shape
    assert float((out - plain).abs().max()) < 1e-4
    assert float((fused(x[:1]) - plain[:1]).abs().max()) < 1e-4  # one song, as ingest predicts it


def _write_official(path: Path, head: ApexHead, task: str, shared: int) -> None:
    # The official release's file: a torch.save dict around the model's state_dict.
    torch.save(
        {
            "model_state": head.state_dict(),
            "task": task,
            "shared": shared,
            "mode": "song",
            "epoch": 17,
            "val_loss": 1.234,
            "optimizer_state": {"param_groups": [{"lr": 1e-4}]},
            "scheduler_state": {"last_epoch": 17},
        },
        path,
    )


@pytest.mark.parametrize(("task", "shared"), [("full", 2), ("popularity", 2), ("full", 3)])
def test_official_checkpoint_loads_and_predicts_like_the_source(tmp_path: Path, task: str, shared: int) -> None:
    torch.manual_seed(2)
    src = _randomise_bn(ApexHead(768, task, n_shared=shared), seed=3)
    ckpt = tmp_path / "best_model.pt"
    _write_official(ckpt, src, task, shared)
    pred = ApexPredictor.from_official_checkpoint(ckpt, device="cpu")
    assert pred.head.n_shared == shared and pred.tasks == src.tasks
    x = torch.randn(64, 768)
    with torch.no_grad():
        expected = src(x).numpy()
    got = pred.predict(x.numpy())
    cols = [APEX_TASKS.index(t) for t in src.tasks]
    np.testing.assert_allclose(got[:, cols], expected, atol=1e-4)
    if task == "popularity":
        assert np.isnan(got[:, 2:]).all()


def test_checkpoint_of_the_wrong_shape_names_the_tensor(tmp_path: Path) -> None:
    head = ApexHead(768)
    state = head.state_dict()
    state["branch_clarity.branch.2.weight"] = torch.zeros(1, 32)
    torch.save({"model_state": state, "task": "full", "shared": 2}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"branch_clarity\.branch\.2\.weight"):
        ApexPredictor.from_official_checkpoint(tmp_path / "bad.pt")


def test_checkpoint_with_missing_keys_is_rejected(tmp_path: Path) -> None:
    state = ApexHead(768).state_dict()
    del state["branch_coherence.branch.2.bias"]
    torch.save({"model_state": state, "task": "full", "shared": 2}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        ApexPredictor.from_official_checkpoint(tmp_path / "bad.pt")


def test_a_file_that_is_not_a_checkpoint_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "notes.pt"
    f.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt"):
        ApexPredictor.from_official_checkpoint(f)


def test_a_dict_without_model_state_is_rejected(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="model_state"):
        ApexPredictor.from_official_checkpoint(tmp_path / "x.pt")


def test_unknown_task_set_is_rejected(tmp_path: Path) -> None:
    torch.save({"model_state": ApexHead(768).state_dict(), "task": "vibes", "shared": 2}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="vibes"):
        ApexPredictor.from_official_checkpoint(tmp_path / "x.pt")
