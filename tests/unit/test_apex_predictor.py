"""ApexPredictor: inference contract, pickle-free save/load, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from apex_rank import APEX_TASKS, ArtifactError, CheckpointError, SchemaError
from apex_rank.model import ApexHead
from apex_rank.predictor import ApexPredictor


@pytest.fixture()
def predictor() -> ApexPredictor:
    torch.manual_seed(0)
    head = ApexHead(24)
    head.train()
    with torch.no_grad():  # a few forward passes in train mode give BN non-trivial running stats
        for _ in range(5):
            head(torch.randn(64, 24) * 3 + 1)
    return ApexPredictor(
        head, encoder="spectral-test", target_transform={"score_streams": {"gamma": 1.0}}, device="cpu"
    )


def test_predict_returns_n_by_7_float32(predictor: ApexPredictor) -> None:
    out = predictor.predict(np.random.default_rng(0).normal(size=(10, 24)))
    assert out.shape == (10, 7) and out.dtype == np.float32
    assert predictor.predict(np.zeros((0, 24), np.float32)).shape == (0, 7)


def test_save_load_round_trip_is_exact(predictor: ApexPredictor, tmp_path: Path) -> None:
    X = np.random.default_rng(1).normal(size=(50, 24)).astype(np.float32)
    predictor.save(tmp_path / "m")
    again = ApexPredictor.load(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(again.predict(X), predictor.predict(X))
    assert again.encoder == "spectral-test" and again.target_transform == predictor.target_transform
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["schema"] == 1 and manifest["tasks"] == list(APEX_TASKS)
    assert not list((tmp_path / "m").glob("*.pt")) and not list((tmp_path / "m").glob("*.pkl"))


def test_score_songs_is_a_table_in_task_order(predictor: ApexPredictor) -> None:
    df = predictor.score_songs(["a", "b"], np.ones((2, 24), np.float32))
    assert df.columns == ["song_id", *APEX_TASKS]
    assert df["song_id"].to_list() == ["a", "b"]


def test_nan_embedding_names_the_row(predictor: ApexPredictor) -> None:
    X = np.zeros((4, 24), np.float32)
    X[2, 5] = np.nan
    with pytest.raises(SchemaError, match="row 2"):
        predictor.predict(X)


def test_wrong_width_is_rejected(predictor: ApexPredictor) -> None:
    with pytest.raises(SchemaError, match=r"\(n, 24\)"):
        predictor.predict(np.zeros((3, 768), np.float32))


def test_load_without_manifest_or_weights_fails_clearly(predictor: ApexPredictor, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        ApexPredictor.load(tmp_path)
    predictor.save(tmp_path / "m")
    (tmp_path / "m" / "head.safetensors").unlink()
    with pytest.raises(ArtifactError, match="head.safetensors"):
        ApexPredictor.load(tmp_path / "m")


def test_newer_schema_is_refused(predictor: ApexPredictor, tmp_path: Path) -> None:
    predictor.save(tmp_path / "m")
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    man["schema"] = 99
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="schema version 99 is newer"):
        ApexPredictor.load(tmp_path / "m")


def test_corrupt_weights_file_is_a_checkpoint_error(predictor: ApexPredictor, tmp_path: Path) -> None:
    predictor.save(tmp_path / "m")
    (tmp_path / "m" / "head.safetensors").write_bytes(b"\x00garbage")
    # the manifest's size and SHA-256 catch it before safetensors reads a byte
    with pytest.raises(ArtifactError, match="head.safetensors.*the manifest recorded"):
        ApexPredictor.load(tmp_path / "m")
    # a manifest without checksums (written before they existed): safetensors' own check names it
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    del man["checksums"]
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="head.safetensors"):
        ApexPredictor.load(tmp_path / "m")


def test_refused_checkpoint_is_one_line_without_torch_advice(tmp_path: Path) -> None:
    """torch's refusal advises weights_only=False (which would run the file's code): never relayed."""
    import pickle

    (tmp_path / "best_model.pt").write_bytes(pickle.dumps({"model_state": print}))
    with pytest.raises(CheckpointError, match="best_model.pt is not a weights-only PyTorch checkpoint") as info:
        ApexPredictor.from_official_checkpoint(tmp_path / "best_model.pt", device="cpu")
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)


def test_official_checkpoint_of_nan_weights_is_refused(tmp_path: Path) -> None:
    """import-official of an all-NaN checkpoint exited 0 and served NaN priors."""
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in ApexHead(24).state_dict().items()}
    torch.save({"model_state": state, "task": "full", "shared": 2}, tmp_path / "best_model.pt")
    with pytest.raises(CheckpointError, match="tensor 'shared.0.block.0.weight' holds NaN or inf"):
        ApexPredictor.from_official_checkpoint(tmp_path / "best_model.pt", device="cpu")


def test_the_audio_rule_travels_with_the_predictor_and_guards_its_inputs(predictor: ApexPredictor,
                                                                          tmp_path: Path) -> None:
    """The ``segmenting`` record (how the embeddings' audio was cut) is read from the table once,
    saved and loaded with the predictor, and embeddings cut another way are refused by name."""
    from apex_rank.features.apex_tables import embedding_recipe
    from apex_rank.features.audio import AudioConfig
    from apex_rank.schemas import embeddings_frame

    rule, other = AudioConfig(segment_s=2.0, min_last_s=0.5), AudioConfig()
    X = np.random.default_rng(2).normal(size=(3, 24)).astype(np.float32)
    table = embeddings_frame(["a", "b", "c"], X, encoder="spectral-test")
    assert embedding_recipe(table) == ("spectral-test", None)  # an older table: no record
    cut = table.with_columns(pl.lit(rule.segmenting()).alias("segmenting"))
    assert embedding_recipe(cut) == ("spectral-test", rule.segmenting())
    mixed = cut.with_columns(pl.when(pl.col("song_id") == "c").then(pl.lit(other.segmenting()))
                             .otherwise(pl.col("segmenting")).alias("segmenting"))
    with pytest.raises(SchemaError, match="emb.parquet: rows were cut by different audio rules"):
        embedding_recipe(mixed, "emb.parquet")
    predictor.segmenting = rule.segmenting()
    predictor.save(tmp_path / "m")
    again = ApexPredictor.load(tmp_path / "m", device="cpu")
    assert again.segmenting == rule.segmenting() and AudioConfig.from_segmenting(again.segmenting, "m") == rule
    assert again.score_embeddings(cut).height == 3
    assert again.score_embeddings(table).height == 3  # no record in the table: nothing to compare
    with pytest.raises(SchemaError, match="new.parquet: embeddings were cut by the audio rule"):
        again.score_embeddings(cut.with_columns(pl.lit(other.segmenting()).alias("segmenting")), source="new.parquet")


@pytest.mark.parametrize("record", ['{"segment_s": 2.0}', "not json", "[1, 2]",
                                    '{"segment_s": -1, "hop_s": null, "min_last_s": 0, "max_duration_s": null}'])
def test_a_bad_segmenting_record_is_a_config_error_naming_where(record: str) -> None:
    from apex_rank.errors import ConfigError
    from apex_rank.features.audio import AudioConfig

    with pytest.raises(ConfigError, match="bundle b/: segmenting record"):
        AudioConfig.from_segmenting(record, "bundle b/")
