"""``apex-rank build`` and ``apex-rank recommend`` on real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from apex_rank.cli.main import main
from apex_rank.threads import using_threads
from tests.integration.test_recommender_fixtures import apex, train_interactions, world


def test_cli_build_and_recommend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = world()
    w.songs.write_parquet(tmp_path / "songs.parquet")
    w.embeddings.write_parquet(tmp_path / "emb.parquet")
    train_interactions().write_parquet(tmp_path / "inter.parquet")
    apex().save(tmp_path / "apex")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[cf]\nfactors = 16\niterations = 8\n[reranker]\nn_estimators = 60\n")
    with using_threads(1):
        rc = main(
            [
                "--threads",
                "1",
                "build",
                "--songs",
                str(tmp_path / "songs.parquet"),
                "--embeddings",
                str(tmp_path / "emb.parquet"),
                "--interactions",
                str(tmp_path / "inter.parquet"),
                "--config",
                str(cfg),
                "--apex-model",
                str(tmp_path / "apex"),
                "--out",
                str(tmp_path / "bundle"),
            ]
        )
    assert rc == 0
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    user = train_interactions()["user_id"][0]
    assert main(["recommend", "--bundle", str(tmp_path / "bundle"), "--user", user, "-k", "5"]) == 0
    out = capsys.readouterr().out
    assert "bundle written to" in out and "song_id" in out and "is_cold" in out
    assert main(["recommend", "--bundle", str(tmp_path / "bundle"), "--user", "nobody", "-k", "3"]) == 0
    assert "fallback" in capsys.readouterr().out
    # a huge k is refused in one line before anything is ranked (it once grew to 22 GB)
    assert main(["recommend", "--bundle", str(tmp_path / "bundle"), "--user", user, "-k", "1000000000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "k must be an integer in [1, 1000], got 1000000000" in err[0], err


def test_cli_bad_config_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[cf]\nfactorz = 16\n")
    rc = main(
        [
            "build",
            "--songs",
            "x.parquet",
            "--embeddings",
            "y.parquet",
            "--interactions",
            "z.parquet",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert rc == 2
    assert "unknown config key(s) cf.factorz" in capsys.readouterr().err


def test_cli_missing_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--bundle", str(tmp_path / "none"), "--user", "u"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
