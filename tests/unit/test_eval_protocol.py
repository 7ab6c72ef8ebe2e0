"""The ranking protocol end to end on the small synthetic world (real implicit, LightGBM, FAISS)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from apex_rank.cli.main import main
from apex_rank.errors import ConfigError, SchemaError
from apex_rank.offline_eval import baselines as bl
from apex_rank.offline_eval.datasets import EvalDataset
from apex_rank.offline_eval.metrics import top_k_from_scores
from apex_rank.offline_eval.protocols import RankingEvalConfig, build_targets, evaluate_ranking
from apex_rank.offline_eval.report import write_report
from apex_rank.offline_eval.splits import make_split
from apex_rank.synthetic import World

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


FAST = dict(n_permutations=500, n_bootstrap=200, apex_epochs=8, ks=(10, 20))


@pytest.fixture(scope="module")
def data(small_world: World) -> EvalDataset:
    return EvalDataset("synthetic-small", small_world.songs, small_world.embeddings, small_world.interactions)


@pytest.fixture(scope="module")
def item_cold_report(data: EvalDataset) -> dict:
    cfg = RankingEvalConfig(split="item-cold", seed=3, tune=True, als_grid=bl.ALS_GRID[:2],
                            bpr_grid=({"factors": 16, "iterations": 30},), hybrid_grid=(), **FAST)
    return evaluate_ranking(data, cfg)


def test_report_layout_and_slices(item_cold_report: dict) -> None:
    r = item_cold_report
    assert r["schema"] == 1 and r["dataset"] == "synthetic-small" and r["k"] == [10, 20]
    assert r["split"]["kind"] == "item-cold" and r["split"]["seed"] == 3 and r["split"]["n_cold_items"] > 0
    assert set(r["models"]) == set(bl.MODELS)
    for model, slices in r["models"].items():
        assert set(slices) == {"all", "warm", "cold", "cold_only"}, model
        for s, m in slices.items():
            for key in ("ndcg@10", "recall@20", "precision@10", "map@10", "mrr@10", "hitrate@20",
                        "coverage@10", "novelty@10", "cold_share@10"):
                assert key in m, (model, s, key)
            assert m["n_users"] > 0
    # CF and popularity cannot rank cold songs; content, APEX and the hybrid can
    assert r["models"]["als"]["cold"]["ndcg@10"] == 0.0
    assert r["models"]["popularity"]["all"]["cold_share@10"] == 0.0
    assert r["models"]["content"]["cold_only"]["ndcg@10"] > 0.0
    assert r["models"]["hybrid"]["cold_only"]["cold_share@10"] == 1.0
    sig = r["significance"]["cold"]["content"]
    assert {"p_t", "p_randomization", "p_holm", "effect_size_dz", "ci95_low", "ci95_high"} <= set(sig)
    assert set(r["timings_s"]) >= {"split", "apex_train", "tune_als", "fit_rank_hybrid", "significance"}
    assert len(r["tuning"]["als"]) == 2
    json.dumps(r)  # JSON-able as it is


def test_hybrid_beats_popularity_on_cold_items(item_cold_report: dict) -> None:
    m = item_cold_report["models"]
    assert m["hybrid"]["cold"]["ndcg@10"] > 2 * m["popularity"]["cold"]["ndcg@10"]
    assert m["hybrid"]["cold_only"]["ndcg@10"] > m["popularity"]["cold_only"]["ndcg@10"]


def test_write_report(item_cold_report: dict, tmp_path: Path) -> None:
    paths = write_report(item_cold_report, tmp_path)
    for name in ("report.json", "report.md", "ndcg_by_model.png", "recall_vs_k.png", "cold_share.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    assert "### slice `cold_only`" in md and "| hybrid |" in md
    assert json.loads(paths["json"].read_text())["models"].keys() == item_cold_report["models"].keys()


def test_same_seed_same_numbers(data: EvalDataset) -> None:
    cfg = RankingEvalConfig(split="random", seed=5, models=("popularity", "content", "als"), tune=False, **FAST)
    a, b = evaluate_ranking(data, cfg), evaluate_ranking(data, cfg)
    assert a["models"] == b["models"]
    assert set(a["models"]["als"]) == {"all", "warm"}


def test_cold_items_never_reach_training(data: EvalDataset) -> None:
    sp = make_split(data.interactions, "item-cold", seed=1)
    with pytest.raises(SchemaError, match="appears in the training interactions"):
        bl.build_context(data.songs, data.embeddings, data.interactions, sp.cold_items)
    ctx = bl.build_context(data.songs, data.embeddings, sp.train, sp.cold_items)
    assert ctx.train[:, np.flatnonzero(ctx.is_cold)].nnz == 0
    t = build_targets(ctx, sp.test, cold_slices=True)
    cold_rel = np.concatenate(t.relevant["cold"])
    assert ctx.is_cold[cold_rel].all()
    # a user with no relevant item in a slice is left out and counted
    assert t.skipped["warm"] == t.users["all"].size - t.users["warm"].size


def test_ties_do_not_follow_catalogue_order() -> None:
    # regression: equal popularity scores (all cold songs have count 0) were ordered by item
    # index, and MovieLens's low ids are its most popular films
    S = np.zeros((1, 6))
    perm = np.array([5, 4, 3, 2, 1, 0])
    assert top_k_from_scores(S, 3, tiebreak=perm).tolist() == [[5, 4, 3]]


def test_config_and_cli_errors(tmp_path: Path, data: EvalDataset) -> None:
    with pytest.raises(ConfigError, match="unknown model 'knn'"):
        RankingEvalConfig(models=("knn",))
    with pytest.raises(ConfigError, match="ks must be positive"):
        RankingEvalConfig(ks=(0,))
    assert main(["evaluate", "--out", str(tmp_path)]) == 2
    assert main(["evaluate", "--dataset", "netflix", "--out", str(tmp_path)]) == 2


def test_cli_on_parquet_tables(tmp_path: Path, data: EvalDataset, capsys: pytest.CaptureFixture[str]) -> None:
    data.interactions.write_parquet(tmp_path / "i.parquet")
    data.songs.write_parquet(tmp_path / "s.parquet")
    data.embeddings.write_parquet(tmp_path / "e.parquet")
    rc = main(["evaluate", "--interactions", str(tmp_path / "i.parquet"), "--songs", str(tmp_path / "s.parquet"),
               "--embeddings", str(tmp_path / "e.parquet"), "--split", "temporal", "--k", "5", "10",
               "--models", "popularity", "content", "--seed", "5", "--out", str(tmp_path / "out")])
    assert rc == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["split"]["kind"] == "temporal" and rep["k"] == [5, 10] and "load" in rep["timings_s"]
    # three seeds by default: mean ± sd of the per-seed numbers
    assert rep["seeds"] == [5, 6, 7] and set(rep["per_seed"]) == {"5", "6", "7"}
    runs = [rep["per_seed"][s]["content"]["all"]["ndcg@10"] for s in ("5", "6", "7")]
    assert rep["models"]["content"]["all"]["ndcg@10"] == pytest.approx(np.mean(runs))
    assert rep["models_sd"]["content"]["all"]["ndcg@10"] == pytest.approx(np.std(runs, ddof=1))
    assert "±" in (tmp_path / "out" / "report.md").read_text()
    assert "popularity" in capsys.readouterr().out
    bad = data.interactions.with_columns(pl.lit("nope").alias("song_id"))
    bad.write_parquet(tmp_path / "bad.parquet")
    assert main(["evaluate", "--interactions", str(tmp_path / "bad.parquet"), "--songs", str(tmp_path / "s.parquet"),
                 "--embeddings", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "o2")]) == 2
