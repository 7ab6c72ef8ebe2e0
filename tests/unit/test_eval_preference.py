"""Music Arena preference protocol on a synthetic battle file whose answer is known.

The plant: listeners prefer the clip with the higher *musicality* prediction (always, for the
deterministic file). So the direct musicality rule must be perfect, and the cross-validated
classifiers must be near-perfect with the aesthetic features and near chance without them
(popularity predictions are independent of the preference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from apex_rank.cli.main import main
from apex_rank.errors import SchemaError
from apex_rank.offline_eval.protocols import evaluate_preference
from apex_rank.tasks import APEX_TASKS


def _files(n_songs: int = 120, n_battles: int = 400, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    rng = np.random.default_rng(seed)
    ids = [f"clip{i}" for i in range(n_songs)]
    preds = {"song_id": ids}
    for t in APEX_TASKS:
        preds[t] = (rng.uniform(0, 100, n_songs) if t.startswith("score") else rng.uniform(1, 5, n_songs)).tolist()
    predictions = pl.DataFrame(preds)
    mus = dict(zip(ids, preds["musicality"], strict=True))
    a = rng.integers(0, n_songs, n_battles)
    b = (a + rng.integers(1, n_songs, n_battles)) % n_songs
    pref = ["A" if mus[ids[i]] > mus[ids[j]] else "B" for i, j in zip(a, b, strict=True)]
    pref[:20] = ["TIE"] * 10 + ["BOTH_BAD"] * 10  # dropped by the protocol
    battles = pl.DataFrame({
        "battle_uuid": [f"b{i}" for i in range(n_battles)],
        "audio_a": [ids[i] for i in a], "audio_b": [ids[j] for j in b],
        "system_a": ["gen1"] * n_battles, "system_b": ["gen2"] * n_battles,
        "preference": pref, "is_instrumental": (rng.random(n_battles) < 0.4).tolist(),
    })
    return battles, predictions


def test_known_answer() -> None:
    battles, predictions = _files()
    res = evaluate_preference(battles, predictions, n_folds=10, seed=0)
    assert res["n_decisive"] == 380
    mus = res["direct"]["musicality"]
    for g in ("overall", "instrumental", "vocal"):
        assert mus[g]["accuracy"] == 1.0 and mus[g]["auc"] == 1.0 and mus[g]["f1"] == 1.0
    assert abs(res["direct"]["score_streams"]["overall"]["auc"] - 0.5) < 0.1
    with_a = res["classifiers"]["logistic_regression/with_aesthetic"]["overall"]
    without = res["classifiers"]["logistic_regression/without_aesthetic"]["overall"]
    assert with_a["auc"] > 0.97 and with_a["accuracy"] > 0.9
    assert abs(without["auc"] - 0.5) < 0.12
    assert res["classifiers"]["svm/with_aesthetic"]["overall"]["auc"] > 0.9
    assert evaluate_preference(battles, predictions, n_folds=10, seed=0) == res  # seeded


def test_bad_inputs_name_the_problem() -> None:
    battles, predictions = _files()
    with pytest.raises(SchemaError, match="preference 'MAYBE'"):
        evaluate_preference(battles.with_columns(pl.lit("MAYBE").alias("preference")), predictions)
    with pytest.raises(SchemaError, match="without predictions, e.g. 'clip"):
        evaluate_preference(battles, predictions.filter(pl.col("song_id") != "clip3"))
    with pytest.raises(SchemaError, match="song_a'/'song_b' or 'audio_a'/'audio_b"):
        evaluate_preference(battles.drop("audio_a"), predictions)


def test_cli_writes_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    battles, predictions = _files()
    battles.write_parquet(tmp_path / "battles.parquet")
    predictions.write_parquet(tmp_path / "preds.parquet")
    rc = main(["evaluate-preference", "--battles", str(tmp_path / "battles.parquet"), "--predictions",
               str(tmp_path / "preds.parquet"), "--out", str(tmp_path / "out"), "--folds", "5"])
    assert rc == 0
    assert (tmp_path / "out" / "preference_report.json").is_file()
    assert "logistic_regression/with_aesthetic" in capsys.readouterr().out
    rc = main(["evaluate-preference", "--battles", str(tmp_path / "nope.parquet"), "--predictions",
               str(tmp_path / "preds.parquet"), "--out", str(tmp_path / "out")])
    assert rc == 2
