"""The limits every Mindchart service's HTTP server enforces, so no client can hold memory or a
connection without bound: the request head (request-target length, header bytes and count, and a
deadline for the whole head) in the uvicorn protocol, and a deadline for the request body in ASGI.

uvicorn has no header limits on its httptools protocol (what `--http auto` picks when httptools is
installed): llhttp leaves header sizes to the embedder and httptools buffers a header field until it
ends, so one 64 MiB header costs 64 MiB (8 connections took the gateway from 99 to 703 MiB).
h11's `max_incomplete_event_size` (`--h11-max-incomplete-event-size`) bounds the head but answers a
plain 400 and swaps in a pure-Python parser; `--limit-concurrency` bounds connections, not their size;
`--timeout-keep-alive` bounds idle time between requests, not a head that trickles in. So every
service is started with this protocol class:

    uvicorn --http mindchart_core.http_limits:LimitedHttpToolsProtocol --factory <service>.app:create_app

Refusals (each closes the connection, RFC 9110 §15.5.9 "A server SHOULD send the 'close'
connection option"):
- 414 URI Too Long (RFC 9110 §15.5.15) for a request-target over `MINDCHART_HTTP_MAX_URL_BYTES`;
- 431 Request Header Fields Too Large (RFC 6585 §5: "either an individual header field, or all the
  header fields collectively, are too large") for header fields over `MINDCHART_HTTP_MAX_HEADER_BYTES`
  in total or more than `MINDCHART_HTTP_MAX_HEADERS` of them;
- 408 Request Timeout (RFC 9110 §15.5.9: "the server did not receive a complete request message
  within the time that it was prepared to wait") when the head has not arrived within
  `MINDCHART_HTTP_HEADER_TIMEOUT_SECONDS` of the connection opening or of its first byte, or the body
  within `MINDCHART_HTTP_BODY_TIMEOUT_SECONDS` of the head (BodyDeadlineMiddleware: the application
  answers, so the gateway audits it). A body still trickling in after the application answered
  without reading it (a 401, say) has its connection closed a second after that deadline.
The bodies are OperationOutcomes (RFC 6749 JSON on /oauth). A head refused here never became a
request, so no application sees it: a warning with the client's address is logged, and the
refusal (with uvicorn's own 400 for a request that does not parse) is handed to the listener the
application's lifespan put in its state under `REFUSALS_STATE_KEY` (the gateway audits them,
gateway/refusals.py). The listener gets a `Refusal`: status, reason and peer address, never a
header value (one may hold a token). A connection closed 408 without having sent a byte (a
browser's speculative preconnect, say) carried no request, and is not handed on.

The write side is bounded too: a client that stops reading its response would otherwise hold its
connection, the response's buffer and, at the gateway, the upstream connection behind it, for
ever (uvicorn waits on flow control without a deadline; asyncio's `close()` waits for the buffer
to drain). Like nginx's `send_timeout` (default 60 s, "set only between two successive write
operations, not for the transmission of the whole response"), what is bounded is a *stall*, not
the transfer: while response bytes wait in the server's buffer (the transport paused by flow
control, or a finished response not yet drained), at least one must leave it every
`MINDCHART_HTTP_SEND_TIMEOUT_SECONDS`. A download of hundreds of MB at any rate a real client
reads still completes; a client that reads nothing for that long has its connection aborted (the
buffer freed at once) and the request's task cancelled, so the gateway's proxy releases its
upstream connection and a backend stops producing.

The protocol also tells the application when the server starts draining (`draining()`): uvicorn's
graceful shutdown stops accepting, then waits for every request in progress to finish before the
lifespan's shutdown runs, so a request the application holds on purpose (the gateway's revocation
feed is a long poll) must learn of it from the connection, and answers at once.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable
from uvicorn._types import Scope as UvicornScope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from mindchart_core import errors, metrics


class HttpLimits(BaseSettings):
    """One set of limits for every service (`MINDCHART_HTTP_*`), read when the first connection
    arrives: the same values must hold at the gateway and behind it."""

    model_config = SettingsConfigDict(env_prefix="MINDCHART_HTTP_", extra="ignore")

    max_url_bytes: int = 16 * 1024
    max_header_bytes: int = 32 * 1024  # names + values; a SMART token plus a consent token is ~3 KiB
    max_headers: int = 100
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    # nginx's send_timeout default. A stall, not a transfer: see the module docstring.
    send_timeout_seconds: float = 60.0


@functools.cache
def limits() -> HttpLimits:
    return HttpLimits()


_draining: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}


def draining() -> asyncio.Event:
    """Set once this process's server has begun a graceful shutdown (one event per event loop)."""
    loop = asyncio.get_running_loop()
    event = _draining.get(loop)
    if event is None:
        for closed in [other for other in _draining if other.is_closed()]:
            del _draining[closed]
        event = _draining[loop] = asyncio.Event()
    return event


# The lifespan-state key (ASGI lifespan `state`, handed by uvicorn to every connection) under which
# an application puts its `RefusalListener`.
REFUSALS_STATE_KEY = "mindchart.http_refusals"


@dataclass(frozen=True)
class Refusal:
    """A request the HTTP layer answered itself, before any application saw it."""

    status: int  # 400 (malformed), 408 (head too slow), 414, 431
    reason: str  # what was wrong, in words; never a header value
    peer: str  # the TCP peer's address (no forwarded-for header was parsed)


RefusalListener = Callable[[Refusal], None]


class _Refused(Exception):
    """Raised from a parser callback: httptools stops parsing and data_received answers."""

    def __init__(self, status: int, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics


_CODES = {408: "timeout", 414: "too-long", 431: "too-long"}
_CUT_OFF_REASONS = {400: "malformed", 408: "head-timeout", 414: "target-too-long",
                    431: "header-too-large"}


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head limits above. The bytes of an unfinished head
    are counted as they arrive, so memory stays within the limits plus one read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits()
        # The longest head on the wire that can still be within the limits: the request line,
        # the fields, and a few bytes of framing (": ", CRLF, whitespace) per field.
        self._max_head = self.limits.max_url_bytes + self.limits.max_header_bytes + 64 * (
            self.limits.max_headers + 1)
        self._awaiting_head = True  # the next bytes belong to a request head
        self._head_bytes = 0
        self._heads_completed = 0
        self._header_bytes = 0
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refusal: _Refused | None = None
        self._head_begun = False  # a byte of a request head has arrived and the head is unfinished
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_mark = 0  # bytes waiting at the last look
        self._send_progress = False  # flow control resumed since the last look
        self._asgi_tasks: dict[RequestResponseCycle, asyncio.Task[None]] = {}
        self._cut_off = False

    # -- connection events ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that never sends anything is a slow head too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head and self._head_timer is None:
            self._arm_head_timer()
        # Counted only when every byte of the chunk belongs to one unfinished head: it began in
        # a head, no head ended in it, and a head is still unfinished after it.
        in_head, heads_before = self._awaiting_head, self._heads_completed
        super().data_received(data)  # a _Refused from a callback arrives in send_400_response
        if self.transport.is_closing() or not (
                in_head and self._awaiting_head and self._heads_completed == heads_before):
            return
        self._head_bytes += len(data)
        if self._head_bytes > self._max_head:
            self._refuse(_Refused(431, "The request header section is too large"))

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown, connection by connection: held requests answer now."""
        draining().set()
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        refusal, self._refusal = self._refusal, None
        if refusal is None:  # httptools could not parse the request: uvicorn's own 400
            self._tell(Refusal(400, "The request is not valid HTTP/1.1", self._peer()))
            super().send_400_response(msg)
        else:
            self._refuse(refusal)

    # -- parser callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:  # the first byte of a request
        super().on_message_begin()
        self._header_bytes = self._header_count = 0
        self._head_begun = True

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            self._raise(414, f"The request target exceeds {self.limits.max_url_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_count > self.limits.max_headers:
            self._raise(431, f"More than {self.limits.max_headers} request header fields")
        if self._header_bytes > self.limits.max_header_bytes:
            self._raise(431, f"The request header fields exceed {self.limits.max_header_bytes} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_begun = False
        self._heads_completed += 1
        self._cancel_head_timer()
        self._body_timer = self.loop.call_later(self.limits.body_timeout_seconds + 1, self._body_late)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        super().on_message_complete()
        self._awaiting_head = True
        self._head_bytes = 0

    # -- the write side: stalled readers ------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_send()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_progress = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_send()  # a finished response may still wait in the buffer, closing or not

    def _watch_send(self) -> None:
        if self._send_timer is None and self.transport.get_write_buffer_size():
            self._send_mark = self.transport.get_write_buffer_size()
            self._send_progress = False
            self._send_timer = self.loop.call_later(self.limits.send_timeout_seconds, self._send_look)

    def _send_look(self) -> None:
        """Every send timeout while response bytes wait: did any leave the buffer since the last
        look? While the application is still writing (not paused) the buffer also grows, so only
        a paused transport or a finished response can be judged stalled."""
        self._send_timer = None
        waiting = self.transport.get_write_buffer_size()
        if not waiting:
            return
        progressed = self._send_progress or waiting < self._send_mark
        writing = (self.cycle is not None and not self.cycle.response_complete
                   and not self.flow.write_paused)
        if progressed or writing:
            self._watch_send()
            return
        self._cut_off_stalled_reader(waiting)

    def _cut_off_stalled_reader(self, waiting: int) -> None:
        request_id = ""
        if self.cycle is not None:
            request_id = str(self.cycle.scope.get("state", {}).get("request_id", ""))
        self.logger.warning(
            "HTTP connection aborted: the client read nothing of its response for %g s "
            "(%d bytes waiting) from %s, request %s", self.limits.send_timeout_seconds, waiting,
            self._peer(), request_id or "-")
        # Cancel first: the abort's connection_lost runs on the next loop turn and would let a
        # task waiting on flow control write on, into nothing (uvicorn's send drops writes to a
        # closed connection silently).
        metrics.HTTP_CUT_OFF.labels("stalled-reader").inc()
        self._cut_off = True
        for cycle, task in self._asgi_tasks.items():
            cycle.disconnected = True  # as connection_lost will say: no "returned without completing"
            task.cancel()
        self.transport.abort()  # frees the buffer now; close() would wait for it to drain

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        """uvicorn's, with the task remembered so a stalled reader's request can be cancelled."""

        async def cancellable(scope: UvicornScope, receive: ASGIReceiveCallable,
                              send: ASGISendCallable) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._asgi_tasks[cycle] = task
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                # Cut off here: the connection is gone, nothing is left to answer. Any other
                # cancellation (shutdown) goes on.
                if not self._cut_off or task.uncancel() > 0:
                    raise
            finally:
                self._asgi_tasks.pop(cycle, None)

        super()._start_asgi_task(cycle, cancellable)

    # -- refusals ------------------------------------------------------------------------------
    def _raise(self, status: int, diagnostics: str) -> None:
        self._refusal = _Refused(status, diagnostics)
        raise self._refusal

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_seconds, self._head_late)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head waits while the request before it runs
            return
        self._refuse(_Refused(408, f"The request head did not arrive within "
                                   f"{self.limits.header_timeout_seconds:g} s"))

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_late(self) -> None:
        """The body is still arriving a second after BodyDeadlineMiddleware's deadline. If the
        application answered without reading it (a 401, say), nothing more will come of it: the
        connection closes. Otherwise the application still holds the request and answers itself."""
        self._body_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_complete:
            self.logger.warning("HTTP connection closed: a request body still arriving after %g s",
                                self.limits.body_timeout_seconds)
            self.transport.close()
        else:
            self._body_timer = self.loop.call_later(self.limits.body_timeout_seconds, self._body_late)

    def _peer(self) -> str:
        return str(self.client[0]) if self.client else "unknown"

    def _tell(self, refusal: Refusal) -> None:
        """Count a refusal, and hand it to the application's listener if it registered one. A
        failing listener costs its own record, never the refusal."""
        metrics.HTTP_CUT_OFF.labels(_CUT_OFF_REASONS.get(refusal.status, str(refusal.status))).inc()
        listener = self.app_state.get(REFUSALS_STATE_KEY)
        if listener is None:
            return
        try:
            listener(refusal)
        except Exception:
            self.logger.exception("The HTTP refusal listener failed")

    def _refuse(self, refusal: _Refused) -> None:
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        self.logger.warning("HTTP request refused (%d): %s from %s", refusal.status,
                            refusal.diagnostics, client)
        if self._head_begun:  # a connection that never sent a byte (a browser's preconnect) is
            self._tell(Refusal(refusal.status, refusal.diagnostics, self._peer()))  # no request
        if getattr(self, "url", b"").startswith(b"/oauth"):  # set once a request line begins
            body = orjson.dumps({"error": "invalid_request", "error_description": refusal.diagnostics})
            media = b"application/json"
        else:
            body = orjson.dumps(errors.operation_outcome(_CODES[refusal.status], refusal.diagnostics))
            media = b"application/fhir+json"
        content = [STATUS_LINE[refusal.status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([b"content-type: ", media, b"\r\ncontent-length: ", str(len(body)).encode(),
                        b"\r\nconnection: close\r\n\r\n", body])
        self.transport.write(b"".join(content))
        self.transport.close()


def has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def deadline_receive(receive: Receive, seconds: float,
                     on_body: Callable[[int], None] | None = None) -> Receive:
    """`receive` with the body deadline: the whole body must arrive within `seconds` of now, or the
    read raises RequestTimeout (408, `Connection: close`). `on_body` hears the size of each body
    chunk as it arrives (the gateway's body limit counts with it, and may raise). Reads after the
    body (waiting for a disconnect) are unbounded, as streaming responses need. The one wrapper
    BodyDeadlineMiddleware and the gateway's FHIR front (gateway/front.py) both use."""
    deadline = asyncio.get_running_loop().time() + seconds
    complete = False

    async def bounded_receive() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise errors.RequestTimeout(f"The request body did not arrive within {seconds:g} s",
                                        headers={"Connection": "close"}) from None
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        if on_body is not None and message["type"] == "http.request":
            on_body(len(message.get("body", b"")))
        return message

    return bounded_receive


class BodyDeadlineMiddleware:
    """A request body must arrive in full within `seconds` of the head, or the request is answered
    408 with `Connection: close` by the application's own error handler (so it is logged and, at
    the gateway, audited like any refusal); `deadline_receive` does the bounding."""

    def __init__(self, app: ASGIApp, *, seconds: float | None = None) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        seconds = self.seconds if self.seconds is not None else limits().body_timeout_seconds
        await self.app(scope, deadline_receive(receive, seconds), send)


__all__ = ["REFUSALS_STATE_KEY", "BodyDeadlineMiddleware", "HttpLimits", "LimitedHttpToolsProtocol",
           "Refusal", "RefusalListener", "deadline_receive", "draining", "has_body", "limits"]
