"""The evaluation stage of ``apex-rank demo``: item-cold evaluation of every model on the demo's
synthetic world, with the report and plots written under ``out/evaluation``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from apex_rank.offline_eval.datasets import EvalDataset
from apex_rank.offline_eval.protocols import RankingEvalConfig, evaluate_ranking
from apex_rank.offline_eval.report import write_report
from apex_rank.synthetic import World


def evaluation_stage(world: World, out: Path, *, seed: int = 0) -> Iterator[str]:
    """Yield the warm / cold / cold_only table; writes ``out/evaluation/report.{json,md}`` and plots.

    A cheap configuration (no CF grid, a short APEX fit, 1,000 permutations) keeps the stage short.
    """
    data = EvalDataset("synthetic-demo", world.songs, world.embeddings, world.interactions)
    cfg = RankingEvalConfig(split="item-cold", seed=seed, ks=(10, 20), tune=False, apex_epochs=8,
                            n_permutations=1000, n_bootstrap=500)
    t0 = time.perf_counter()
    report = evaluate_ranking(data, cfg)
    folder = Path(out) / "evaluation"
    write_report(report, folder)
    k = report["k"][0]
    yield f"   item-cold split: {report['split']['n_cold_items']} cold songs held out of everything the models fit on"
    yield f"   {'model':<12}" + "".join(f"{s + ' NDCG@' + str(k):>20}" for s in ("warm", "cold", "cold_only"))
    sig = report.get("significance", {})
    for m, res in report["models"].items():
        cells = []
        for s in ("warm", "cold", "cold_only"):
            mark = "*" if sig.get(s, {}).get(m, {}).get("significant") else " "
            cells.append(f"{res[s][f'ndcg@{k}']:>19.4f}{mark}" if s in res else f"{'-':>20}")
        yield f"   {m:<12}" + "".join(cells)
    yield f"   (* hybrid differs significantly, Holm-corrected randomization test; {time.perf_counter() - t0:.1f} s)"
    yield f"   report and plots written to {folder}"
