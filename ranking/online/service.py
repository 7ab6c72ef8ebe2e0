"""The HTTP ranking service (FastAPI; ``apex-rank serve`` runs it under uvicorn).

Endpoints: ``GET /recommend``, ``POST /events``, ``POST /songs`` (an embedding, or an audio
file under the allow-list root), ``POST /songs/{song_id}/audio`` (an audio upload, capped at
``audio.max_bytes``; see :mod:`.audio`), ``GET /health``, ``GET /metrics`` (Prometheus text
format); ``/docs``, ``/redoc`` and ``/openapi.json`` only with ``access.docs``. Validation
errors are 4xx with a reason (``{"detail": ...}``), never 5xx; bodies larger than
``max_body_bytes`` are refused with 413 before they are read. Store failures during
``/recommend`` give a ``degraded`` answer (200); during ``/events`` and ``/songs`` a 503 whose
body says only ``store unavailable`` (the reason, which names the Redis host and key, goes to
the log). With an API key set, ``/events`` and ``/songs`` need it, and per-key quotas apply
(:mod:`.access`: 401, 429 with ``Retry-After``).

Several uvicorn workers each build their own ranker from the environment
(:func:`app_from_env`) and share one Redis; the catalogue stream keeps their song sets equal.
``GET /metrics`` reports the sum over all live workers of the namespace: each worker writes a
snapshot of its own registry to the hash ``apexrank:<NS>:{<NS>}:metrics`` every ``metrics_flush_s``
seconds, stamped with the Redis server's clock (so hosts' clocks do not matter), and adds the
others' latest snapshots to its own live numbers; a snapshot older than five periods is a dead
worker's and is dropped.

``apex-rank serve`` runs uvicorn with :class:`NoDelayHTTPProtocol`: with ``--workers`` > 1
uvicorn binds the listening socket itself without ``IPPROTO_TCP``, asyncio then leaves Nagle's
algorithm on for accepted connections, and every keep-alive request after the first waits
~40 ms for the client's delayed ACK (uvicorn issue #3149; measured here: /health 44 ms with two
workers against 1 ms with one). The same protocol closes a connection that has not sent a
complete request head within ``access.header_timeout_s`` (``$APEX_RANK_HEADER_TIMEOUT_S``):
uvicorn 0.54 has keep-alive and head-size limits but no header timeout, so a client trickling
header bytes held a connection open for as long as it liked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from apex_rank.errors import ApexRankError, RequestError, StoreError, UnknownIdError

from .access import AccessGuard, AccessPolicy, KeyRing, load_key_ring
from .audio import AudioPathForbidden, resolve_audio_path
from .config import OnlineConfig
from .events import Interaction, record_many
from .ingest import check_embedding, check_popularity, ingest
from .keys import ID_PATTERN
from .metrics import Metrics, MetricsFlusher
from .ranker import OnlineRanker

log = logging.getLogger(__name__)
_ID = ID_PATTERN.pattern
HTTP_PROTOCOL = "apex_rank.ranking.online.service:NoDelayHTTPProtocol"  # uvicorn's ``http=``


def _http_protocol_base() -> type:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # httptools if installed, else h11

    return AutoHTTPProtocol


HEADER_TIMEOUT_ENV = "APEX_RANK_HEADER_TIMEOUT_S"


class NoDelayHTTPProtocol(_http_protocol_base()):  # type: ignore[misc]
    """uvicorn's HTTP protocol with ``TCP_NODELAY`` set on every accepted TCP connection
    (see the module doc: the multi-worker listener would otherwise leave Nagle on), and a
    request-head timeout of ``$APEX_RANK_HEADER_TIMEOUT_S`` seconds (default 10).

    The timer starts when the connection opens and whenever bytes arrive while no request is
    in progress; it fires harmlessly if a request head was parsed since (uvicorn then holds a
    new request cycle), else the connection is closed. Body reads and keep-alive idling keep
    uvicorn's own rules."""

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._head_timer: Any = None
        self._head_timeout_s = float(os.environ.get(HEADER_TIMEOUT_ENV) or 10.0)
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head_timeout_s, self._head_timed_out,
                                                    self.cycle)

    def _head_timed_out(self, cycle_then: Any) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not cycle_then:  # a request head arrived in time
            if self.cycle.response_complete:
                self._arm_head_timer()  # between requests: bytes of the next may be waiting
            return
        log.info("closing a connection from %s: no complete request head within %.0f s",
                 self.client, self._head_timeout_s)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm_head_timer()  # bytes of a new request head: it has header_timeout_s
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class EventIn(BaseModel):
    """One interaction; ``ts`` in unix seconds within ``[2000-01-01, now + 1 day]`` (default:
    now), checked with the whole batch by :func:`~.events.record_many`."""

    user_id: str = Field(pattern=_ID, max_length=128)
    song_id: str = Field(pattern=_ID, max_length=128)
    kind: str = "play"
    ts: float | None = Field(default=None, strict=True)  # strict: ``true`` is not 1.0


class EventsIn(BaseModel):
    """A batch of 1-1000 interactions, recorded all or nothing."""

    events: list[EventIn] = Field(min_length=1, max_length=1000)


class SongIn(BaseModel):
    """A new song given by its embedding (the bundle's encoder, its width) or by an audio file
    under the server's audio root (``audio_path``, relative to the root or absolute)."""

    song_id: str = Field(pattern=_ID, max_length=128)
    embedding: list[float] | None = Field(default=None, min_length=1, max_length=8192)
    audio_path: str | None = Field(default=None, min_length=1, max_length=4096)
    popularity: float = Field(default=0.0, ge=0)

    # the checks of ingest(), here too so the 422 carries the field's location; values are
    # checked as the float32 they are stored as (1e39 and 3e38 * d overflow it)
    @field_validator("embedding")
    @classmethod
    def finite_nonzero(cls, v: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if v is not None:
            check_embedding(v, str(info.data.get("song_id", "?")))
        return v

    @model_validator(mode="after")
    def one_source(self) -> SongIn:
        if (self.embedding is None) == (self.audio_path is None):
            raise ValueError("give exactly one of embedding or audio_path")
        return self

    @field_validator("popularity")
    @classmethod
    def finite_float32(cls, v: float) -> float:
        return check_popularity(v)


class Item(BaseModel):
    song_id: str
    score: float
    source: str


class RecommendOut(BaseModel):
    """The answer of ``GET /recommend``."""

    user_id: str
    model_version: str
    degraded: bool
    items: list[Item]
    cold_shortfall: int | None = None


_KNOWN_ROUTES = frozenset({"/recommend", "/events", "/songs", "/health", "/metrics", "/openapi.json",
                           "/docs"})
UPLOAD_ROUTE = "/songs/{song_id}/audio"
_UPLOAD_PATH = re.compile(r"/songs/.+/audio")  # ids may hold '/' (``calm/calm_acoustic_1``)
#: Content types of ``POST /songs/{song_id}/audio`` and the file suffix each is decoded as.
AUDIO_TYPES = {"audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav",
               "audio/vnd.wave": ".wav", "audio/flac": ".flac", "audio/x-flac": ".flac",
               "audio/ogg": ".ogg", "audio/opus": ".opus", "audio/mpeg": ".mp3",
               "audio/aiff": ".aiff", "audio/x-aiff": ".aiff"}


def route_label(path: str) -> str:
    """The route a request path is counted under in the metrics (an upload's song id left out)."""
    if path in _KNOWN_ROUTES:
        return path
    return UPLOAD_ROUTE if _UPLOAD_PATH.fullmatch(path) else "other"


class LimitAndMeasure:
    """Pure ASGI middleware: refuses bodies over ``max_body_bytes`` (``upload_bytes`` for an
    audio upload; 413, by Content-Length or, for chunked bodies, while reading), a malformed
    Content-Length (400), turns an unhandled error into a plain 500, and records every response
    in ``metrics``. (Starlette's ``@app.middleware("http")`` does the same through a streaming
    wrapper that cost more per request than the ranking's Redis read.)"""

    def __init__(self, app: Any, *, metrics: Metrics, max_body_bytes: int,
                 upload_bytes: int | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.upload_bytes = max_body_bytes if upload_bytes is None else upload_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        route = route_label(path)
        limit = self.upload_bytes if route == UPLOAD_ROUTE else self.max_body_bytes
        status = [500]
        started = [False]

        async def send_and_note(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = int(message["status"]), True
            await send(message)

        async def answer(code: int, detail: str) -> None:
            await JSONResponse({"detail": detail}, status_code=code)(scope, receive, send_and_note)

        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        try:
            if length is not None:
                if not length.isdigit():
                    await answer(400, "invalid Content-Length")
                    return
                if int(length) > limit:
                    await answer(413, f"request body of {int(length)} bytes exceeds the limit of "
                                      f"{limit}")
                    return
            elif scope["method"] in ("POST", "PUT", "PATCH"):
                body, more = b"", True
                while more:  # chunked: read it all here, refusing as soon as it is too long
                    msg = await receive()
                    body += msg.get("body", b"")
                    more = msg.get("more_body", False)
                    if len(body) > limit:
                        await answer(413, f"request body exceeds the limit of {limit} bytes")
                        return
                replayed = [False]

                async def receive_body() -> dict[str, Any]:
                    if not replayed[0]:
                        replayed[0] = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                receive = receive_body
            try:
                await self.app(scope, receive, send_and_note)
            except Exception:  # noqa: BLE001 - logged; the client gets a plain 500
                log.exception("unhandled error on %s", path)
                if not started[0]:
                    await answer(500, "internal error")
        finally:
            self.metrics.observe(route, status[0], time.perf_counter() - t0)


def create_app(ranker: OnlineRanker, *, config: OnlineConfig | None = None,
               metrics_flush_s: float = 2.0, worker_id: str | None = None,
               keys: KeyRing | None = None) -> FastAPI:
    """The FastAPI application serving ``ranker`` (see the module doc).

    ``app.state.metrics_flusher`` (a :class:`MetricsFlusher`, over the ranker's store whichever
    it is) shares the metrics every ``metrics_flush_s`` seconds while the app runs (started and
    stopped by its lifespan) under ``worker_id`` (default ``hostname-pid``).
    ``keys``: the accepted API keys (default: :func:`~.access.load_key_ring` from the
    environment and ``config.access``); ``app.state.access`` is the :class:`~.access.AccessPolicy`.
    """
    cfg = config or ranker.config
    policy = AccessPolicy(cfg.access, load_key_ring(cfg.access) if keys is None else keys)
    metrics = Metrics()
    # through the store contract: with the in-process store (one worker) it only keeps its own
    flusher = MetricsFlusher(metrics, ranker.store, flush_s=metrics_flush_s, worker=worker_id)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        flusher.start()
        try:
            yield
        finally:
            flusher.stop()

    docs = cfg.access.docs
    app = FastAPI(title="apex-rank", version="0.1.0", lifespan=lifespan,
                  description="Online ranking of AI-generated music (APEX priors + CF + LightGBM)",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.ranker = ranker
    app.state.metrics = metrics
    app.state.metrics_flusher = flusher
    app.state.access = policy

    # the last added runs first: sizes and metrics (401 and 429 counted too), then access
    app.add_middleware(AccessGuard, policy=policy)
    app.add_middleware(LimitAndMeasure, metrics=metrics, max_body_bytes=cfg.max_body_bytes,
                       upload_bytes=cfg.audio.max_bytes)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"detail": errs}, status_code=422)

    @app.exception_handler(AudioPathForbidden)
    async def on_forbidden(request: Request, exc: AudioPathForbidden) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(UnknownIdError)
    async def on_unknown(request: Request, exc: UnknownIdError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(StoreError)
    async def on_store(request: Request, exc: StoreError) -> JSONResponse:
        log.warning("503 on %s: %s", request.url.path, exc)  # names host and key: log only
        return JSONResponse({"detail": "store unavailable"}, status_code=503)

    @app.exception_handler(ApexRankError)
    async def on_apex(request: Request, exc: ApexRankError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/recommend", response_model=RecommendOut)
    def recommend(user_id: str = Query(min_length=1, max_length=128, pattern=_ID),
                  k: int = Query(20, ge=1, le=cfg.max_k),
                  exclude: str | None = Query(None, max_length=16384,
                                              description="comma-separated song ids"),
                  cold_share: float | None = Query(None, ge=0.0, le=1.0,
                                                   description="share of the k slots for new songs "
                                                   "(default: the model decides)")
                  ) -> Response:
        excl = [s for s in exclude.split(",") if s] if exclude else []
        res = ranker.rank(user_id, k, excl, cold_share)
        if res.degraded:
            with metrics._lock:  # noqa: SLF001
                metrics.degraded += 1
        # serialised here: the schema is RecommendOut by construction, and revalidating 20
        # items through pydantic on every request costs more than the Redis round trip
        return Response(json.dumps(res.to_dict(), separators=(",", ":")),
                        media_type="application/json")

    @app.post("/events")
    def post_events(body: EventsIn) -> dict[str, Any]:
        done = record_many(ranker.store, [Interaction(e.user_id, e.song_id, e.kind, e.ts)
                                          for e in body.events], config=cfg, engine=ranker.engine)
        return {"recorded": len(done),
                "events": [{"event_id": r.event_id, "user_id": r.user_id, "created": r.created}
                           for r in done]}

    def ingested(r: Any) -> dict[str, Any]:
        return {"song_id": r.song_id, "version": str(r.version), "stream_id": r.stream_id,
                "priors": [float(x) for x in r.priors]}

    @app.post("/songs")
    def post_song(body: SongIn) -> dict[str, Any]:
        if body.audio_path is not None:
            path = resolve_audio_path(body.audio_path, cfg.audio.root)
            return ingested(ingest(ranker, body.song_id, audio_path=path, popularity=body.popularity))
        import numpy as np

        return ingested(ingest(ranker, body.song_id, embedding=np.asarray(body.embedding, np.float32),
                               popularity=body.popularity))

    @app.post("/songs/{song_id:path}/audio")
    async def post_song_audio(request: Request,
                              song_id: str = Path(pattern=_ID, max_length=128),
                              popularity: float = Query(0.0, ge=0)) -> JSONResponse:
        """A new song as an audio file in the body (``Content-Type: audio/wav``, ``audio/flac``,
        ...), embedded with the bundle's encoder in a worker process (:mod:`.audio`)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in AUDIO_TYPES:
            return JSONResponse({"detail": f"Content-Type {kind or '(none)'!r} is not an audio type "
                                           f"this server decodes; use one of {', '.join(AUDIO_TYPES)}"},
                                status_code=415)
        popularity = check_popularity(popularity)
        data = await request.body()
        with tempfile.TemporaryDirectory(prefix="apexrank-upload-") as tmp:
            path = os.path.join(tmp, song_id.replace("/", "_") + AUDIO_TYPES[kind])
            with open(path, "wb") as fh:
                fh.write(data)
            try:
                r = await run_in_threadpool(ingest, ranker, song_id, audio_path=path,
                                            popularity=popularity)
            except RequestError as err:  # name the upload, not the server's temporary file
                raise RequestError(str(err).replace(path, f"uploaded audio of song {song_id!r}")) from None
        return JSONResponse(ingested(r))

    @app.get("/health")
    def health() -> JSONResponse:
        ok = ranker.store.ping()
        missing = None
        if ok:
            try:
                missing = ranker.check_data()
            except StoreError as err:
                log.warning("health: data check failed: %s", err)
                ok = False
        refused = ranker.bundle_refused  # the reason goes to the log, not to the body
        body = {"status": "ok" if ok and missing is None and refused is None else "degraded",
                "store": ranker.store.kind,
                "store_reachable": ok, "version_keys_present": ok and missing is None,
                "bundle_current": refused is None,
                "model_version": str(ranker.version),
                "requests": ranker.stats["requests"], "degraded": ranker.stats["degraded"]}
        return JSONResponse(body, status_code=200)

    @app.get("/metrics", response_class=PlainTextResponse)
    def get_metrics() -> PlainTextResponse:
        others = flusher.others()
        return PlainTextResponse(metrics.render(others), media_type="text/plain; version=0.0.4")

    return app


CONFIG_ENV = "APEX_RANK_ONLINE_CONFIG"


def app_from_env() -> Any:
    """App factory for ``uvicorn --factory`` and worker processes: reads ``APEX_RANK_REDIS_URL``,
    ``APEX_RANK_BUNDLE`` and ``APEX_RANK_BUNDLE_ROOT`` (optional, see :mod:`.bundles`),
    ``APEX_RANK_ONLINE_CONFIG`` (the whole
    :class:`OnlineConfig` as JSON, what ``apex-rank serve`` passes its workers) or else
    ``APEX_RANK_NAMESPACE`` and ``APEX_RANK_BUDGET_MS``, the API keys of
    :func:`~.access.load_key_ring`, and ``APEX_RANK_THREADS`` (default 1: a serving process
    gets its parallelism from concurrent requests and worker processes; multi-threaded
    LightGBM/faiss calls on 300 rows only oversubscribe the cores)."""
    from apex_rank.config import from_dict
    from apex_rank.threads import configure_threads

    configure_threads(int(os.environ.get("APEX_RANK_THREADS", "1")))
    url = os.environ.get("APEX_RANK_REDIS_URL", "redis://127.0.0.1:6379/0")
    bundle = os.environ.get("APEX_RANK_BUNDLE") or None
    if os.environ.get(CONFIG_ENV):
        cfg = from_dict(OnlineConfig, json.loads(os.environ[CONFIG_ENV]))
    else:
        cfg = OnlineConfig(namespace=os.environ.get("APEX_RANK_NAMESPACE", "default"),
                           budget_ms=float(os.environ.get("APEX_RANK_BUDGET_MS", "50")))
    root = os.environ.get("APEX_RANK_BUNDLE_ROOT") or None
    ranker = OnlineRanker.connect(url, namespace=cfg.namespace, config=cfg, bundle_dir=bundle,
                                  bundle_root=root)
    return create_app(ranker, config=cfg)
