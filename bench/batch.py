"""``recommend_batch`` throughput, per stage and against bare implicit: ``python -m bench.batch``.

Loads (or builds and saves, with :func:`bench.online.build_bundle`) the bench.online bundle of
``--songs`` songs, then

- times each stage of ``recommend_batch`` on all its users (median of ``--repeats`` runs, each
  stage's wall time summed over the chunks): user states, history and exclusions, each
  candidate source, the union, the feature matrix, the LightGBM scores, the top-k selection
  and the frame;
- compares ``recommend_batch`` users/s with bare implicit ``recommend`` on the same users, the
  same ALS factors and history, in interleaved rounds (:func:`bench.ranking.batch_vs_bare`).

SYNTHETIC data. The stage timers wrap the functions the pipeline calls, in this process only.

Example: ``python -m bench.batch --songs 100000 --bundle /tmp/online-100000``
"""

from __future__ import annotations

from apex_rank.threads import prefer_passive_openmp

prefer_passive_openmp()  # before numpy, faiss and torch load their thread pools (see apex_rank.threads)

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import print_header  # noqa: E402


@contextmanager
def stage_timers(rec: Any) -> Iterator[dict[str, float]]:
    """Seconds per stage of ``rec.recommend_batch`` while inside, summed over calls (the dict
    yielded); the wrapped functions are restored on exit."""
    from apex_rank.ranking import candidates, pipeline, recommender

    spent: dict[str, float] = defaultdict(float)
    restore: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, attr: str, stage: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[stage] += time.perf_counter() - t0

        restore.append((owner, attr, attr in vars(owner), vars(owner).get(attr)))
        setattr(owner, attr, staticmethod(timed) if isinstance(owner, type) else timed)

    wrap(rec, "user_state", "user states")
    wrap(pipeline, "history_positions", "history + exclusions")
    wrap(pipeline.Exclusions, "of_states", "history + exclusions")
    for src in rec.sources:
        wrap(src, "retrieve_positions", f"source {src.name}")
    wrap(candidates, "_union", "union / dedup")
    wrap(pipeline, "feature_array", "feature matrix")
    wrap(rec.reranker, "score_matrix", "LightGBM + base score")
    for attr in ("_contenders", "sorted_codes", "select_top_k", "user_draws"):
        wrap(pipeline, attr, "top-k selection")
    wrap(pipeline, "rank_arrays", "_rank_arrays")
    wrap(recommender, "ranked_frame", "frame")
    try:
        yield spent
    finally:
        for owner, attr, had_own, old in reversed(restore):
            if had_own:
                setattr(owner, attr, old)
            else:
                delattr(owner, attr)  # an instance: back to its class's method


def profile_stages(rec: Any, users: list[str], k: int, repeats: int) -> list[tuple[str, float]]:
    """Median ms per stage of ``recommend_batch(users, k)`` over ``repeats`` runs (after one
    warm-up), with ``rank_arrays rest`` (its own sorting and glue) and ``rest`` (everything
    outside the timed stages); the total last."""
    rec.recommend_batch(users, k)
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        with stage_timers(rec) as spent:
            t0 = time.perf_counter()
            rec.recommend_batch(users, k)
            total = time.perf_counter() - t0
        inner = sum(v for s, v in spent.items() if s not in ("_rank_arrays", "user states", "frame"))
        row = {s: v for s, v in spent.items() if s != "_rank_arrays"}
        row["rank_arrays rest (sort, glue)"] = spent["_rank_arrays"] - inner
        row["rest"] = total - spent["_rank_arrays"] - spent["user states"] - spent["frame"]
        row["total"] = total
        runs.append(row)
    return [(s, 1e3 * statistics.median(r[s] for r in runs)) for s in runs[0]]


def print_stages(stages: list[tuple[str, float]], n_users: int) -> None:
    total = dict(stages)["total"]
    print(f"stages of recommend_batch ({n_users} users; median ms over the runs, summed over the chunks):")
    for s, ms in sorted(stages, key=lambda x: (x[0] == "total", -x[1])):
        print(f"  {s:32s} {ms:9.1f} ms  {100 * ms / total:5.1f} %")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.splitlines()[0])
    p.add_argument("--songs", type=int, default=10_000)
    p.add_argument("--users", type=int, default=None, help="users of a new bundle (default songs / 2, at most 50k)")
    p.add_argument("--bundle", default=None, help="bundle folder (built and saved there when missing)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="profiled runs and interleaved rounds (medians)")
    p.add_argument("--max-users", type=int, default=None, help="rank only the first this many of the users")
    p.add_argument("--skip-profile", action="store_true")
    args = p.parse_args(argv)

    from apex_rank.threads import configure_threads

    configure_threads()
    print_header(f"bench.batch: recommend_batch at {args.songs} songs, k={args.k} (SYNTHETIC data)")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    from apex_rank.ranking.recommender import load_recommender
    from bench.online import build_bundle
    from bench.ranking import batch_vs_bare

    bundle = Path(args.bundle or f"/tmp/apexrank-bench-batch/online-{args.songs}")
    if not (bundle / "manifest.json").is_file():
        n_users = args.users or min(args.songs // 2, 50_000)
        print(f"building the bench.online bundle ({args.songs} songs, {n_users} users) in {bundle}")
        print(f"build: {build_bundle(args.songs, n_users, bundle)}")
    rec = load_recommender(bundle, device="cpu")
    users = rec.user_ids[: args.max_users]
    print(f"{bundle}: {len(rec.songs)} songs, {len(users)} users ranked, candidates {rec.config.candidates}, "
          f"cf factors {rec.config.cf.factors}, chunks of {rec.config.batch_users} users")
    if not args.skip_profile:
        print_stages(profile_stages(rec, users, args.k, args.repeats), len(users))
    batch_vs_bare(rec, users, args.repeats, args.k)
    print(f"load average at end: {os.getloadavg()[0]:.2f} (2-core machine shared with other work: compare "
          "ratios within this run, not absolute times across runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

