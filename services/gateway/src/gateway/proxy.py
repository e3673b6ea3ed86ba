"""Routing to the FHIR backends with coarse policy: valid token, our audience, scopes that can
cover the interaction. Backends verify the token again and narrow results themselves.

Only allow-listed request headers travel upstream, so identity headers a client invents
(X-Forwarded-User, X-Client-Id, ...) never reach a backend.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from pymongo.errors import PyMongoError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import ratelimit, store, upstream
from mindchart_core import asgi, errors, fhirjson, tokens

FORWARDED_REQUEST_HEADERS = frozenset({
    "authorization", "consent-token", "accept", "content-type", "content-length", "prefer",
    "if-match", "if-none-match", "if-none-exist", "if-modified-since", "x-request-id",
    "traceparent", "tracestate",  # W3C trace context: one trace across gateway and backend
})
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "x-request-id", "date",
    "server",
})
_UNSAFE_PATH = re.compile(r"(^|/)\.{1,2}(/|$)|%2e|%2f|%5c|\\|//|%00", re.IGNORECASE)
# Public documents: discovery, records' document-signing JWK Set (records/lifecycle), which
# whoever receives a signed note needs to verify it, and records' CDex client keys (records/cdex),
# which payers register to authenticate records' $submit-attachment calls.
_TOKEN_FREE = ("metadata", ".well-known/smart-configuration", ".well-known/jwks.json",
               ".well-known/cdex-client-jwks.json")


@dataclass(frozen=True)
class Interaction:
    resource_type: str | None
    name: str  # R4 restful-interaction code, or "operation"


def classify(method: str, rest: str) -> Interaction:
    """What a request to `[base]/rest` asks for (R4 http.html)."""
    parts = [p for p in rest.split("/") if p]
    if any(p.startswith("$") for p in parts):
        kind = parts[0] if parts and parts[0][:1].isupper() else None
        return Interaction(kind, "operation")
    if not parts:
        return Interaction(None, "search-system" if method == "GET" else "transaction")
    kind = parts[0]
    if parts[0] == "_history":
        return Interaction(None, "history-system")
    if len(parts) == 1:  # PUT/DELETE/PATCH on a type are the conditional forms (R4 http.html)
        names = {"GET": "search-type", "POST": "create", "PUT": "update", "PATCH": "patch",
                 "DELETE": "delete"}
        return Interaction(kind, names.get(method, "unknown"))
    if parts[1] == "_search":
        return Interaction(kind, "search-type")
    if parts[1] == "_history":
        return Interaction(kind, "history-type")
    if len(parts) == 2:
        names = {"GET": "read", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        return Interaction(kind, names.get(method, "unknown"))
    if parts[2] == "_history":
        return Interaction(kind, "vread" if len(parts) > 3 else "history-instance")
    return Interaction(kind, "unknown")


# Operations named literally in route labels: every operation route of records and psychnotes
# (tests/unit/test_gateway_route_names.py checks this list against their routers). Any other
# `$name` is `{operation}`, so a client cannot grow the metrics' label set by inventing names.
KNOWN_OPERATIONS = frozenset({
    "$export", "$everything", "$validate", "$docref", "$consent-token", "$revoke",
    "$revoke-consent-token", "$disclosures", "$match", "$meta", "$meta-add", "$meta-delete",
    "$export-status", "$export-file",
    "$approve", "$candidates", "$refuse",
    "$sign", "$entered-in-error", "$verify-signature",  # the note lifecycle (both backends)
    "$attest",  # psychnotes: an authorization's second-person check
    "$deny", "$extend", "$disagree", "$rebut",  # records: amendment requests (164.526)
    "$status", "$events",  # records: Subscriptions backport
})


def route_name(base: str, rest: str) -> str:
    """A proxied request's route as a template, for logs and metrics: `/fhir/{type}`,
    `/fhir/{type}/{id}`, `/fhir/{type}/{id}/_history/{vid}`, `/fhir/{type}/{id}/$everything`...
    Resource types and ids never appear (unbounded, and an id can be a patient's)."""
    parts = [p for p in rest.split("/") if p]
    named: list[str] = []
    for index, part in enumerate(parts[:4]):
        if part.startswith("$"):
            named.append(part if part in KNOWN_OPERATIONS else "{operation}")
        elif part in ("_history", "_search", "metadata", ".well-known", "smart-configuration"):
            named.append(part)
        elif index == 0:
            named.append("{type}")
        elif index == 1:
            named.append("{id}")
        elif index == 3 and parts[2] == "_history":
            named.append("{vid}")
        else:
            named.append("{part}")
    if len(parts) > 4:
        named.append("...")
    return "/".join([base, *named])


def patient_of(rest: str, query: str) -> str | None:
    """The patient a request is about, when the URL says (for the audit's patient entity)."""
    parts = [p for p in rest.split("/") if p]
    if len(parts) >= 2 and parts[0] == "Patient" and not parts[1].startswith(("$", "_")):
        return f"Patient/{parts[1]}"
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name in ("patient", "subject") and value and "," not in value and "%2C" not in value:
            return value if "/" in value or "%2F" in value else f"Patient/{value}"
    return None


def reject_unsafe_path(raw_path: str) -> None:
    if _UNSAFE_PATH.search(raw_path):
        raise errors.Invalid("Path segments '.', '..', encoded slashes and backslashes are refused")


def needs_token(rest: str) -> bool:
    """Conformance resources are public like /metadata (the OperationDefinitions it cites);
    the backends still verify a token on every other route."""
    path = rest.strip("/")
    return path not in _TOKEN_FREE and not path.startswith("OperationDefinition/")


def check_scopes(token: tokens.AccessToken, interaction: Interaction) -> None:
    """Refuse what the token's scopes can never cover; backends narrow what remains."""
    if interaction.name == "unknown":
        raise errors.MethodNotAllowed("This method is not supported on this URL")
    if interaction.resource_type and interaction.name != "operation":
        if not token.scope.allows(interaction.resource_type, interaction.name):
            raise errors.InsufficientScope(
                f"The granted scopes do not permit {interaction.name} on {interaction.resource_type}"
            )
    elif not token.scope.clinical:
        raise errors.InsufficientScope("The granted scopes do not permit this request")


# -- the proxy endpoint ------------------------------------------------------------------------
# A pure ASGI endpoint, not a FastAPI handler: no Request object, no dependency solving, no
# StreamingResponse task group. Header names arrive lower-cased (ASGI), so filtering is a set
# lookup on bytes. FhirErrors raised here are rendered by the app's one error handler.

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_FORWARDED = frozenset(h.encode() for h in FORWARDED_REQUEST_HEADERS)
# The backend's Content-Length stays: the body is relayed byte for byte (nothing compressed or
# decompressed on the way), and the client then gets it without chunked framing.
_NOT_RELAYED = frozenset(h.encode() for h in HOP_BY_HOP) - {b"content-length"}
_REGISTRATION_TTL = 10.0
_TOKEN_TTL = 10.0


class VerifiedTokens:
    """Access tokens whose signature, issuer and audience were checked in the last `_TOKEN_TTL`
    seconds, keyed by a SHA-256 digest of their exact text (32 bytes a token, not its ~1 KiB),
    at most `size` of them. Expiry is checked again on every use (with the verifier's clock
    skew), so a cached token is refused once it expires; revocation is checked by the caller on
    every request, cached or not; a retired signing key stops verifying within the keyring's
    reload interval plus this TTL."""

    def __init__(self, verifier: tokens.TokenVerifier, *, size: int = 10_000) -> None:
        self.verifier = verifier
        self.size = size
        self._tokens: dict[bytes, tuple[float, tokens.AccessToken]] = {}

    async def verify(self, raw: str) -> tokens.AccessToken:
        now = time.monotonic()
        key = hashlib.sha256(raw.encode("latin-1", "replace")).digest()
        cached = self._tokens.get(key)
        if cached is not None and cached[0] > now:
            token = cached[1]
            if token.expires_at + tokens.CLOCK_SKEW_SECONDS < time.time():
                raise errors.Unauthorized("The access token is invalid, expired or not for this server")
            return token
        token = await self.verifier.verify(raw)
        if len(self._tokens) >= self.size:
            self._tokens = {k: v for k, v in self._tokens.items() if v[0] > now}
            if len(self._tokens) >= self.size:
                self._tokens.clear()
        self._tokens[key] = (now + _TOKEN_TTL, token)
        return token

    def __len__(self) -> int:
        return len(self._tokens)


class Registrations:
    """Client registrations for per-request policy (their rate limit), cached for a few seconds."""

    def __init__(self, db: store.Db) -> None:
        self.db = db
        self._clients: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def get(self, client_id: str) -> dict[str, Any] | None:
        now = time.monotonic()
        cached = self._clients.get(client_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        client = await store.get_client(self.db, client_id)
        if len(self._clients) > 10_000:
            self._clients.clear()
        self._clients[client_id] = (now + _REGISTRATION_TTL, client)
        return client


def _bearer(headers: list[tuple[bytes, bytes]]) -> str:
    """RFC 6750 §2.1: the bearer token of the first Authorization header, or 401."""
    header = next((v for k, v in headers if k == b"authorization"), b"").decode("latin-1")
    return tokens.bearer_value(header)


class ProxyEndpoint:
    """`[base]` and `[base]/{rest}` of one FHIR backend (records or psychnotes)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.base = "/fhir" if backend == "records" else f"/{backend}/fhir"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state
        method: str = scope["method"]
        if method not in METHODS:
            raise errors.MethodNotAllowed("Method Not Allowed", headers={"Allow": ", ".join(METHODS)})
        rest: str = scope.get("path_params", {}).get("rest", "")
        context = scope.setdefault("state", {})
        context[asgi.ROUTE_STATE_KEY] = route_name(self.base, rest)
        reject_unsafe_path(scope.get("raw_path", b"").decode("latin-1"))
        if needs_token(rest):
            token = await state.verified_tokens[self.backend].verify(_bearer(scope["headers"]))
            context["caller"] = {
                "client_id": token.client_id, "subject": token.subject, "fhir_user": token.fhir_user,
                "jti": token.jti, "patient": f"Patient/{token.patient}" if token.patient else None,
                "purpose_of_use": [token.purpose_of_use] if token.purpose_of_use else [],
            }
            if await state.revocations.is_revoked(token.jti, token.session_id):
                raise errors.Unauthorized("The access token has been revoked")
            client = await state.registrations.get(token.client_id) if token.client_id else None
            limit = int((client or {}).get("rate_limit") or state.settings.rate_limit_requests)
            ratelimit.enforce(state.rate_limiter, f"client:{token.client_id or token.subject}",
                              limit, context)
            check_scopes(token, classify(method, rest))
        elif method != "GET":
            raise errors.MethodNotAllowed("Only GET is supported here")
        base_url = state.settings.records_url if self.backend == "records" else state.settings.psychnotes_url
        await forward(scope, receive, send, state.upstream, base_url, str(context.get("request_id", "")))


DatastoreFailure = Callable[[Request, Exception], Awaitable[Response]]


class FhirDispatch:
    """The gateway's innermost middleware: a request for a FHIR base (`/fhir`, `/psychnotes/fhir`
    and below) goes straight to that backend's ProxyEndpoint, past Starlette's router (which
    tries every OAuth route first), its exception middleware and FastAPI's exit stack: together
    13% of the gateway's CPU per proxied read. Every middleware outside this one (request
    context, forwarded-for, audit, body limit, CORS) still wraps it, and its errors are rendered
    as the app's handlers render them: a FhirError as its OperationOutcome, a datastore failure
    by `datastore_failure`; anything else goes on up to the audit middleware's 500. The discovery
    documents under the bases (`ROUTED`) stay FastAPI routes."""

    def __init__(self, app: ASGIApp, *, routed: frozenset[str],
                 datastore_failure: DatastoreFailure) -> None:
        self.app = app
        self.routed = routed
        self.datastore_failure = datastore_failure
        self.endpoints = [(base, ProxyEndpoint(backend)) for base, backend in BASES]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "") if scope["type"] == "http" else ""
        if path and path not in self.routed:
            for base, endpoint in self.endpoints:
                if path == base or (path.startswith(base) and path[len(base)] == "/"):
                    scope["path_params"] = {"rest": path[len(base) + 1:]}
                    await self._serve(endpoint, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, endpoint: ProxyEndpoint, scope: Scope, receive: Receive, send: Send) -> None:
        await serve(endpoint, scope, receive, send, self.datastore_failure)


async def serve(endpoint: ProxyEndpoint, scope: Scope, receive: Receive, send: Send,
                datastore_failure: DatastoreFailure,
                responded: Callable[[], bool] | None = None) -> None:
    """Run `endpoint`; a FhirError or a datastore failure it raises before its response started
    is answered as the app's handlers answer it (the FhirError's OperationOutcome; a datastore
    failure by `datastore_failure`), anything else raised goes on up. `responded` says whether a
    response has started, when the caller tracks it already (front.py's audit); else `send` is
    watched here. The one implementation FhirDispatch and the FHIR front share."""
    if responded is None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        def watched() -> bool:
            return started

        responded, endpoint_send = watched, tracked
    else:
        endpoint_send = send
    try:
        await endpoint(scope, receive, endpoint_send)
    except (errors.FhirError, PyMongoError) as exc:
        if responded():
            raise
        if isinstance(exc, errors.FhirError):
            response = exc.response()
        else:
            response = await datastore_failure(Request(scope), exc)
        await response(scope, receive, send)


# (path prefix, backend) of the proxied FHIR bases; the longer prefix first.
BASES = (("/psychnotes/fhir", "psychnotes"), ("/fhir", "records"))


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


async def _request_body(receive: Receive) -> bytes:
    """The whole request body (BodyLimitMiddleware has already capped it at max_body_bytes)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class Upstream:
    """The proxy's connections to the backends (upstream.py): a keep-alive pool for every request,
    and a fresh connection for the one retry, so a retry never lands on another connection the
    backend has already closed. `timeout_seconds` bounds each connect, the wait for a response
    head (retry included) and each wait for more of a streamed body."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self.pool = upstream.Pool(timeout_seconds)

    async def close(self) -> None:
        self.pool.close()


def retry_is_safe(method: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request the backend may or may not have received can be sent again (RFC 9112
    §9.3.1: a user agent "MUST NOT automatically retry a request with a non-idempotent method
    unless it has some means to know that the request semantics are actually idempotent ... or
    some means to detect that the original request was never applied"). GET and HEAD are safe
    (RFC 9110 §9.2.1). A FHIR PUT or DELETE is idempotent in RFC 9110 §9.2.2's sense, but each
    applied update stores a new version, so it is retried only with If-Match, as is PATCH: a
    replay of a request that was applied finds the version moved on and gets 412, never a second
    write (R4 http.html §concurrency). POST never."""
    if method in ("GET", "HEAD"):
        return True
    return method in ("PUT", "PATCH", "DELETE") and any(k == b"if-match" for k, _ in headers)


def _request_head(scope: Scope, method: str, authority: bytes, request_id: str,
                  body: bytes | None) -> bytes:
    """The request line and headers sent upstream (RFC 9112 §3, §5): only allow-listed headers,
    our request id, Host, and Content-Length for a body (or an empty POST/PUT/PATCH)."""
    # `path` is decoded (ASGI) and is what the gateway routed on: quoted again as UTF-8 (RFC 3986
    # §2.1), `%` included, so a space, a control or non-Latin-1 character reaches the backend as
    # the client encoded it and the backend decodes the path the gateway routed (an encoded `/`
    # is a `/` to both; `raw_path` would let the two read different paths).
    target = quote(scope.get("root_path", "") + scope["path"], safe="/:@!$&'()*+,;=~").encode("ascii")
    query: bytes = scope.get("query_string", b"")
    if query:
        target += b"?" + query
    parts = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", authority, b"\r\n"]
    accept = False
    for name, value in scope["headers"]:
        if name in _FORWARDED and name != b"x-request-id" and name != b"content-length":
            parts += (name, b": ", value, b"\r\n")
            accept = accept or name == b"accept"
    if not accept:  # what the previous client (aiohttp) sent without one
        parts.append(b"accept: */*\r\n")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        parts += (b"content-length: ", str(len(body or b"")).encode(), b"\r\n")
    parts += (b"x-request-id: ", request_id.encode("latin-1"), b"\r\n\r\n")
    return b"".join(parts)


@functools.lru_cache(maxsize=16)
def _authority(base_url: str) -> tuple[str, int, bytes]:
    """(host, port, Host header value) of a backend's base URL (plain http: the backends sit on
    the gateway's private network)."""
    parts = urlsplit(base_url)
    return parts.hostname or "localhost", parts.port or 80, parts.netloc.encode()


async def forward(scope: Scope, receive: Receive, send: Send, upstream_pool: Upstream,
                  upstream_url: str, request_id: str) -> None:
    """Relay the request (allow-listed headers only) and stream the answer back unchanged but for
    hop-by-hop headers. Bodies are passed through as bytes, never parsed here."""
    incoming: list[tuple[bytes, bytes]] = scope["headers"]
    body = await _request_body(receive) if _has_body(incoming) else None
    method: str = scope["method"]
    host, port, authority = _authority(upstream_url)
    head = _request_head(scope, method, authority, request_id, body)
    pool = upstream_pool.pool
    conn: upstream.Connection | None = None
    try:
        # The whole wait for the response head, retry included, is bounded; a streamed body then
        # flows as long as each wait for more of it stays within the timeout.
        async with asyncio.timeout(upstream_pool.timeout_seconds):
            conn = await pool.connection(host, port)
            try:
                conn.send_request(head, body)
                status, headers = await conn.response_head()
            except upstream.Dropped:
                # The connection closed or reset before any response arrived (one the backend
                # closed while idle, or a backend restarted): once more, on a fresh connection.
                pool.release(host, port, conn)
                conn = None
                if not retry_is_safe(method, incoming):
                    raise
                conn = await pool.connection(host, port, fresh=True)
                conn.send_request(head, body)
                status, headers = await conn.response_head()
    except BaseException as exc:  # a failure, or the client gone (cancelled): the connection too
        if conn is not None:
            pool.release(host, port, conn)
        if isinstance(exc, TimeoutError):
            raise errors.FhirError("The upstream FHIR server timed out", status=504,
                                   code="timeout") from None
        if isinstance(exc, upstream.UpstreamError):
            raise errors.Unavailable("The upstream FHIR server is unavailable") from None
        raise
    try:
        out_headers = [(k, v) for k, v in headers if k not in _NOT_RELAYED]
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        held = b""  # one chunk behind, so the last one goes out with more_body=False (one write less)
        while (chunk := await conn.next_chunk(upstream_pool.timeout_seconds)) is not None:
            if held:
                await send({"type": "http.response.body", "body": held, "more_body": True})
            held = chunk
        await send({"type": "http.response.body", "body": held, "more_body": False})
    finally:
        pool.release(host, port, conn)  # closed unless the response was read to its end


__all__ = ["BASES", "METHODS", "DatastoreFailure", "FhirDispatch", "Interaction", "ProxyEndpoint",
           "Registrations", "Upstream", "VerifiedTokens", "classify", "fhirjson", "forward",
           "needs_token", "patient_of", "retry_is_safe", "serve"]
