"""APEX regression protocol: per-task metrics through the CLI, with a scatter plot per task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apex_rank.cli.main import main
from apex_rank.errors import SchemaError
from apex_rank.features.apex_tables import build_apex_dataset, train_apex
from apex_rank.offline_eval.protocols import evaluate_apex
from apex_rank.synthetic import World
from apex_rank.tasks import APEX_TASKS
from apex_rank.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def predictor(small_world: World):  # type: ignore[no-untyped-def]
    data = build_apex_dataset(small_world.songs, small_world.embeddings, seed=0)
    cfg = TrainConfig(epochs=15, lr=2e-3, batch_size=256, patience=15, seed=0, device="cpu", progress=False)
    return train_apex(data, cfg, encoder="synthetic")[0]


def test_metrics_match_the_core_regression_metrics(predictor, small_world: World) -> None:  # type: ignore[no-untyped-def]
    metrics, Y, P = evaluate_apex(predictor, small_world.songs, small_world.embeddings)
    assert metrics["n_songs"] == small_world.songs.height
    assert set(metrics["tasks"]) == set(APEX_TASKS)
    # the musicality numbers recomputed by hand on the labelled rows (not by the same function)
    j = APEX_TASKS.index("musicality")
    ok = np.isfinite(Y[:, j])
    y, p = Y[ok, j], P[ok, j]
    got = metrics["tasks"]["musicality"]
    assert got["n"] == ok.sum() > 10
    assert got["mse"] == pytest.approx(np.mean((y - p) ** 2), rel=1e-9)
    assert got["mae"] == pytest.approx(np.mean(np.abs(y - p)), rel=1e-9)
    assert got["pearson"] == pytest.approx(np.corrcoef(y, p)[0, 1], rel=1e-6)
    from scipy.stats import rankdata  # Spearman = Pearson of average ranks (labels have ties)

    assert got["spearman"] == pytest.approx(np.corrcoef(rankdata(y), rankdata(p))[0, 1], rel=1e-6)
    # labelled share only for aesthetic tasks; popularity labels everywhere
    assert metrics["tasks"]["coherence"]["n"] < metrics["tasks"]["score_streams"]["n"] == small_world.songs.height
    assert metrics["tasks"]["score_streams"]["spearman"] > 0.3  # the plant: content carries quality


def test_cli_writes_report_and_scatter_plots(predictor, small_world: World, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    predictor.save(tmp_path / "model")
    small_world.songs.write_parquet(tmp_path / "songs.parquet")
    small_world.embeddings.write_parquet(tmp_path / "emb.parquet")
    rc = main(["evaluate-apex", "--model", str(tmp_path / "model"), "--songs", str(tmp_path / "songs.parquet"),
               "--embeddings", str(tmp_path / "emb.parquet"), "--out", str(tmp_path / "out")])
    assert rc == 0
    rep = json.loads((tmp_path / "out" / "apex_report.json").read_text())
    assert np.isfinite(rep["tasks"]["score_likes"]["mse"])
    for t in APEX_TASKS:
        assert (tmp_path / "out" / f"scatter_{t}.png").stat().st_size > 0


def test_wrong_width_is_named(predictor, small_world: World) -> None:  # type: ignore[no-untyped-def]
    from apex_rank.schemas import embeddings_frame

    emb = embeddings_frame(small_world.songs["song_id"].to_list(),
                           np.zeros((small_world.songs.height, 5), np.float32), encoder="x")
    with pytest.raises(SchemaError, match="width is 5 but the model expects 32"):
        evaluate_apex(predictor, small_world.songs, emb)
