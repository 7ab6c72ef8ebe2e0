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


async def _serve_and_probe(steps: list[bytes], gap_s: float, wait_s: float) -> tuple[bytes, float]:
    """Serve a tiny app with the service's protocol; send ``steps`` ``gap_s`` apart, then read
    until the server closes or ``wait_s`` passes. Returns what was read and when it ended."""
    import time

    async def app(scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    config = Config(app, http=HTTP_PROTOCOL, log_level="warning")
    config.load()
    state = ServerState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: NoDelayHTTPProtocol(config=config, server_state=state, app_state={}),
        host="127.0.0.1", port=0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        for step in steps:
            try:
                writer.write(step)
                await writer.drain()
            except ConnectionError:
                break  # the server has closed the connection already
            await asyncio.sleep(gap_s)
        got = b""
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(4096), wait_s)
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            got += b"<still open>"
        except ConnectionError:
            pass  # closed while we were still writing (the reset reaches the reader)
        writer.close()
        return got, time.monotonic() - t0
    finally:
        server.close()
        await server.wait_closed()


def test_a_trickled_request_head_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client sending its head a few bytes at a time (each gap shorter than any idle timeout)
    is closed after the header timeout; uvicorn alone would hold it open as long as it trickles."""
    monkeypatch.setenv("APEX_RANK_HEADER_TIMEOUT_S", "0.5")
    head = [b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n", b"X-C: 3\r\n",
            b"X-D: 4\r\n", b"X-E: 5\r\n", b"X-F: 6\r\n"]
    got, took = asyncio.run(_serve_and_probe(head, gap_s=0.15, wait_s=3.0))
    assert got == b"" and took < 2.0, (got, took)
    got, _ = asyncio.run(_serve_and_probe([b"GET / HTTP/1.1\r\n"], gap_s=0.0, wait_s=3.0))
    assert got == b""  # an incomplete head that then stops: closed too


def test_a_prompt_request_is_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APEX_RANK_HEADER_TIMEOUT_S", "0.5")
    got, _ = asyncio.run(_serve_and_probe([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], gap_s=0.0,
                                          wait_s=0.3))
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok<still open>")  # kept alive
