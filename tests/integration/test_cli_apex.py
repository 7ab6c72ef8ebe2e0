"""``apex-rank train-apex`` / ``predict`` / ``import-official`` on real files."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch

from apex_rank import APEX_TASKS
from apex_rank.cli.main import main
from apex_rank.model import ApexHead
from apex_rank.synthetic import World


def test_train_then_predict(small_world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    songs, emb = tmp_path / "songs.parquet", tmp_path / "emb.parquet"
    small_world.songs.write_parquet(songs)
    small_world.embeddings.write_parquet(emb)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[train]\nbatch_size = 128\npatience = 5\nprogress = false\n")
    rc = main(
        [
            "train-apex",
            "--songs",
            str(songs),
            "--embeddings",
            str(emb),
            "--out",
            str(tmp_path / "m"),
            "--config",
            str(cfg),
            "--epochs",
            "8",
            "--lr",
            "0.003",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert set(metrics["test"]) == set(APEX_TASKS)
    assert metrics["test"]["score_likes"]["spearman"] > 0.5  # the synthetic labels are learnable
    assert "test metrics" in capsys.readouterr().out

    rc = main(
        ["predict", "--model", str(tmp_path / "m"), "--embeddings", str(emb), "--out", str(tmp_path / "p.parquet")]
    )
    assert rc == 0
    preds = pl.read_parquet(tmp_path / "p.parquet")
    assert preds.columns == ["song_id", *APEX_TASKS] and preds.height == small_world.songs.height


def test_split_column_is_respected(small_world: World, tmp_path: Path) -> None:
    n = small_world.songs.height
    split = ["train"] * (n - 100) + ["val"] * 50 + ["test"] * 50
    small_world.songs.with_columns(pl.Series("split", split)).write_parquet(tmp_path / "s.parquet")
    small_world.embeddings.write_parquet(tmp_path / "e.parquet")
    rc = main(
        [
            "train-apex",
            "--songs",
            str(tmp_path / "s.parquet"),
            "--embeddings",
            str(tmp_path / "e.parquet"),
            "--out",
            str(tmp_path / "m"),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["test"]["score_streams"]["n"] == 50


def test_bad_input_exits_2_with_one_line(
    small_world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small_world.songs.write_parquet(tmp_path / "s.parquet")
    bad = small_world.embeddings.head(10)  # most songs lack an embedding
    bad.write_parquet(tmp_path / "e.parquet")
    rc = main(
        [
            "train-apex",
            "--songs",
            str(tmp_path / "s.parquet"),
            "--embeddings",
            str(tmp_path / "e.parquet"),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "have no embedding" in err and "\n" not in err
    rc = main(["predict", "--model", str(tmp_path / "nope"), "--embeddings", str(tmp_path / "e.parquet"), "--out", "x"])
    assert rc == 2 and "manifest.json is missing" in capsys.readouterr().err


def test_import_official(tmp_path: Path) -> None:
    head = ApexHead(768).eval()
    torch.save(
        {"model_state": head.state_dict(), "task": "full", "shared": 2, "mode": "song", "epoch": 3, "val_loss": 0.5},
        tmp_path / "best_model.pt",
    )
    rc = main(["import-official", "--checkpoint", str(tmp_path / "best_model.pt"), "--out", str(tmp_path / "m")])
    assert rc == 0
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert man["input_dim"] == 768 and man["tasks"] == list(APEX_TASKS) and man["extra"]["epoch"] == 3
