"""CLI commands of the online stage: ``publish``, ``serve``, ``export-events``.

Thin: each parses its arguments and calls one library function of
``apex_rank.ranking.online``. Redis URLs may carry a password
(``redis://:secret@host:6379/0``) or use TLS (``rediss://``); they are never echoed with the
password.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime

from apex_rank.cli.outputs import check_out_file
from apex_rank.errors import ConfigError

DEFAULT_REDIS = os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _parse_time(value: str) -> datetime:
    try:
        if value.replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(value), tz=UTC)
        t = datetime.fromisoformat(value)
        return t if t.tzinfo else t.replace(tzinfo=UTC)
    except ValueError as err:
        raise ConfigError(f"time {value!r} is neither ISO 8601 nor unix seconds") from err


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the parser."""
    p = sub.add_parser("publish", help="publish a bundle to Redis; moves the current pointer atomically")
    p.add_argument("--bundle", required=True, help="bundle folder written by `apex-rank build`")
    p.add_argument("--redis", default=DEFAULT_REDIS, help="redis:// or rediss:// URL")
    p.add_argument("--namespace", default="default")
    p.add_argument("--batch-size", type=int, default=2000, help="records per pipelined batch")
    p.add_argument("--grace-s", type=int, default=600, help="seconds the replaced version stays readable")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-carry", action="store_true",
                   help="do not carry songs ingested and events recorded since the bundle's cutoff")
    p.add_argument("--carry-since", default=None,
                   help="cutoff of the carry-over (ISO time or unix seconds; default: the end of the "
                        "bundle's training interactions)")
    p.set_defaults(func=cmd_publish)

    s = sub.add_parser("serve", help="HTTP ranking service (FastAPI + uvicorn) over a published bundle")
    s.add_argument("--bundle", default=None, help="bundle to serve degraded if Redis is down at start")
    s.add_argument("--redis", default=DEFAULT_REDIS)
    s.add_argument("--namespace", default="default")
    s.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=2, help="worker processes sharing one Redis")
    s.add_argument("--budget-ms", type=float, default=50.0, help="Redis latency budget per request")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("export-events", help="write recorded events to parquet for retraining")
    e.add_argument("--redis", default=DEFAULT_REDIS)
    e.add_argument("--namespace", default="default")
    e.add_argument("--since", default=None, help="ISO time or unix seconds (default: all)")
    e.add_argument("--until", default=None)
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export_events)


def cmd_publish(args: argparse.Namespace) -> int:
    from apex_rank.ranking.online import OnlineConfig, RedisStore, publish
    from apex_rank.ranking.online.ranker import default_loader
    from apex_rank.ranking.online.store import redact_url

    cfg = OnlineConfig(namespace=args.namespace, batch_size=args.batch_size, grace_s=args.grace_s)
    engine = default_loader(args.bundle)
    store = RedisStore(args.redis, args.namespace, timeout_s=30.0)
    since = _parse_time(args.carry_since).timestamp() if args.carry_since else None
    res = publish(engine, store, config=cfg, progress=not args.no_progress,
                  carry=not args.no_carry, carry_since_s=since)
    print(f"published {args.bundle} to {redact_url(args.redis)} namespace {args.namespace!r}: version "
          f"{res.version} (was {res.previous}), {res.n_songs} songs, {res.n_users} users in "
          f"{res.seconds:.1f} s; carried {res.carried_songs} ingested songs and "
          f"{res.replayed_events} events")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from apex_rank.ranking.online.store import redact_url

    if args.host not in LOOPBACK:
        logging.getLogger(__name__).warning(
            "binding to %s exposes the service beyond this machine; put it behind a proxy with "
            "authentication", args.host)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    os.environ["APEX_RANK_REDIS_URL"] = args.redis
    os.environ["APEX_RANK_NAMESPACE"] = args.namespace
    os.environ["APEX_RANK_BUDGET_MS"] = str(args.budget_ms)
    if args.bundle:
        os.environ["APEX_RANK_BUNDLE"] = args.bundle
    print(f"serving namespace {args.namespace!r} from {redact_url(args.redis)} on "
          f"http://{args.host}:{args.port} with {args.workers} worker(s)")
    from apex_rank.ranking.online.service import HTTP_PROTOCOL

    uvicorn.run("apex_rank.ranking.online.service:app_from_env", factory=True, host=args.host,
                port=args.port, workers=args.workers, log_level="warning", http=HTTP_PROTOCOL)
    return 0


def cmd_export_events(args: argparse.Namespace) -> int:
    from apex_rank.ranking.online import RedisStore, export_events

    check_out_file(args.out)
    store = RedisStore(args.redis, args.namespace, timeout_s=30.0)
    since = _parse_time(args.since) if args.since else None
    until = _parse_time(args.until) if args.until else None
    n = export_events(store, args.out, since=since, until=until)
    print(f"wrote {n} events to {args.out}")
    return 0
