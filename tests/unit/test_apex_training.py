"""ApexTrainer: loss rules, label masking, early stopping, learning a planted problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from apex_rank import SchemaError
from apex_rank.metrics import aggregate_by_song, regression_metrics
from apex_rank.training import ApexTrainer, MultiTaskLoss, TrainConfig

TASKS = ("score_streams", "coherence")


def test_a_task_without_labels_in_the_batch_contributes_nothing() -> None:
    for kind in ("equal", "weighted", "uncertainty"):
        loss_fn = MultiTaskLoss(TASKS, kind)  # type: ignore[arg-type]
        pred = torch.tensor([[50.0, 3.0], [60.0, 2.0]], requires_grad=True)
        target = torch.tensor([[40.0, np.nan], [70.0, np.nan]])
        loss = loss_fn(pred, target)
        loss.backward()
        assert pred.grad is not None
        assert torch.all(pred.grad[:, 1] == 0), kind  # coherence got no gradient
        assert torch.all(pred.grad[:, 0] != 0), kind
        if kind == "uncertainty":  # its log-sigma gets no gradient either
            assert loss_fn.log_sigma.grad is not None and loss_fn.log_sigma.grad[1] == 0


def test_masked_rows_do_not_change_the_loss() -> None:
    loss_fn = MultiTaskLoss(TASKS, "equal")
    pred = torch.tensor([[50.0, 3.0], [60.0, 2.0], [10.0, 4.0]])
    full = loss_fn(pred[:2], torch.tensor([[40.0, 3.5], [70.0, 2.5]]))
    with_missing_row = loss_fn(pred, torch.tensor([[40.0, 3.5], [70.0, 2.5], [np.nan, np.nan]]))
    assert torch.isclose(full, with_missing_row)


def test_loss_rules() -> None:
    pred = torch.tensor([[50.0, 3.0]])
    target = torch.tensor([[40.0, 4.0]])  # task MSEs 100 and 1
    assert float(MultiTaskLoss(TASKS, "equal")(pred, target)) == pytest.approx(101.0)
    assert float(MultiTaskLoss(TASKS, "weighted")(pred, target)) == pytest.approx(5 * 100 + 1)
    unc = MultiTaskLoss(TASKS, "uncertainty")
    with torch.no_grad():
        unc.log_sigma.copy_(torch.tensor([1.0, 0.0]))
    expected = 100 / (2 * np.exp(1.0) ** 2) + 1.0 + 1 / 2 + 0.0
    assert float(unc(pred, target).detach()) == pytest.approx(expected, rel=1e-6)


def _planted(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    w = np.random.default_rng(123).normal(size=d) / np.sqrt(d)
    s = np.tanh(X @ w)  # a smooth function of the embedding
    Y = np.stack([50 + 40 * s, 3 + 1.5 * s], axis=1).astype(np.float32)
    return X, Y


def test_training_learns_a_planted_smooth_target_with_partial_labels() -> None:
    Xtr, Ytr = _planted(1200, 32, 0)
    Xva, Yva = _planted(400, 32, 1)
    Xte, Yte = _planted(600, 32, 2)
    Ytr[np.random.default_rng(3).random(1200) < 0.5, 1] = np.nan  # half the aesthetic labels missing
    cfg = TrainConfig(tasks=TASKS, epochs=25, lr=3e-3, batch_size=128, patience=10, device="cpu", progress=False)
    history: list[int] = []
    result = ApexTrainer(cfg, callbacks=[lambda epoch, logs: history.append(epoch)]).fit(Xtr, Ytr, Xva, Yva)
    assert history and history[0] == 0
    with torch.no_grad():
        P = result.model(torch.from_numpy(Xte)).numpy()
    m = regression_metrics(Yte, P, TASKS)
    assert m["score_streams"]["spearman"] >= 0.9
    assert m["coherence"]["spearman"] >= 0.9


def test_early_stopping_stops_before_the_epoch_limit() -> None:
    Xtr, Ytr = _planted(300, 8, 0)
    Xva = np.random.default_rng(5).normal(size=(100, 8)).astype(np.float32)
    Yva = np.random.default_rng(6).uniform(1, 5, size=(100, 2)).astype(np.float32)  # unrelated labels
    Yva[:, 0] *= 20
    cfg = TrainConfig(tasks=TASKS, epochs=200, lr=1e-2, batch_size=64, patience=3, device="cpu", progress=False)
    result = ApexTrainer(cfg).fit(Xtr, Ytr, Xva, Yva)
    assert len(result.history) < 200
    assert result.best_epoch == int(np.argmin([h["val_loss"] for h in result.history]))


def test_same_seed_same_model() -> None:
    Xtr, Ytr = _planted(200, 8, 0)
    Xva, Yva = _planted(50, 8, 1)
    cfg = TrainConfig(tasks=TASKS, epochs=3, batch_size=64, device="cpu", progress=False)
    a = ApexTrainer(cfg).fit(Xtr, Ytr, Xva, Yva).model.state_dict()
    b = ApexTrainer(cfg).fit(Xtr, Ytr, Xva, Yva).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_labels_out_of_range_are_rejected() -> None:
    Xtr, Ytr = _planted(100, 8, 0)
    Ytr[7, 1] = 6.0
    cfg = TrainConfig(tasks=TASKS, epochs=1, device="cpu", progress=False)
    with pytest.raises(SchemaError, match="coherence"):
        ApexTrainer(cfg).fit(Xtr, Ytr, Xtr, Ytr)


def test_nan_embeddings_are_rejected_with_the_row() -> None:
    Xtr, Ytr = _planted(100, 8, 0)
    Xtr[42, 0] = np.inf
    cfg = TrainConfig(tasks=TASKS, epochs=1, device="cpu", progress=False)
    with pytest.raises(SchemaError, match="row 42"):
        ApexTrainer(cfg).fit(Xtr, Ytr, Xtr, Ytr)


def test_segment_mode_predictions_are_averaged_per_song() -> None:
    preds = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]])
    songs, means = aggregate_by_song(preds, np.array(["b", "b", "a"]))
    assert songs.tolist() == ["b", "a"]
    np.testing.assert_allclose(means, [[2.0, 3.0], [10.0, 20.0]])


def test_regression_metrics_match_scipy_and_skip_missing_labels() -> None:
    rng = np.random.default_rng(0)
    t = rng.normal(size=(50, 1))
    p = t + rng.normal(scale=0.5, size=(50, 1))
    t_missing = t.copy()
    t_missing[:10] = np.nan
    m = regression_metrics(t_missing, p, ["x"])["x"]
    assert m["n"] == 40
    assert m["mse"] == pytest.approx(float(np.mean((p[10:] - t[10:]) ** 2)))
    assert m["spearman"] == pytest.approx(stats.spearmanr(t[10:, 0], p[10:, 0]).statistic)
    assert m["pearson"] == pytest.approx(stats.pearsonr(t[10:, 0], p[10:, 0]).statistic)


def test_segment_mode_trains_on_segments_and_scores_songs() -> None:
    import polars as pl

    from apex_rank.features.apex_tables import build_apex_dataset, train_apex

    rng = np.random.default_rng(0)
    n_songs, d = 300, 8
    base = rng.normal(size=(n_songs, d)).astype(np.float32)
    q = np.tanh(base @ rng.normal(size=d))
    songs = pl.DataFrame({"song_id": [f"s{i}" for i in range(n_songs)], "streams": (np.exp(3 + 2 * q)).astype(int),
                          "coherence": 3 + 1.5 * q})
    rows = []
    for i in range(n_songs):
        for seg in range(int(rng.integers(1, 4))):
            rows.append({"song_id": f"s{i}", "segment": seg,
                         "embedding": (base[i] + 0.1 * rng.normal(size=d)).astype(np.float32).tolist()})
    segments = pl.DataFrame(rows)
    data = build_apex_dataset(songs, segments, seed=1)
    assert data.mode == "segment" and data.X.shape[0] == segments.height
    # every segment of a song sits in the same split
    split_of = {}
    for s, part in zip(data.song_ids, data.split):
        assert split_of.setdefault(s, part) == part
    cfg = TrainConfig(epochs=30, lr=3e-3, batch_size=64, device="cpu", progress=False)
    _, metrics, _ = train_apex(data, cfg)
    assert metrics["mode"] == "segment"
    test_songs = {s for s, p in zip(data.song_ids, data.split) if p == "test"}
    assert metrics["test"]["coherence"]["n"] == len(test_songs)  # scored per song, not per segment
    assert metrics["test"]["coherence"]["spearman"] > 0.8


def test_embedding_table_with_kept_segments_enters_segment_mode() -> None:
    import polars as pl

    from apex_rank.features.apex_tables import build_apex_dataset, explode_segments

    table = pl.DataFrame(
        {
            "song_id": ["a", "b"],
            "embedding": [[1.0, 1.0], [2.0, 2.0]],
            "segment_embeddings": [[[0.0, 0.0], [2.0, 2.0]], [[2.0, 2.0]]],
        },
        schema_overrides={"segment_embeddings": pl.List(pl.List(pl.Float32))},
    )
    seg = explode_segments(table)
    assert seg["song_id"].to_list() == ["a", "a", "b"] and seg["segment"].to_list() == [0, 1, 0]
    songs = pl.DataFrame({"song_id": ["a", "b"], "coherence": [2.0, 4.0], "split": ["train", "val"]})
    data = build_apex_dataset(songs, table)
    assert data.mode == "segment" and data.X.shape == (3, 2)
    np.testing.assert_allclose(data.Y[:, 2], [2.0, 2.0, 4.0])
