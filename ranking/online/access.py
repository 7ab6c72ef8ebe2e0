"""Who may call the HTTP service, and how often: API keys, per-key rate limits, a new-user cap.

Keys
----
``APEX_RANK_API_KEY`` (one key), ``APEX_RANK_API_KEY_FILE`` and ``AccessConfig.api_key_file``
(one key per line; blank lines and ``#`` comments skipped, so a file can hold an old and a new
key while clients move over) together make the key ring. With at least one key, ``/events``
and ``/songs`` (and ``/recommend`` with ``protect_recommend``) need
``Authorization: Bearer <key>``; anything else is 401 with ``WWW-Authenticate: Bearer``. Keys
are compared as SHA-256 digests with :func:`hmac.compare_digest` against every key of the ring
(no early exit, no length leak). A key is 16-256 visible ASCII characters; the ring keeps only
digests, and logs name a key by the first 8 hex digits of its digest (:attr:`Admission.identity`).

Quotas
------
Each identity (a key, or ``anonymous`` on a service without keys) has a token bucket of
``rate_per_s`` requests/s refilling up to ``burst`` over the routes that need a key, and one of
``new_users_per_min`` users created by ``/events``. Both answer 429 with ``Retry-After``
(whole seconds until the request would pass). The new-user cap is checked before a request and
charged after it with the users the request actually created (``created`` in the answer of
``/events``): a request is recorded whole or not at all, so one request may overshoot the cap
by its own new users, after which that identity waits until the debt is repaid.

The buckets live in the worker process (no Redis round trip per request): with ``N`` workers a
client that spreads over them gets up to ``N`` times the numbers, and a restart refills them.
The middleware runs on the event loop's thread only, so the buckets need no lock.

Example
-------
>>> ring = KeyRing.from_keys(["k" * 32])
>>> policy = AccessPolicy(AccessConfig(rate_per_s=1.0, burst=1), ring)
>>> policy.admit("/events", b"Bearer " + b"k" * 32, now=0.0).identity == ring.identities[0]
True
>>> policy.admit("/events", b"Bearer " + b"k" * 32, now=0.0).status
429
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apex_rank.errors import ConfigError

log = logging.getLogger(__name__)

#: Routes that always need a key once a key is set (and count against the quotas).
WRITE_ROUTES = frozenset({"/events", "/songs"})
#: The route ``protect_recommend`` closes.
READ_ROUTE = "/recommend"
#: The route whose answers create users (``created`` per event).
EVENTS_ROUTE = "/events"


def access_route(path: str) -> str:
    """The route a request path is guarded as: ``/songs/{song_id}/audio`` is a ``/songs`` write."""
    return "/songs" if path.startswith("/songs/") else path

KEY_PATTERN = re.compile(r"[\x21-\x7e]{16,256}")
KEY_RULE = "16-256 visible ASCII characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
ENV_KEY = "APEX_RANK_API_KEY"
ENV_KEY_FILE = "APEX_RANK_API_KEY_FILE"
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class AccessConfig:
    """Access settings of the HTTP service (TOML ``[online.access]``).

    Attributes
    ----------
    api_key_file:
        File of API keys, one per line (added to ``APEX_RANK_API_KEY`` and
        ``APEX_RANK_API_KEY_FILE``); the keys themselves never go into a config.
    protect_recommend:
        ``/recommend`` needs a key too (it is open by default: it reads, it never writes).
        Needs a key to be set.
    rate_per_s, burst:
        Token bucket per key and worker over the routes that need a key: sustained requests/s
        and the most requests at once. ``rate_per_s = 0`` turns it off.
    new_users_per_min:
        Users that ``/events`` may create per key and worker per minute (the bucket holds one
        minute's worth). 0 turns it off.
    docs:
        Serve ``/docs``, ``/redoc`` and ``/openapi.json`` (off: they describe every endpoint
        to whoever reaches the port).
    header_timeout_s:
        A connection that has not sent a complete request head this long after it opened, or
        after its previous response, is closed (uvicorn has no such timeout: a client
        trickling header bytes kept a connection open indefinitely).
    keep_alive_s:
        uvicorn's ``timeout_keep_alive``: an idle keep-alive connection is closed after it.
    max_header_bytes:
        uvicorn's ``h11_max_incomplete_event_size``: a request head larger than this is 400.
    """

    api_key_file: str | None = None
    protect_recommend: bool = False
    rate_per_s: float = 50.0
    burst: int = 100
    new_users_per_min: int = 1000
    docs: bool = False
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s >= 0):
            raise ConfigError(f"online.access.rate_per_s must be a number >= 0 (0: off), got {self.rate_per_s}")
        if not (math.isfinite(self.header_timeout_s) and self.header_timeout_s > 0):
            raise ConfigError(f"online.access.header_timeout_s must be > 0, got {self.header_timeout_s}")
        for name in ("burst", "keep_alive_s", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"online.access.{name} must be >= 1, got {getattr(self, name)}")
        if self.new_users_per_min < 0:
            raise ConfigError(f"online.access.new_users_per_min must be >= 0 (0: off), "
                              f"got {self.new_users_per_min}")


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


@dataclass(frozen=True)
class KeyRing:
    """The accepted API keys, as SHA-256 digests (see the module doc). Empty: no key needed."""

    digests: tuple[bytes, ...] = ()

    @classmethod
    def from_keys(cls, keys: Iterable[str], *, where: str = "API key") -> KeyRing:
        """Check each key against :data:`KEY_PATTERN` (the message names ``where``, never the
        key) and keep its digest."""
        out: list[bytes] = []
        for i, key in enumerate(keys):
            if not KEY_PATTERN.fullmatch(key):
                raise ConfigError(f"{where} #{i + 1} is {len(key)} characters or holds spaces or "
                                  f"non-ASCII characters; a key is {KEY_RULE}")
            d = _digest(key.encode("ascii"))
            if d not in out:
                out.append(d)
        return cls(tuple(out))

    def __bool__(self) -> bool:
        return bool(self.digests)

    @property
    def identities(self) -> list[str]:
        """The names logs and buckets use for the keys (8 hex digits of the digest)."""
        return [d.hex()[:8] for d in self.digests]

    def match(self, presented: bytes) -> str | None:
        """The identity of the key ``presented``, or ``None``; constant time in the key."""
        d = _digest(presented)
        found: str | None = None
        for mine in self.digests:  # every key is compared: the time does not say which matched
            if hmac.compare_digest(d, mine):
                found = mine.hex()[:8]
        return found


def read_key_file(path: str | os.PathLike[str]) -> list[str]:
    """The keys of a key file (one per line, ``#`` comments and blank lines skipped).

    Raises
    ------
    ConfigError
        The file is missing, unreadable or holds no key.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii")
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"API key file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"API key file {p} cannot be read: {type(err).__name__}: {err}") from err
    keys = [s.strip() for s in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ConfigError(f"API key file {p} holds no key (one key per line)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("API key file %s is readable by other users (mode %o); chmod 600 it",
                    p, stat.S_IMODE(mode))
    return keys


def load_key_ring(config: AccessConfig, environ: Mapping[str, str] | None = None) -> KeyRing:
    """The key ring from ``$APEX_RANK_API_KEY``, ``$APEX_RANK_API_KEY_FILE`` and
    ``config.api_key_file`` (all that are set, together)."""
    env = os.environ if environ is None else environ
    ring: list[bytes] = []
    sources: list[tuple[str, list[str]]] = []
    if env.get(ENV_KEY):
        sources.append((f"${ENV_KEY}", [env[ENV_KEY].strip()]))
    for path in (env.get(ENV_KEY_FILE), config.api_key_file):
        if path:
            sources.append((f"API key file {path}: key", read_key_file(path)))
    for where, keys in sources:
        for d in KeyRing.from_keys(keys, where=where).digests:
            if d not in ring:
                ring.append(d)
    return KeyRing(tuple(ring))


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); a wildcard (0.0.0.0,
    ::) or any other name or address is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, ring: KeyRing, *, insecure: bool = False) -> None:
    """Refuse to serve beyond this machine without a key (``insecure`` allows it)."""
    if ring or insecure or is_loopback(host):
        return
    raise ConfigError(f"--host {host} is not a loopback address and no API key is set "
                      f"(${ENV_KEY}, ${ENV_KEY_FILE} or --api-key-file); anyone reaching the port "
                      f"could write events and songs. Set a key, or pass --insecure")


class TokenBucket:
    """``rate`` tokens/s up to ``capacity``; :meth:`take` may leave it in debt (negative).

    Example
    -------
    >>> b = TokenBucket(rate=1.0, capacity=2, now=0.0)
    >>> b.wait(1, now=0.0), b.take(2, now=0.0), b.wait(1, now=0.0)
    (0.0, None, 1.0)
    """

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, *, now: float) -> None:
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def wait(self, n: float, *, now: float) -> float:
        """Seconds until ``n`` tokens are there (0: now)."""
        self._refill(now)
        missing = min(n, self.capacity) - self.tokens
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, n: float, *, now: float) -> None:
        """Remove ``n`` tokens, going into debt if there are fewer."""
        self._refill(now)
        self.tokens -= n


@dataclass(frozen=True)
class Admission:
    """The answer of :meth:`AccessPolicy.admit`: ``status`` 0 (go on), 401 or 429, with the
    identity the request counts against, the refusal's detail and headers."""

    status: int
    identity: str | None = None
    detail: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()


_GO = Admission(0)


class AccessPolicy:
    """Decides per request (see the module doc); pure apart from the clock.

    Parameters
    ----------
    config:
        :class:`AccessConfig`.
    ring:
        The accepted keys (:func:`load_key_ring`); empty: no key needed.
    clock:
        Seconds, monotonic (tests pass their own).
    """

    def __init__(self, config: AccessConfig, ring: KeyRing, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if config.protect_recommend and not ring:
            raise ConfigError(f"online.access.protect_recommend needs an API key (${ENV_KEY}, "
                              f"${ENV_KEY_FILE} or online.access.api_key_file)")
        self.config = config
        self.ring = ring
        self.clock = clock
        self.guarded = WRITE_ROUTES | ({READ_ROUTE} if config.protect_recommend else set())
        self._rate: dict[str, TokenBucket] = {}
        self._new_users: dict[str, TokenBucket] = {}

    def _bucket(self, table: dict[str, TokenBucket], identity: str, rate: float, capacity: float,
                now: float) -> TokenBucket:
        b = table.get(identity)
        if b is None:  # one per key of the ring (+ anonymous): the table stays this small
            b = table[identity] = TokenBucket(rate, capacity, now=now)
        return b

    def admit(self, path: str, authorization: bytes | None, *, now: float | None = None) -> Admission:
        """Whether a request to ``path`` with that ``Authorization`` header value may go on;
        takes one token of its identity's rate bucket when it may."""
        path = access_route(path)
        if path not in self.guarded:
            return _GO
        t = self.clock() if now is None else now
        if self.ring:
            scheme, _, token = (authorization or b"").strip().partition(b" ")
            identity = (self.ring.match(token.strip()) if scheme.lower() == b"bearer" and token
                        else None)
            if identity is None:
                challenge = (b'Bearer realm="apex-rank"' if authorization is None
                             else b'Bearer realm="apex-rank", error="invalid_token"')
                return Admission(401, None, "missing or invalid API key (Authorization: Bearer <key>)",
                                 ((b"www-authenticate", challenge),))
        else:
            identity = ANONYMOUS
        cfg = self.config
        if cfg.rate_per_s > 0:
            rate = self._bucket(self._rate, identity, cfg.rate_per_s, cfg.burst, t)
            wait = rate.wait(1, now=t)
            if wait > 0:
                return self._too_many(identity, wait, f"rate limit of {cfg.rate_per_s:g} requests/s "
                                      f"(burst {cfg.burst}) for this key exceeded")
        if path == EVENTS_ROUTE and cfg.new_users_per_min > 0:
            users = self._bucket(self._new_users, identity, cfg.new_users_per_min / 60.0,
                                 cfg.new_users_per_min, t)
            wait = users.wait(1, now=t)
            if wait > 0:
                return self._too_many(identity, wait, f"cap of {cfg.new_users_per_min} new users "
                                      f"per minute for this key reached")
        if cfg.rate_per_s > 0:
            self._rate[identity].take(1, now=t)
        return Admission(0, identity)

    def charge_new_users(self, identity: str, n: int, *, now: float | None = None) -> None:
        """Count ``n`` users created by a request of ``identity`` against its cap."""
        cfg = self.config
        if n > 0 and cfg.new_users_per_min > 0:
            t = self.clock() if now is None else now
            self._bucket(self._new_users, identity, cfg.new_users_per_min / 60.0,
                         cfg.new_users_per_min, t).take(n, now=t)

    @staticmethod
    def _too_many(identity: str, wait_s: float, detail: str) -> Admission:
        retry = max(1, math.ceil(wait_s))
        log.info("429 for key %s: %s (retry after %d s)", identity, detail, retry)
        return Admission(429, identity, detail, ((b"retry-after", str(retry).encode()),))


def created_users(body: bytes) -> int:
    """How many users an answer of ``/events`` says it created (``created: true`` per event);
    0 for anything else."""
    try:
        doc = json.loads(body)
    except ValueError:
        return 0
    events = doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(events, list):
        return 0
    return sum(1 for e in events if isinstance(e, dict) and e.get("created") is True)


class AccessGuard:
    """Pure ASGI middleware applying an :class:`AccessPolicy`: 401/429 before the app runs,
    and, for ``/events`` answered 200, the created users charged to the caller's cap."""

    def __init__(self, app: Any, *, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or access_route(scope["path"]) not in self.policy.guarded:
            await self.app(scope, receive, send)
            return
        auth = None
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                auth = value
                break
        adm = self.policy.admit(scope["path"], auth)
        if adm.status:
            body = json.dumps({"detail": adm.detail}).encode()
            await send({"type": "http.response.start", "status": adm.status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), *adm.headers]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["path"] != EVENTS_ROUTE or self.policy.config.new_users_per_min == 0:
            await self.app(scope, receive, send)
            return
        status = [0]
        chunks: list[bytes] = []

        async def send_and_count(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            elif message["type"] == "http.response.body" and status[0] == 200:
                chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            if status[0] == 200 and adm.identity is not None:
                self.policy.charge_new_users(adm.identity, created_users(b"".join(chunks)))
