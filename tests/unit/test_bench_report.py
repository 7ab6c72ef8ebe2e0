"""bench.report's targets table: a figure is judged only at the size its target names."""

from __future__ import annotations

from bench.report import FULL, QUICK, TARGETS, Results, Sizes, render, target_row


def _online(p50: float, p99: float, per_s: float) -> dict:
    levels = [{"concurrency": c, "errors": 0, "ratio_p50": 1.0, "ratio_p99": 1.0,
               "in_process": {"n": 100, "p50_ms": p50, "p99_ms": p99, "per_s": per_s},
               "floor": {"n": 100, "p50_ms": 0.1, "p99_ms": 0.2, "per_s": 5000.0}} for c in (1, 8, 32)]
    return {"n_users": 5000, "k": 20, "build": {}, "levels": levels}


def _row(res: Results, name: str, songs: int, sizes: Sizes = QUICK) -> list[str]:
    return target_row(next(t for t in TARGETS if t.name.startswith(name) and t.songs == songs), res, sizes)


def test_a_target_at_a_size_not_run_is_not_measured_with_the_small_value_for_reference() -> None:
    res = Results(online={10_000: _online(1.5, 3.0, 700.0)})
    row = _row(res, "online in-process p50", 100_000)
    assert row[-1] == "not measured"
    assert "needs 100,000 songs" in row[2] and "at 10,000 songs: 1.50 ms" in row[2]


def test_met_and_not_met_follow_the_direction_of_the_goal() -> None:
    res = Results(online={100_000: _online(1.5, 5.0, 700.0)},
                  batch={10_000: {"hybrid_users_s": 1500.0, "bare_users_s": 3000.0, "ratio": 2.0,
                                  "world": "bench.ranking world"}})
    assert _row(res, "online in-process p50", 100_000, FULL)[-1] == "met"
    assert _row(res, "online in-process p99", 100_000, FULL)[-1] == "**not met**"
    assert _row(res, "online in-process rankings/s", 100_000, FULL)[-1] == "met"
    batch = _row(res, "recommend_batch", 10_000)
    assert batch[-1] == "**not met**" and batch[4] == "2.0x slower" and "bench.ranking world" in batch[2]


def test_the_report_renders_without_any_result() -> None:
    from datetime import UTC, datetime

    text = render(Results(), sizes=QUICK, command="python -m bench.report --quick",
                  started=datetime(2026, 12, 2, tzinfo=UTC), seconds=60.0, load=[3.0, 4.0])
    assert "Produced under load from other processes" in text
    assert text.count("| not measured |") == len(TARGETS)
    assert text.count("the benchmark failed") == 3  # planned by --quick: batch at 10k and the two APEX rows
    assert text.rstrip().endswith("```") and "python -m bench.report --quick" in text
