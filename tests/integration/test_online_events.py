"""Events on real Redis: recorded events export to parquet (CLI) with the interactions contract,
``--since`` filters by stream time, and the export feeds a rebuild unchanged."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pytest

from apex_rank.errors import StoreError, UnknownIdError
from apex_rank.ranking.online import OnlineConfig, RedisStore, RequestError, publish, record
from apex_rank.ranking.online.recommender_engine import RecommenderEngine
from apex_rank.schemas import validate_interactions

from .online_support import bundle_dir

pytestmark = pytest.mark.integration


def test_export_events_cli(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    from apex_rank.cli.main import main

    engine = RecommenderEngine.load(bundle_dir(7))
    store = RedisStore(redis_url, redis_prefix)
    cfg = OnlineConfig(namespace=redis_prefix)
    with pytest.raises(StoreError, match="nothing is published"):
        record(store, "u1", "s000001", config=cfg)
    publish(engine, store, config=cfg)
    songs = engine.recommender.songs.song_ids
    record(store, "u1", songs[0], "play", 1_750_000_000.0, config=cfg)
    record(store, "u2", songs[1], "like", 1_750_000_100.0, config=cfg)
    time.sleep(0.01)
    cut = time.time()
    time.sleep(0.01)
    record(store, "u3", songs[2], "skip", config=cfg)
    with pytest.raises(UnknownIdError, match="not in the catalogue"):
        record(store, "u1", "no-such-song", config=cfg)
    with pytest.raises(RequestError, match="kind"):
        record(store, "u1", songs[0], "teleport", config=cfg)

    out = tmp_path / "events.parquet"
    assert main(["export-events", "--redis", redis_url, "--namespace", redis_prefix, "--out", str(out)]) == 0
    df = pl.read_parquet(out)
    assert df["user_id"].to_list() == ["u1", "u2", "u3"]
    assert df["kind"].to_list() == ["play", "like", "skip"] and df["weight"].to_list() == [1.0, 2.0, 0.0]
    validate_interactions(df.select("user_id", "song_id", "ts", "weight"))  # the interactions contract
    assert df["ts"][0].timestamp() == pytest.approx(1_750_000_000.0, abs=1)

    later = tmp_path / "later.parquet"
    assert main(["export-events", "--redis", redis_url, "--namespace", redis_prefix,
                 "--since", str(cut), "--out", str(later)]) == 0
    assert pl.read_parquet(later)["user_id"].to_list() == ["u3"]
