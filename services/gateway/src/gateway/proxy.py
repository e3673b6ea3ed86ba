"""Routing to the FHIR backends with coarse policy: valid token, our audience, scopes that can
cover the interaction. Backends verify the token again and narrow results themselves.

Only allow-listed request headers travel upstream, so identity headers a client invents
(X-Forwarded-User, X-Client-Id, ...) never reach a backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from pymongo.errors import PyMongoError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import ratelimit, store
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
    "$revoke-consent-token", "$disclosures", "$match", "$meta", "$export-status", "$export-file",
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
        upstream = state.settings.records_url if self.backend == "records" else state.settings.psychnotes_url
        await forward(scope, receive, send, state.upstream, upstream, str(context.get("request_id", "")))


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


# Below uvicorn's default `--timeout-keep-alive` (5 s) on the backends, so the pool closes an idle
# connection before the backend does, instead of racing it (RFC 9112 §9.3: "a client might send a
# request at the same time that the server has decided to close the idle connection").
POOL_KEEPALIVE_SECONDS = 4.0
UPSTREAM_MAX_HEADER_BYTES = 64 * 1024


def _session(timeout_seconds: float, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
    session = aiohttp.ClientSession(
        # Like httpx's: a limit per connect and per read, not on the whole (streamed) response.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout_seconds, sock_read=timeout_seconds),
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),  # identity bodies, relayed as they are
        # psychnotes reports what a read released in one header (DISCLOSURE_HEADER): a search page
        # of 100 notes is about 8 KiB, past aiohttp's 8190-byte default, which made the page a
        # 503 "upstream unavailable" (tests/resilience kill test). Backends are ours; still bounded.
        max_field_size=UPSTREAM_MAX_HEADER_BYTES,
    )
    # aiohttp retries every method it deems idempotent, PUT and DELETE included, once on any
    # pooled connection; a FHIR PUT replayed that way stores a second version. Which requests
    # are retried, and on what connection, is decided in forward() instead.
    session._retry_connection = False  # aiohttp has no public switch for it
    return session


class Upstream:
    """The proxy's connections to the backends: aiohttp (C-accelerated HTTP parsing) rather than
    httpx, whose pure-Python HTTP/1.1 stack was most of the gateway's CPU per proxied read. A
    keep-alive pool for every request, and a fresh connection each for the one retry, so a retry
    never lands on another connection the backend has already closed."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self.pooled = _session(timeout_seconds, aiohttp.TCPConnector(
            limit=200, limit_per_host=100, ttl_dns_cache=300, keepalive_timeout=POOL_KEEPALIVE_SECONDS))
        self.fresh = _session(timeout_seconds, aiohttp.TCPConnector(
            limit=50, ttl_dns_cache=300, force_close=True))

    async def close(self) -> None:
        await self.pooled.close()
        await self.fresh.close()


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


async def forward(scope: Scope, receive: Receive, send: Send, upstream_pool: Upstream,
                  upstream: str, request_id: str) -> None:
    """Relay the request (allow-listed headers only) and stream the answer back unchanged but for
    hop-by-hop headers. Bodies are passed through as bytes, never parsed here."""
    incoming: list[tuple[bytes, bytes]] = scope["headers"]
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in incoming
               if k in _FORWARDED and k != b"x-request-id" and k != b"content-length"]
    headers.append(("x-request-id", request_id))
    url = upstream + scope.get("root_path", "") + scope["path"]
    if scope.get("query_string"):
        url += "?" + scope["query_string"].decode("latin-1")
    body = await _request_body(receive) if _has_body(incoming) else None
    method: str = scope["method"]
    try:
        # The whole wait for the response head, retry included, is bounded (the sessions bound
        # each connect and each read); a streamed body then flows as long as reads keep coming.
        async with asyncio.timeout(upstream_pool.timeout_seconds):
            try:
                response = await upstream_pool.pooled.request(method, url, headers=headers, data=body,
                                                              allow_redirects=False)
            except aiohttp.ClientConnectorError:
                raise  # no connection was made: nothing was sent, and a retry would fail alike
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # The connection closed or reset before any response arrived (one the backend
                # closed while idle, or a backend restarted): once more, on a fresh connection.
                if not retry_is_safe(method, incoming):
                    raise
                response = await upstream_pool.fresh.request(method, url, headers=headers, data=body,
                                                             allow_redirects=False)
    except TimeoutError:
        raise errors.FhirError("The upstream FHIR server timed out", status=504, code="timeout") from None
    except aiohttp.ClientError:
        raise errors.Unavailable("The upstream FHIR server is unavailable") from None
    try:
        out_headers = [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in _NOT_RELAYED]
        await send({"type": "http.response.start", "status": response.status, "headers": out_headers})
        held = b""  # one chunk behind, so the last one goes out with more_body=False (one write less)
        async for chunk in response.content.iter_any():
            if held:
                await send({"type": "http.response.body", "body": held, "more_body": True})
            held = chunk
        await send({"type": "http.response.body", "body": held, "more_body": False})
    finally:
        response.release()


__all__ = ["BASES", "METHODS", "DatastoreFailure", "FhirDispatch", "Interaction", "ProxyEndpoint",
           "Registrations", "Upstream", "VerifiedTokens", "classify", "fhirjson", "forward",
           "needs_token", "patient_of", "retry_is_safe", "serve"]
