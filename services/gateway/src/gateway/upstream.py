"""The proxy's HTTP/1.1 client to the backends: keep-alive connections on asyncio Protocols, the
response parsed by httptools (llhttp, the parser uvicorn already uses for the gateway's own
requests), its body streamed through with flow control.

Why not aiohttp's ClientSession (used before): per proxied read its request and response
machinery (ClientRequest and ClientResponse objects, multidict headers, a StreamReader)
was about a quarter of the gateway's CPU (py-spy, 2026-12-02); this client does only what the
proxy needs: one request line and the allow-listed headers as bytes, the response head as a list
of byte pairs, the body as it comes (measured side by side: README, "The gateway's proxy hop").

What it keeps of HTTP/1.1 (RFC 9112): persistent connections (§9.3) reused while the response said
keep-alive, closed when it did not, when it ended early, or after POOL_KEEPALIVE_SECONDS idle
(below uvicorn's 5 s `--timeout-keep-alive` on the backends, so the pool closes an idle connection
before the backend does, and a request on a connection the backend closed meanwhile is the
caller's to retry: RFC 2616 §8.1.4, "clients, servers, and proxies MUST be able to recover from
asynchronous close events"); message framing by Content-Length or chunked coding (§6, llhttp); a
bound on each response header field (UPSTREAM_MAX_HEADER_BYTES). Request bodies go whole, with
Content-Length. The retry policy (which requests may be sent again, on what connection) is the
caller's (proxy.forward).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import cast

import httptools

POOL_KEEPALIVE_SECONDS = 4.0
UPSTREAM_MAX_HEADER_BYTES = 64 * 1024
MAX_IDLE_PER_BACKEND = 100
# A body arriving faster than the client reads it: the backend connection stops being read above
# HIGH bytes held and resumes below LOW, so a slow client slows the backend instead of filling the
# gateway's memory.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class UpstreamError(Exception):
    """The backend could not be reached, or its answer was not valid HTTP/1.1."""


class NotSent(UpstreamError):
    """No connection could be made: nothing was sent."""


class Dropped(UpstreamError):
    """The connection closed or failed before any of the response arrived (the backend may or
    may not have received the request)."""


class Connection(asyncio.Protocol):
    """One connection to a backend, carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self._paused = False
        self._got_bytes = False
        self.complete = False
        self.keep_alive = False
        self._error: UpstreamError | None = None

    # -- protocol callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(Dropped("the backend closed the connection") if not self._got_bytes
                       else UpstreamError("the backend closed the connection mid-response"))

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the backend asked to upgrade the connection"))
        except (httptools.HttpParserError, UpstreamError) as exc:
            self._fail(exc if isinstance(exc, UpstreamError) else UpstreamError(str(exc)))

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > UPSTREAM_MAX_HEADER_BYTES:
            raise UpstreamError("a backend response header field is too large")
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._held += len(body)
        if self._held > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # -- the caller's side ---------------------------------------------------------------------
    def send_request(self, head: bytes, body: bytes | None) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._head = loop.create_future()
        self.headers, self._held, self._got_bytes = [], 0, False
        self.complete = self.keep_alive = False
        self._error = None
        self.transport.write(head + body if body else head)

    async def response_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        assert self._head is not None
        await self._head
        return self.parser.get_status_code(), self.headers

    async def next_chunk(self, read_timeout: float) -> bytes | None:
        """The next piece of the body, None once it is complete."""
        while not self._chunks:
            if self.complete:
                return None
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(read_timeout):
                    await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._held -= len(chunk)
        if self._paused and self._held < _LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: a failure nobody awaits is not logged as lost
        self._wake()
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Idle keep-alive connections per backend (host, port)."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._open: set[Connection] = set()

    async def connection(self, host: str, port: int, *, fresh: bool = False) -> Connection:
        """A connection to (host, port): an idle one unless `fresh`."""
        if not fresh:
            idle = self._idle.get((host, port))
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < POOL_KEEPALIVE_SECONDS:
                    return conn
                conn.close()
                self._open.discard(conn)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(Connection, host, port)
        except (OSError, TimeoutError) as exc:
            raise NotSent(f"no connection to the backend ({type(exc).__name__})") from None
        self._open.add(conn)
        return conn

    def release(self, host: str, port: int, conn: Connection) -> None:
        """A connection whose response is over: kept for the next request if it may be."""
        idle = self._idle.setdefault((host, port), [])
        if conn.complete and conn.keep_alive and not conn.closed and len(idle) < MAX_IDLE_PER_BACKEND:
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()
            self._open.discard(conn)

    def close(self) -> None:
        for conn in self._open:
            conn.close()
        self._open.clear()
        self._idle.clear()


__all__ = ["MAX_IDLE_PER_BACKEND", "POOL_KEEPALIVE_SECONDS", "UPSTREAM_MAX_HEADER_BYTES", "Connection",
           "Dropped", "NotSent", "Pool", "UpstreamError"]
