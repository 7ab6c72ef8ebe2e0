"""Core plumbing: configs from TOML, device resolution, thread pools, table validation."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from apex_rank import ConfigError, DeviceError, SchemaError
from apex_rank.config import from_dict, load_config, to_dict
from apex_rank.device import resolve_device
from apex_rank.errors import RequestError
from apex_rank.ranking.online.keys import check_id
from apex_rank.schemas import embedding_matrix, embeddings_frame, validate_interactions, validate_songs
from apex_rank.threads import blas_single_threaded, configure_threads, thread_count
from apex_rank.training import TrainConfig


@dataclass(frozen=True)
class Inner:
    k: int = 10


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    rate: float = 0.5
    layers: tuple[int, ...] = (2, 5)
    inner: Inner = field(default_factory=Inner)


def test_config_from_toml_with_nested_table(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[outer]\nname = "y"\nrate = 1\nlayers = [1, 2, 3]\n[outer.inner]\nk = 3\n')
    cfg = load_config(f, Outer, section="outer")
    assert cfg == Outer(name="y", rate=1.0, layers=(1, 2, 3), inner=Inner(k=3))
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_keys_are_rejected_with_the_dotted_name() -> None:
    with pytest.raises(ConfigError, match=r"inner\.kk"):
        from_dict(Outer, {"inner": {"kk": 3}})
    with pytest.raises(ConfigError, match="lerning_rate"):
        from_dict(TrainConfig, {"lerning_rate": 1e-3})


def test_wrong_types_are_rejected() -> None:
    with pytest.raises(ConfigError, match="'rate'"):
        from_dict(Outer, {"rate": "fast"})
    with pytest.raises(ConfigError, match="'loss'"):
        from_dict(TrainConfig, {"loss": "focal"})


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text("a = [1,")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(f, Outer)


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="tpu"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_explicit_cuda_without_cuda_is_an_error() -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")


def test_thread_pools_are_set_in_one_place() -> None:
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1
        assert thread_count() == 1 and torch.get_num_threads() == 1
        with blas_single_threaded():
            assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    finally:
        configure_threads(before)


def test_using_threads_restores_the_previous_setting() -> None:
    from apex_rank.threads import using_threads

    before = thread_count()
    with using_threads(1) as n:
        assert n == 1 and thread_count() == 1 and torch.get_num_threads() == 1
    assert thread_count() == before and torch.get_num_threads() == before


def test_songs_validation_names_column_and_song() -> None:
    with pytest.raises(SchemaError, match="songs table is empty"):
        validate_songs(pl.DataFrame({"song_id": pl.Series([], dtype=pl.String)}))
    with pytest.raises(SchemaError, match="'song_id' must be String, found Int64"):
        validate_songs(pl.DataFrame({"song_id": [1, 2]}))
    with pytest.raises(SchemaError, match="duplicate song_id 'a'"):
        validate_songs(pl.DataFrame({"song_id": ["a", "a", "b"]}))
    with pytest.raises(SchemaError, match="'clarity' value 7.0 for song_id 'b'"):
        validate_songs(pl.DataFrame({"song_id": ["a", "b"], "clarity": [3.0, 7.0]}))
    with pytest.raises(SchemaError, match="negative count"):
        validate_songs(pl.DataFrame({"song_id": ["a"], "streams": [-3]}))


def test_interactions_validation() -> None:
    df = validate_interactions(pl.DataFrame({"user_id": ["u"], "song_id": ["s"]}))
    assert df["weight"].to_list() == [1.0]
    with pytest.raises(SchemaError, match="required column 'song_id' is missing"):
        validate_interactions(pl.DataFrame({"user_id": ["u"]}))
    with pytest.raises(SchemaError, match="user_id 'u2'"):
        validate_interactions(pl.DataFrame({"user_id": ["u1", "u2"], "song_id": ["s", "s"], "weight": [1.0, -1.0]}))


@pytest.mark.parametrize("bad", ["user 7", "u1\n", "u*", "u{1}", "s" * 129, "é", ""])
def test_one_id_rule_for_tables_and_the_online_api(bad: str) -> None:
    """build accepted ids the online API refuses (those users could never be updated online)."""
    df = pl.DataFrame({"user_id": ["u0", bad], "song_id": ["s", "s"]})
    with pytest.raises(SchemaError, match=re.escape(f"interactions table: user_id {bad!r} at row 1 is not a valid id")):
        validate_interactions(df)
    with pytest.raises(SchemaError, match=re.escape(f"songs table: song_id {bad!r} at row 1")):
        validate_songs(pl.DataFrame({"song_id": ["s0", bad]}))
    with pytest.raises(RequestError, match="not a valid id"):
        check_id(bad, "user_id")
    validate_interactions(pl.DataFrame({"user_id": ["a-b_c.d:e@f/g+H9"], "song_id": ["1" * 128]}))


def test_timestamps_in_the_wrong_unit_are_named() -> None:
    """A ts column in milliseconds, or one row in the year 8,000,000, moved build's cutoff silently."""
    s = 1_767_225_600  # 2026-01-01 in seconds
    for factor, unit in ((10**3, "milliseconds"), (10**6, "microseconds"), (10**9, "nanoseconds")):
        df = pl.DataFrame({"user_id": ["u", "u"], "song_id": ["a", "b"], "ts": [s, s * factor]})
        with pytest.raises(SchemaError, match=f"'ts' row 1 holds {s * factor}, which looks like {unit} since the "
                                              "epoch; give seconds"):
            validate_interactions(df)
    far = pl.Series([s * 1000, (8_000_000 - 1970) * 31_556_952_000]).cast(pl.Datetime("ms"))
    with pytest.raises(SchemaError, match="'ts' row 1 is in the year 8000000"):
        validate_interactions(pl.DataFrame({"user_id": ["u", "u"], "song_id": ["a", "b"], "ts": far}))
    with pytest.raises(SchemaError, match="'ts' row 0 holds -5: before 1970"):
        validate_interactions(pl.DataFrame({"user_id": ["u"], "song_id": ["a"], "ts": [-5]}))
    with pytest.raises(SchemaError, match="songs table: column 'created_at' row 0 holds 1767225600000, which looks "
                                          "like milliseconds"):
        validate_songs(pl.DataFrame({"song_id": ["a"], "created_at": [s * 1000]}))
    ok = pl.DataFrame({"user_id": ["u"] * 3, "song_id": ["a"] * 3, "ts": [0, s, None]})
    validate_interactions(ok)  # seconds, including the epoch itself and a missing time
    validate_interactions(ok.with_columns(pl.from_epoch("ts")))
    validate_songs(pl.DataFrame({"song_id": ["a"], "created_at": [date(2026, 1, 1)]}))


def test_absurd_weights_name_the_row() -> None:
    """A weight of 1e308 reached implicit, which failed with a ModelFitError traceback."""
    for w in (1e308, 2e12, -1.0, float("nan"), float("inf")):
        df = pl.DataFrame({"user_id": ["u", "v"], "song_id": ["a", "b"], "weight": [1.0, w]})
        with pytest.raises(SchemaError, match=r"weight .* at row 1 \(user_id 'v', song_id 'b'\) is not a number in "):
            validate_interactions(df)
    validate_interactions(pl.DataFrame({"user_id": ["u"], "song_id": ["a"], "weight": [1e12]}))


def test_embedding_lists_must_hold_flat_numbers() -> None:
    """Strings or nested lists surfaced as a polars cast traceback in build, train-apex, predict, evaluate."""
    with pytest.raises(SchemaError, match=re.escape("must hold numbers (one flat list of floats per song), found "
                                                    "List(String)")):
        embedding_matrix(pl.DataFrame({"song_id": ["a"], "embedding": [["x", "y"]]}))
    with pytest.raises(SchemaError, match=re.escape("found List(List(Float64))")):
        embedding_matrix(pl.DataFrame({"song_id": ["a"], "embedding": [[[0.0], [1.0]]]}))
    with pytest.raises(SchemaError, match="width 0"):
        embedding_matrix(pl.DataFrame({"song_id": ["a"], "embedding": [[]]}, schema={"song_id": pl.String,
                                                                                     "embedding": pl.List(pl.Float32)}))


def test_embedding_matrix_validation() -> None:
    ok = embeddings_frame(["a", "b"], np.eye(2, 3, dtype=np.float32), encoder="t")
    ids, X = embedding_matrix(ok)
    assert ids == ["a", "b"] and X.dtype == np.float32 and X.flags.c_contiguous
    with pytest.raises(SchemaError, match="expects 768"):
        embedding_matrix(ok, expected_width=768)
    bad = embeddings_frame(["a", "b"], np.array([[0, 1, 2], [0, np.nan, 1]], np.float32), encoder="t")
    with pytest.raises(SchemaError, match="song_id 'b'"):
        embedding_matrix(bad)
    ragged = pl.DataFrame({"song_id": ["a", "b"], "embedding": [[0.0, 1.0], [1.0]]})
    with pytest.raises(SchemaError, match="different widths"):
        embedding_matrix(ragged)
    dup = pl.DataFrame({"song_id": ["a", "a"], "embedding": [[0.0], [1.0]]})
    with pytest.raises(SchemaError, match="duplicate song_id 'a'"):
        embedding_matrix(dup)
    with pytest.raises(SchemaError, match="empty"):
        embedding_matrix(ok.head(0))
