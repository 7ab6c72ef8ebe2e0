"""Memory of a loaded bundle: ``python -m bench.memory BUNDLE [--users N]``.

In this process: the libraries a serving process imports, then ``load_recommender``, then one
``recommend_batch`` over ``--users`` users (which touches the pages ranking reads). After each
step it reads ``/proc/self/smaps_rollup`` and prints the growth beyond the imports per catalogue
song: ``rss`` (everything resident, shared file pages included), ``anon`` (this process's own
memory: what every extra worker process adds) and ``file`` (resident pages of memory-mapped
bundle files, shared by every process that maps them). Linux only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def memory_kb() -> dict[str, int]:
    """``Rss``, ``Pss``, ``Anonymous`` from ``/proc/self/smaps_rollup`` (kB), ``file`` = Rss − Anonymous."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].rstrip(":") in ("Rss", "Pss", "Anonymous"):
            out[parts[0].rstrip(":").lower()] = int(parts[1])
    out["file"] = out["rss"] - out["anonymous"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--users", type=int, default=2000, help="users ranked once after loading (0: none)")
    args = ap.parse_args(argv)

    from apex_rank.threads import configure_threads

    configure_threads()
    import faiss  # noqa: F401
    import implicit.cpu.als  # noqa: F401
    import lightgbm  # noqa: F401
    import torch  # noqa: F401

    from apex_rank.ranking.recommender import load_recommender

    base = memory_kb()
    rec = load_recommender(args.bundle, device="cpu")
    loaded = memory_kb()
    n = len(rec.songs)
    steps = {"loaded": loaded}
    if args.users:
        rec.recommend_batch(rec.user_ids[: args.users], 20)
        steps[f"after ranking {min(args.users, len(rec.user_ids))} users"] = memory_kb()
    print(f"# bench.memory — {args.bundle}: {n} songs, {len(rec.user_ids)} users; imports: "
          f"rss {base['rss'] / 1024:.0f} MB")
    for name, m in steps.items():
        per_song = {k: round((m[k] - base[k]) * 1024 / n) for k in ("rss", "anonymous", "file")}
        print(f"{name:28s}: beyond imports, bytes per song: rss {per_song['rss']}, own (anonymous) "
              f"{per_song['anonymous']}, mapped bundle files {per_song['file']} "
              f"| totals MB: {json.dumps({k: round((m[k] - base[k]) / 1024, 1) for k in m})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
