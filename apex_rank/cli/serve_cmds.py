"""CLI commands of the online stage: ``publish``, ``serve``, ``warm-up``, ``export-events``.

Thin: each parses its arguments and calls one library function of
``apex_rank.ranking.online``. Redis URLs may carry a password
(``redis://:secret@host:6379/0``) or use TLS (``rediss://``); they are never echoed with the
password.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from apex_rank.cli.outputs import check_out_file
from apex_rank.errors import ConfigError

if TYPE_CHECKING:
    from apex_rank.ranking.online import OnlineConfig

DEFAULT_REDIS = os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0")


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
    p.add_argument("--redis", default=DEFAULT_REDIS,
                   help="redis://, rediss:// or redis+cluster://host:port[,host:port] URL")
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
    where = s.add_mutually_exclusive_group()
    where.add_argument("--bundle", default=None,
                       help="the bundle folder this host serves (any local path; its fingerprint must "
                            "match the published version's; served degraded if Redis is down at start)")
    where.add_argument("--bundle-root", default=None,
                       help="folder of bundles, one per sub-folder (any names): each version is loaded "
                            "from the sub-folder whose fingerprint it names")
    s.add_argument("--redis", default=DEFAULT_REDIS)
    s.add_argument("--config", default=None,
                   help="TOML file whose [online] table (with [online.access]) sets the service; "
                        "the flags below override it")
    s.add_argument("--namespace", default=None, help="key namespace (default: the config's, 'default')")
    s.add_argument("--host", default="127.0.0.1",
                   help="bind address (loopback by default; any other needs an API key or --insecure)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=2, help="worker processes sharing one Redis")
    s.add_argument("--budget-ms", type=float, default=None, help="Redis latency budget per request (50)")
    s.add_argument("--api-key-file", default=None,
                   help="file of API keys, one per line (or $APEX_RANK_API_KEY / $APEX_RANK_API_KEY_FILE): "
                        "then /events and /songs need 'Authorization: Bearer <key>'")
    s.add_argument("--protect-recommend", action="store_true", help="/recommend needs the key too")
    s.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key")
    s.add_argument("--rate-limit", type=float, default=None,
                   help="requests/s per key and worker on the routes that need a key (50; 0: off)")
    s.add_argument("--burst", type=int, default=None, help="requests at once per key and worker (100)")
    s.add_argument("--new-users-per-min", type=int, default=None,
                   help="users /events may create per key and worker per minute (1000; 0: off)")
    s.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
    s.add_argument("--header-timeout-s", type=float, default=None,
                   help="close a connection without a complete request head after this long (10)")
    s.add_argument("--audio-root", default=None, metavar="DIR",
                   help="POST /songs may name audio files under this folder (audio_path); without it "
                        "only uploads to POST /songs/{song_id}/audio are embedded")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("warm-up", help="background consumer of the event stream: recorded plays move the "
                       "CF factors of new songs and users between retrains (one per namespace)")
    where = w.add_mutually_exclusive_group()
    where.add_argument("--bundle", default=None, help="the bundle folder of the published version")
    where.add_argument("--bundle-root", default=None, help="folder of bundles, one per sub-folder")
    w.add_argument("--redis", default=DEFAULT_REDIS)
    w.add_argument("--namespace", default="default")
    w.set_defaults(func=cmd_warm_up)

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
    from apex_rank.ranking.online.redis_store import redact_url

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


def serve_config(args: argparse.Namespace) -> OnlineConfig:
    """The service's :class:`OnlineConfig`: ``--config``'s ``[online]`` table, then the flags."""
    from dataclasses import replace
    from pathlib import Path

    from apex_rank.config import load_config
    from apex_rank.ranking.online import OnlineConfig

    cfg = load_config(args.config, OnlineConfig, section="online") if args.config else OnlineConfig()
    top = {k: v for k, v in (("namespace", args.namespace), ("budget_ms", args.budget_ms))
           if v is not None}
    access = {k: v for k, v in (("api_key_file", args.api_key_file),
                                ("protect_recommend", args.protect_recommend or None),
                                ("docs", args.docs or None), ("rate_per_s", args.rate_limit),
                                ("burst", args.burst), ("new_users_per_min", args.new_users_per_min),
                                ("header_timeout_s", args.header_timeout_s)) if v is not None}
    audio = cfg.audio
    if args.audio_root is not None:
        if not Path(args.audio_root).is_dir():
            raise ConfigError(f"--audio-root {args.audio_root}: not a folder")
        audio = replace(audio, root=str(Path(args.audio_root).resolve()))
    return replace(cfg, **top, access=replace(cfg.access, **access), audio=audio)


def cmd_serve(args: argparse.Namespace) -> int:
    import json
    import logging

    from apex_rank.config import to_dict
    from apex_rank.ranking.online.access import AccessPolicy, check_bind, is_loopback, load_key_ring
    from apex_rank.ranking.online.redis_store import redact_url

    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    cfg = serve_config(args)
    ring = load_key_ring(cfg.access)  # a bad or missing key file stops here, not in a worker
    check_bind(args.host, ring, insecure=args.insecure)
    AccessPolicy(cfg.access, ring)  # refuses protect_recommend without a key
    if not ring and not is_loopback(args.host):
        logging.getLogger(__name__).warning(
            "binding to %s without an API key (--insecure): anyone reaching the port can write "
            "events and songs", args.host)
    if args.bundle or args.bundle_root:
        _check_bundle(args, cfg.namespace)
    import uvicorn

    from apex_rank.ranking.online.service import CONFIG_ENV, HEADER_TIMEOUT_ENV, HTTP_PROTOCOL

    os.environ["APEX_RANK_REDIS_URL"] = args.redis
    os.environ[CONFIG_ENV] = json.dumps(to_dict(cfg))
    os.environ[HEADER_TIMEOUT_ENV] = repr(cfg.access.header_timeout_s)
    if args.bundle:
        os.environ["APEX_RANK_BUNDLE"] = args.bundle
    if args.bundle_root:
        os.environ["APEX_RANK_BUNDLE_ROOT"] = args.bundle_root
    keys = f"{len(ring.digests)} API key(s)" if ring else "no API key"
    print(f"serving namespace {cfg.namespace!r} from {redact_url(args.redis)} on "
          f"http://{args.host}:{args.port} with {args.workers} worker(s), {keys}")
    uvicorn.run("apex_rank.ranking.online.service:app_from_env", factory=True, host=args.host,
                port=args.port, workers=args.workers, log_level="warning", http=HTTP_PROTOCOL,
                timeout_keep_alive=cfg.access.keep_alive_s,
                h11_max_incomplete_event_size=cfg.access.max_header_bytes)
    return 0


def _check_bundle(args: argparse.Namespace, namespace: str) -> None:
    """Refuse (BundleMismatchError, exit 2) a --bundle or --bundle-root that lacks the published
    version's bundle, before any worker starts; an unreachable Redis only warns (the workers
    serve --bundle degraded and retry)."""
    import logging

    from apex_rank.errors import StoreError
    from apex_rank.ranking.online import RedisStore
    from apex_rank.ranking.online.bundles import check_published

    log = logging.getLogger(__name__)
    try:
        store = RedisStore(args.redis, namespace, timeout_s=5.0)
        try:
            found = check_published(store, bundle=args.bundle, bundle_root=args.bundle_root)
        finally:
            store.close()
    except StoreError as err:
        log.warning("cannot check the bundle against the published version: %s", err)
        return
    if found is not None:
        log.info("version %d is served from %s", *found)


def cmd_warm_up(args: argparse.Namespace) -> int:
    import signal
    import threading

    from apex_rank.ranking.online import OnlineConfig, RedisStore, WarmUpConsumer, bundle_cf_loader
    from apex_rank.ranking.online.redis_store import redact_url

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    consumer = WarmUpConsumer(RedisStore(args.redis, args.namespace, timeout_s=30.0),
                              config=OnlineConfig(namespace=args.namespace),
                              cf_loader=bundle_cf_loader(bundle=args.bundle, bundle_root=args.bundle_root))
    print(f"warm-up consumer on {redact_url(args.redis)} namespace {args.namespace!r}; "
          "SIGTERM or Ctrl-C stops it", flush=True)
    consumer.start()
    try:
        while not stop.wait(60):
            print(f"warm-up: version {consumer.version}, {consumer.stats}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.stop()
    return 0


def cmd_export_events(args: argparse.Namespace) -> int:
    from apex_rank.ranking.online import RedisStore, export_events

    check_out_file(args.out)
    store = RedisStore(args.redis, args.namespace, timeout_s=30.0)
    since = _parse_time(args.since) if args.since else None
    until = _parse_time(args.until) if args.until else None
    res = export_events(store, args.out, since=since, until=until)
    print(f"wrote {res.rows} events to {args.out}")
    if res.skipped:  # reported, never fatal: one old writer's bad row must not block retraining
        import sys

        more = " (first shown)" if res.skipped > len(res.problems) else ""
        print(f"skipped {res.skipped} bad event row(s){more}:", file=sys.stderr)
        for line in res.problems:
            print(f"  {line}", file=sys.stderr)
    return 0
