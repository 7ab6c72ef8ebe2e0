"""The service's uvicorn protocol turns Nagle off even on a listener bound without IPPROTO_TCP
(what ``uvicorn --workers N`` hands its workers; uvicorn issue #3149)."""

from __future__ import annotations

import asyncio
import socket

import pytest

pytest.importorskip("uvicorn")

from uvicorn.config import Config  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from apex_rank.ranking.online.service import HTTP_PROTOCOL, NoDelayHTTPProtocol  # noqa: E402


async def _accepted_nodelay(protocol_class: type) -> int:
    """Serve one connection on a proto-0 listener with ``protocol_class``; TCP_NODELAY of the
    accepted socket as the protocol saw it."""
    seen: list[int] = []

    class Probe(protocol_class):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def app(scope: dict, receive: object, send: object) -> None:  # never called
        raise AssertionError

    config = Config(app, http=HTTP_PROTOCOL, log_level="warning")
    config.load()
    state = ServerState()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # proto 0, as uvicorn binds it
    listener.bind(("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Probe(config=config, server_state=state, app_state={}), sock=listener)
    try:
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert seen, "the server never accepted the connection"
    return seen[0]


def test_protocol_is_the_configured_one() -> None:
    config = Config(lambda: None, http=HTTP_PROTOCOL)
    config.load()
    assert config.http_protocol_class is NoDelayHTTPProtocol


def test_accepted_connection_has_nodelay_on_a_proto0_listener() -> None:
    assert asyncio.run(_accepted_nodelay(NoDelayHTTPProtocol)) == 1


def test_plain_uvicorn_protocol_would_leave_nagle_on() -> None:
    """The control: without the override the same listener leaves Nagle on (should asyncio
    start setting TCP_NODELAY on such sockets itself, this fails and the override can go)."""
    base = NoDelayHTTPProtocol.__mro__[1]
    assert asyncio.run(_accepted_nodelay(base)) == 0
