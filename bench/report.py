"""Benchmark report: ``python -m bench.report [--quick] [--out BENCHMARKS.md]``.

Runs the benchmarks of ``bench/`` in this process (their functions, not subprocesses; only the
RAM figure needs a fresh process) and writes a Markdown report: first the issue-15 targets,
each with its goal, the measured value, the baseline or floor measured in the same run, the
ratio and whether it is met, then every figure of each benchmark as it printed it.

``--quick`` (under 5 minutes on 2 cores) runs the small sizes: the APEX head at batch 4096, the
online ranker and ``recommend_batch`` at 10k songs, the ALS top-k at 10k and 100k songs and
the event recorder. A target defined at a larger size (online at 100k and 1M songs, batch at
100k songs, RAM per song at 100k) is then listed as not measured, with the small-size value
for reference only. Without ``--quick`` the sizes of the issue run (100k and 1M songs online,
10k and 100k batch; an hour or more on 2 cores), plus ``bench.embed``.

All data is synthetic (``bench.ranking.make_bench_world``). The machine, its load average
(sampled through the run: the development machine is shared), thread settings and library
versions head the report, and the exact command ends it.
"""

from __future__ import annotations

from apex_rank.threads import prefer_passive_openmp

prefer_passive_openmp()  # before numpy, faiss and torch load their thread pools (see apex_rank.threads)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import machine_header, median  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """What one report run measures."""

    online_songs: tuple[int, ...]  # bench.online bundles (songs); users = songs / 2, at most 50k
    batch_songs: tuple[int, ...]  # catalogues of the recommend_batch vs bare implicit comparison
    batch_world: str  # "bench.online bundle" (reuses the online build) or "bench.ranking world"
    online_requests: int  # requests per concurrency level
    apex_repeats: int
    batch_repeats: int
    latency_users: int  # bench.ranking's single-recommend sample
    als_topk_argv: tuple[str, ...]
    events_argv: tuple[str, ...]
    embed: bool
    faiss_argv: tuple[str, ...]  # bench.faiss_scale (issue 16: IVF-PQ at catalogue scale)


QUICK = Sizes(online_songs=(10_000,), batch_songs=(10_000,), batch_world="bench.online bundle",
              online_requests=200, apex_repeats=20, batch_repeats=3, latency_users=50,
              als_topk_argv=("--quick", "--sizes", "10000,100000", "--skip-candidate-recall"),
              events_argv=("--quick",), embed=False,
              faiss_argv=("--songs", "100000", "--queries", "200", "--singles", "100", "--nprobe", "16,64"))
FULL = Sizes(online_songs=(100_000, 1_000_000), batch_songs=(10_000, 100_000), batch_world="bench.ranking world",
             online_requests=400,
             apex_repeats=25, batch_repeats=3, latency_users=200, als_topk_argv=(), events_argv=(), embed=True,
             faiss_argv=())


@dataclass
class Section:
    """One benchmark's run: what it printed, its wall time, and its error if it failed."""

    title: str
    text: str = ""
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Results:
    sections: list[Section] = field(default_factory=list)
    apex: dict[str, Any] | None = None
    online: dict[int, dict[str, Any]] = field(default_factory=dict)  # songs -> bench.online result
    ram: dict[int, dict[str, Any]] = field(default_factory=dict)  # songs -> memory_after_load + per song
    batch: dict[int, dict[str, Any]] = field(default_factory=dict)  # songs -> batch_vs_bare result + world


class _Tee(io.TextIOBase):
    """Write to the console and keep a copy (a benchmark's printed figures go into the report)."""

    def __init__(self, console: Any) -> None:
        self.console, self.copy = console, io.StringIO()

    def write(self, s: str) -> int:
        self.console.write(s)
        return self.copy.write(s)

    def flush(self) -> None:
        self.console.flush()


def _section(results: Results, title: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with its printed output captured into a report section; a failure is
    recorded in the section (the report still gets written) and returns None."""
    from apex_rank.threads import configure_threads

    configure_threads()  # each benchmark starts from the default pools (bench.online sets 1)
    sec = Section(title)
    results.sections.append(sec)
    print(f"\n=== {title}", flush=True)
    tee = _Tee(sys.stdout)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(tee):
            return fn()
    except Exception as err:  # noqa: BLE001 - recorded in the report
        sec.error = f"{type(err).__name__}: {err}"
        traceback.print_exc()
        return None
    finally:
        sec.seconds = time.perf_counter() - t0
        sec.text = tee.copy.getvalue()


class _LoadSampler(threading.Thread):
    """The 1-minute load average every ``every_s`` seconds while the report runs."""

    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.every_s, self.samples = every_s, [os.getloadavg()[0]]
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.samples.append(os.getloadavg()[0])


# ---------------------------------------------------------------------------- measurements
def _online(results: Results, songs: int, sizes: Sizes, bundles: Path, redis_url: str) -> None:
    from bench import online

    out = bundles / f"online-{songs}.json"
    argv = ["--songs", str(songs), "--users", str(min(50_000, songs // 2)), "--requests",
            str(sizes.online_requests), "--skip-http", "--bundle", str(bundles / f"online-{songs}"),
            "--redis", redis_url, "--out", str(out)]
    print(f"python -m bench.online {' '.join(argv)}")
    online.main(argv)
    results.online[songs] = json.loads(out.read_text())


def memory_after_load(bundle: str, n_users: int = 50) -> dict[str, Any]:
    """``bench.memory.memory_kb`` of this process (kB: rss, anonymous, file) after importing the
    serving stack and after loading ``bundle`` as the online ranker does
    (``RankingEngine.load``) and answering ``n_users`` requests through
    ``Recommender.recommend`` (the pages serving touches). Run in a fresh process."""
    import gc

    import faiss  # noqa: F401
    import implicit.cpu.als  # noqa: F401
    import lightgbm  # noqa: F401
    import torch  # noqa: F401

    from apex_rank.ranking.online.engine import RankingEngine
    from apex_rank.threads import configure_threads
    from bench.memory import memory_kb

    configure_threads(1)
    gc.collect()
    imports = memory_kb()
    rec = RankingEngine.load(bundle).recommender
    for u in rec.user_ids[:n_users]:
        rec.recommend(u, k=20)
    gc.collect()
    return {"imports_kb": imports, "loaded_kb": memory_kb(), "songs": len(rec.songs), "users": len(rec.user_ids)}


def _ram(results: Results, songs: int, bundles: Path) -> None:
    bundle = bundles / f"online-{songs}"
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        r = pool.apply(memory_after_load, (str(bundle),))
    per_song = {k: (r["loaded_kb"][k] - r["imports_kb"][k]) / r["songs"] for k in ("rss", "anonymous", "file")}
    r["per_song_kb"] = per_song
    print(f"fresh process: {r['imports_kb']['rss'] / 1024:.0f} MB resident after the imports; after "
          f"RankingEngine.load({bundle.name}) ({r['songs']} songs, {r['users']} users) and 50 recommend calls, "
          f"per song beyond the imports: rss {per_song['rss']:.2f} kB = own (anonymous) {per_song['anonymous']:.2f} kB "
          f"+ file-backed {per_song['file']:.2f} kB (users' state included)")
    results.ram[songs] = r


def _batch(results: Results, songs: int, sizes: Sizes, bundles: Path) -> None:
    """``recommend_batch`` vs bare implicit on all users of a bundle: bench.online's when it was
    built at this size and the sizes say so (one build serves both: the quick run), else the
    world and default config of bench.ranking (its main builds, saves and measures first)."""
    from apex_rank.ranking.recommender import load_recommender
    from bench import ranking

    bundle = bundles / f"online-{songs}"
    if sizes.batch_world != "bench.online bundle" or songs not in results.online:
        bundle = bundles / f"ranking-{songs}"
        argv = ["--small"] if songs == 10_000 else ["--songs", str(songs)]
        argv += ["--bundle", str(bundle), "--repeats", "1", "--batch-repeats", "1",
                 "--latency-users", str(sizes.latency_users)]
        print(f"python -m bench.ranking {' '.join(argv)}")
        ranking.main(argv)
    # The table's figure: interleaved rounds on the saved bundle.
    rec = load_recommender(bundle, device="cpu")
    print(f"{bundle.name}: {len(rec.user_ids)} users, config {rec.config.candidates}, cf {rec.config.cf}")
    world = "bench.online bundle" if bundle.name.startswith("online") else "bench.ranking world"
    results.batch[songs] = {**ranking.batch_vs_bare(rec, rec.user_ids, sizes.batch_repeats), "world": world}


def run(sizes: Sizes, bundles: Path, redis_url: str) -> Results:
    from bench import als_topk, events, faiss_scale

    res = Results()
    res.apex = _section(res, "APEX head (bench.apex_head)",
                        lambda: _apex(sizes.apex_repeats))
    for n in sizes.online_songs:
        _section(res, f"online ranking, {n:,} songs (bench.online, in-process)",
                 partial(_online, res, n, sizes, bundles, redis_url))
        if n in res.online:
            _section(res, f"RAM per song, {n:,} songs", partial(_ram, res, n, bundles))
    for n in sizes.batch_songs:
        _section(res, f"recommend_batch vs bare implicit, {n:,} songs ({sizes.batch_world})",
                 partial(_batch, res, n, sizes, bundles))
    _section(res, "ALS top-k (bench.als_topk)", lambda: als_topk.main(list(sizes.als_topk_argv)))
    _section(res, "event recording (bench.events)", lambda: events.main([*sizes.events_argv, "--redis", redis_url]))
    _section(res, "FAISS at catalogue scale (bench.faiss_scale)", lambda: faiss_scale.main(list(sizes.faiss_argv)))
    if sizes.embed:
        from bench import embed

        def embed_run() -> None:
            argv, sys.argv = sys.argv, ["bench.embed", "--repeats", "1"]  # its main reads sys.argv
            try:
                embed.main()
            finally:
                sys.argv = argv

        _section(res, "audio embedding (bench.embed)", embed_run)
    return res


def _apex(repeats: int) -> dict[str, Any]:
    from bench.apex_head import measure_head, print_result

    r = measure_head(4096, repeats)
    print_result(r)
    return r


# ---------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Figure:
    """A measured value next to the baseline or floor measured in the same run."""

    value: float
    baseline: float
    baseline_label: str
    note: str = ""  # how it was measured, when a size can be measured more than one way


def _level(res: Results, songs: int, concurrency: int) -> dict[str, Any] | None:
    if songs not in res.online:
        return None
    return next((lv for lv in res.online[songs]["levels"] if lv["concurrency"] == concurrency), None)


def _online_latency(pct: str) -> Callable[[Results, int], Figure | None]:
    def figure(res: Results, songs: int) -> Figure | None:
        lv = _level(res, songs, 1)
        if lv is None or not lv["in_process"].get("n"):
            return None
        return Figure(lv["in_process"][f"{pct}_ms"], lv["floor"][f"{pct}_ms"],
                      f"bare pipelined Redis fetch of the same keys, {pct}")
    return figure


def _online_throughput(res: Results, songs: int) -> Figure | None:
    lv = _level(res, songs, 8)
    if lv is None or not lv["in_process"].get("n"):
        return None
    return Figure(lv["in_process"]["per_s"], lv["floor"]["per_s"], "bare Redis fetches/s, 8 threads")


def _batch_figure(res: Results, songs: int) -> Figure | None:
    b = res.batch.get(songs)
    if b is None:
        return None
    return Figure(b["hybrid_users_s"], b["bare_users_s"], "bare implicit recommend, users/s", f"on the {b['world']}")


def _ram_figure(res: Results, songs: int) -> Figure | None:
    r = res.ram.get(songs)
    if r is None:
        return None
    per = r["per_song_kb"]
    return Figure(per["rss"], r["imports_kb"]["rss"] / 1024, "RSS after the imports alone, MB",
                  f"resident; of it own (anonymous) {per['anonymous']:.2f} kB, "
                  f"file-backed, shared {per['file']:.2f} kB")


def _apex_ratio(res: Results, songs: int) -> Figure | None:
    a = res.apex
    return None if a is None else Figure(a["fused_over_floor"], a["floor_s"] * 1e3,
                                         f"{a['floor'].removeprefix('floor: ')}, ms")


def _apex_diff(res: Results, songs: int) -> Figure | None:
    a = res.apex
    return None if a is None else Figure(a["max_abs_diff"], float("nan"), "the plain module's outputs")


@dataclass(frozen=True)
class Target:
    """One issue-15 goal: ``figure`` at ``songs`` (0: no catalogue) compared with ``goal``.
    ``bench`` names the measurement (``online``, ``batch``, ``ram`` or ``apex``): which sizes
    a run planned and which it measured."""

    name: str
    songs: int
    goal: float
    unit: str
    higher_is_better: bool
    figure: Callable[[Results, int], Figure | None]
    bench: str


def _measured_sizes(bench: str, res: Results) -> list[int]:
    return sorted({"online": res.online, "batch": res.batch, "ram": res.ram}.get(bench, {}))


def _planned_sizes(bench: str, sizes: Sizes) -> tuple[int, ...]:
    return {"online": sizes.online_songs, "ram": sizes.online_songs, "batch": sizes.batch_songs}.get(bench, (0,))


TARGETS = (
    Target("online in-process p50 (k = 20, concurrency 1)", 100_000, 2.0, "ms", False,
           _online_latency("p50"), "online"),
    Target("online in-process p99 (k = 20, concurrency 1)", 100_000, 4.0, "ms", False,
           _online_latency("p99"), "online"),
    Target("online in-process p99 (k = 20, concurrency 1)", 1_000_000, 10.0, "ms", False,
           _online_latency("p99"), "online"),
    Target("online in-process rankings/s, concurrency 8 on 2 cores", 100_000, 600.0, "/s", True,
           _online_throughput, "online"),
    Target("recommend_batch users/s", 10_000, 2000.0, "/s", True, _batch_figure, "batch"),
    Target("recommend_batch users/s", 100_000, 1000.0, "/s", True, _batch_figure, "batch"),
    Target("RAM per song beyond the imports (ranker process, resident, users included)", 100_000, 1.5, "kB", False,
           _ram_figure, "ram"),
    Target("APEX head fused / matmul-only floor, batch 4096", 0, 1.2, "x", False, _apex_ratio, "apex"),
    Target("APEX head max |fused - plain|, batch 4096", 0, 1e-4, "", False, _apex_diff, "apex"),
)


def _fmt(x: float, unit: str) -> str:
    if unit == "":
        return f"{x:.1e}"
    if unit == "x":
        return f"x{x:.2f}"
    if unit == "/s":
        return f"{x:,.0f}/s"
    return f"{x:.2f} {unit}"


def target_row(t: Target, res: Results, sizes: Sizes) -> list[str]:
    """Cells: target, goal, measured, in-run baseline, ratio, status."""
    where = f" at {t.songs:,} songs" if t.songs else ""
    goal = f"{'≥' if t.higher_is_better else '≤'} {_fmt(t.goal, t.unit)}"
    fig = t.figure(res, t.songs)
    if fig is None:
        if t.songs in _planned_sizes(t.bench, sizes):
            why = "not measured: the benchmark failed (its output is below)"
        else:
            done = [n for n in _measured_sizes(t.bench, res) if t.figure(res, n) is not None]
            why = f"not measured: needs {t.songs:,} songs (run without --quick)"
            if done:
                why += f"; for reference only, at {done[-1]:,} songs: {_fmt(t.figure(res, done[-1]).value, t.unit)}"  # type: ignore[union-attr]
        return [t.name + where, goal, why, "", "", "not measured"]
    if t.unit == "x":
        base, ratio = f"{fig.baseline:.2f} ({fig.baseline_label})", ""
    elif fig.baseline != fig.baseline:  # NaN: nothing to divide by
        base, ratio = fig.baseline_label, ""
    else:
        base = f"{_fmt(fig.baseline, t.unit if t.unit != 'kB' else 'MB')} ({fig.baseline_label})"
        ratio = (f"{fig.baseline / fig.value:.1f}x slower" if t.higher_is_better
                 else f"x{fig.value / fig.baseline:.1f} of the floor") if t.unit != "kB" else ""
    met = fig.value >= t.goal if t.higher_is_better else fig.value <= t.goal
    value = _fmt(fig.value, t.unit) + (f" ({fig.note})" if fig.note else "")
    return [t.name + where, goal, value, base, ratio, "met" if met else "**not met**"]


# ---------------------------------------------------------------------------- Markdown
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def render(res: Results, *, sizes: Sizes, command: str, started: datetime, seconds: float,
           load: list[float]) -> str:
    from apex_rank.threads import thread_report
    from bench.ranking import machine

    head = machine_header()
    cores = head["cores"]
    others = load[0] >= 0.5
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {started:%Y-%m-%d %H:%M} UTC in {seconds / 60:.1f} min "
        f"({'quick sizes' if sizes is QUICK else 'full sizes'}). SYNTHETIC data throughout; every ratio "
        "compares figures measured in the same run (interleaved where the benchmark says so), so compare "
        "ratios across runs, not absolute times.",
        "",
        f"- **machine**: {machine()}",
        f"- **cores**: {cores} usable; device {head['device']}",
        "- **versions**: " + ", ".join(f"{k} {v}" for k, v in head["versions"].items()),
        f"- **threads**: {thread_report()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')} (`apex_rank/threads.py`); "
        "each benchmark starts from these pools; the online ranker runs with 1 thread per process "
        "(parallelism from concurrent requests), as `bench.online` sets it",
        f"- **load average** (1 min, sampled every 10 s): {load[0]:.2f} before the first benchmark, median "
        f"{median(load):.2f}, max {max(load):.2f}, {load[-1]:.2f} at the end; this run's own work accounts "
        f"for up to about {cores} of it."
        + (" **Produced under load from other processes** (the machine is shared): absolute times are "
           "slower than on an idle machine." if others else ""),
        "",
        "## Issue 15 targets",
        "",
    ]
    lines += _table(["target", "goal", "measured (median)", "in-run baseline / floor", "ratio", "status"],
                    [target_row(t, res, sizes) for t in TARGETS])
    lines += ["", "## Figures", ""]
    for songs, r in sorted(res.online.items()):
        lines += [f"**Online, in-process, {songs:,} songs, {r['n_users']:,} users, k = {r['k']}** "
                  f"(`bench.online`; floor: a bare pipelined Redis fetch of the pointer and the user's hash; "
                  f"{r['levels'][0]['in_process'].get('n', 0)} requests per level; build {r['build']})", ""]
        lines += _table(["concurrency", "in-process p50 / p99 ms", "floor p50 / p99 ms", "p50 / p99 vs floor",
                         "in-process /s", "floor /s", "errors"],
                        [[str(lv["concurrency"]),
                          f"{lv['in_process'].get('p50_ms')} / {lv['in_process'].get('p99_ms')}",
                          f"{lv['floor'].get('p50_ms')} / {lv['floor'].get('p99_ms')}",
                          f"x{lv.get('ratio_p50')} / x{lv.get('ratio_p99')}",
                          f"{lv['in_process'].get('per_s')}", f"{lv['floor'].get('per_s')}", str(lv["errors"])]
                         for lv in r["levels"]])
        lines.append("")
    for songs, b in sorted(res.batch.items()):
        lines += [f"**recommend_batch, {songs:,} songs** (the {b['world']}; all its users, "
                  f"k = 20, median of {sizes.batch_repeats} interleaved rounds): {b['hybrid_users_s']:,.0f} users/s; "
                  f"bare implicit `recommend` on the same users and ALS factors {b['bare_users_s']:,.0f} users/s; "
                  f"bare / hybrid x{b['ratio']:.2f}", ""]
    for songs, r in sorted(res.ram.items()):
        per = r["per_song_kb"]
        lines += [f"**RAM, {songs:,}-song online bundle** ({r['users']:,} users; `bench.memory.memory_kb`): a fresh "
                  f"process holds {r['imports_kb']['rss'] / 1024:.0f} MB after importing the serving stack and "
                  f"{r['loaded_kb']['rss'] / 1024:.0f} MB after `RankingEngine.load` and 50 `recommend` calls; "
                  f"per song beyond the imports (the users' state included): resident {per['rss']:.2f} kB, of which "
                  f"the process's own (anonymous) {per['anonymous']:.2f} kB and file-backed pages (the memory-mapped "
                  f"bundle arrays and library code first touched by loading), shared by every worker, "
                  f"{per['file']:.2f} kB", ""]
    if res.apex is not None:
        a = res.apex
        lines += [f"**APEX head, batch {a['batch']}** (`bench.apex_head`, median of {a['repeats']} interleaved "
                  "rounds; floor: the fused head's matrix products alone at its shapes, without bias or "
                  "activations, the faster of MKL `mm`/`bmm` and the oneDNN products): "
                  + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in a["median_s"].items())
                  + f"; fused / floor x{a['fused_over_floor']:.2f}, plain / fused x{a['plain_over_fused']:.2f}", ""]
    lines += ["## Each benchmark's output", ""]
    for sec in res.sections:
        status = f"failed: {sec.error}" if sec.error else "ok"
        lines += [f"<details><summary>{sec.title}: {sec.seconds:.0f} s, {status}</summary>", "", "```text",
                  sec.text.rstrip(), "```", "", "</details>", ""]
    if not sizes.embed:
        lines += ["`bench.embed` (audio decoding and embedding, no issue-15 target) runs only without --quick.", ""]
    lines += ["## Command", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under 5 minutes on 2 cores")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    ap.add_argument("--bundles", default=None,
                    help="folder for the built bundles, reused by later runs (default: a temporary folder, removed)")
    ap.add_argument("--redis", default=os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    sizes = QUICK if args.quick else FULL
    command = "python -m bench.report" + ("".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])))
    started = datetime.now(UTC)
    sampler = _LoadSampler()
    sampler.start()
    t0 = time.perf_counter()
    bundles = Path(args.bundles) if args.bundles else Path(tempfile.mkdtemp(prefix="apexrank-report-"))
    bundles.mkdir(parents=True, exist_ok=True)
    try:
        res = run(sizes, bundles, args.redis)
    finally:
        if not args.bundles:
            shutil.rmtree(bundles, ignore_errors=True)
        sampler.stop()
    text = render(res, sizes=sizes, command=command, started=started, seconds=time.perf_counter() - t0,
                  load=sampler.samples)
    Path(args.out).write_text(text)
    print(f"\nreport written to {args.out} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 1 if any(sec.error for sec in res.sections) else 0


if __name__ == "__main__":
    raise SystemExit(main())
