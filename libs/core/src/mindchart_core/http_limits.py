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
request, so no application (and no audit) sees it; a warning with the client's address is logged.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import orjson
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from mindchart_core import errors


class HttpLimits(BaseSettings):
    """One set of limits for every service (`MINDCHART_HTTP_*`), read when the first connection
    arrives: the same values must hold at the gateway and behind it."""

    model_config = SettingsConfigDict(env_prefix="MINDCHART_HTTP_", extra="ignore")

    max_url_bytes: int = 16 * 1024
    max_header_bytes: int = 32 * 1024  # names + values; a SMART token plus a consent token is ~3 KiB
    max_headers: int = 100
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0


@functools.cache
def limits() -> HttpLimits:
    return HttpLimits()


class _Refused(Exception):
    """Raised from a parser callback: httptools stops parsing and data_received answers."""

    def __init__(self, status: int, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics


_CODES = {408: "timeout", 414: "too-long", 431: "too-long"}


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

    # -- connection events ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that never sends anything is a slow head too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
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

    def send_400_response(self, msg: str) -> None:
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(refusal)

    # -- parser callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = self._header_count = 0

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
        self._heads_completed += 1
        self._cancel_head_timer()
        self._body_timer = self.loop.call_later(self.limits.body_timeout_seconds + 1, self._body_late)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        super().on_message_complete()
        self._awaiting_head = True
        self._head_bytes = 0

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

    def _refuse(self, refusal: _Refused) -> None:
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        self.logger.warning("HTTP request refused (%d): %s from %s", refusal.status,
                            refusal.diagnostics, client)
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


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class BodyDeadlineMiddleware:
    """A request body must arrive in full within `seconds` of the head, or the request is answered
    408 with `Connection: close` by the application's own error handler (so it is logged and, at
    the gateway, audited like any refusal). Waiting for a disconnect after the body is unbounded,
    as streaming responses do."""

    def __init__(self, app: ASGIApp, *, seconds: float | None = None) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        seconds = self.seconds if self.seconds is not None else limits().body_timeout_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
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
            return message

        await self.app(scope, bounded_receive, send)


__all__ = ["BodyDeadlineMiddleware", "HttpLimits", "LimitedHttpToolsProtocol", "limits"]
