"""One error type, one handler: every failure leaves a service as an R4 OperationOutcome.

Status/issue-code pairing follows FHIR R4 http.html and security.html (see shared/STANDARDS.md §4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pymongo.errors import ConnectionFailure, ExecutionTimeout, PyMongoError, WTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from mindchart_core import fhirjson

log = structlog.get_logger(__name__)


def operation_outcome(
    code: str,
    diagnostics: str,
    *,
    severity: str = "error",
    expression: list[str] | None = None,
) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


class FhirError(Exception):
    """A refusal the client should see: HTTP status + OperationOutcome issue code."""

    status = 400
    code = "invalid"

    def __init__(
        self,
        diagnostics: str,
        *,
        status: int | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        expression: list[str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})
        self.expression = expression

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.code, self.diagnostics, expression=self.expression)

    def response(self) -> Response:
        return fhirjson.FhirResponse(self.outcome(), status_code=self.status, headers=self.headers)


class Invalid(FhirError):
    status, code = 400, "invalid"


class Structure(FhirError):
    status, code = 400, "structure"


def bearer_challenge(error: str | None = None, *, scope: str | None = None) -> str:
    """RFC 6750 §3: the `WWW-Authenticate` value of a bearer-protected resource's refusal.

    §3.1: "If the request lacks any authentication information (e.g., the client was unaware that
    authentication is necessary or attempted using an unsupported authentication method), the
    resource server SHOULD NOT include an error code or other error information"; otherwise the
    error is `invalid_request`, `invalid_token` (401) or `insufficient_scope` (403, MAY name the
    `scope` needed)."""
    params = ['realm="mindchart"']
    if error:
        params.append(f'error="{error}"')
    if scope:
        params.append(f'scope="{scope}"')
    return "Bearer " + ", ".join(params)


class Unauthorized(FhirError):
    """RFC 6750 §3: 401 with a WWW-Authenticate challenge (`error=None`: no credentials at all)."""

    status, code = 401, "login"

    def __init__(self, diagnostics: str = "A valid bearer token is required",
                 *, error: str | None = "invalid_token") -> None:
        super().__init__(diagnostics, headers={"WWW-Authenticate": bearer_challenge(error)})


class NoCredentials(Unauthorized):
    """No bearer token at all (or another scheme): RFC 6750 §3.1, a challenge with no error code."""

    def __init__(self, diagnostics: str = "A bearer token is required") -> None:
        super().__init__(diagnostics, error=None)


class Forbidden(FhirError):
    status, code = 403, "forbidden"


class InsufficientScope(Forbidden):
    """A valid token whose scopes do not cover the request: RFC 6750 §3.1 `insufficient_scope`
    ("The resource server SHOULD respond with the HTTP 403 (Forbidden) status code"), which §3
    carries in `WWW-Authenticate` whenever the token does not enable access."""

    def __init__(self, diagnostics: str, *, scope: str | None = None) -> None:
        super().__init__(diagnostics, headers={
            "WWW-Authenticate": bearer_challenge("insufficient_scope", scope=scope)})


class NotFound(FhirError):
    status, code = 404, "not-found"


class MethodNotAllowed(FhirError):
    status, code = 405, "not-supported"


class NotAcceptable(FhirError):
    status, code = 406, "not-supported"


class RequestTimeout(FhirError):
    """RFC 9110 §15.5.9: the request did not arrive in full within the time allowed."""

    status, code = 408, "timeout"


class Conflict(FhirError):
    status, code = 409, "conflict"


class Gone(FhirError):
    status, code = 410, "deleted"


class PreconditionFailed(FhirError):
    status, code = 412, "conflict"


class PayloadTooLarge(FhirError):
    status, code = 413, "too-costly"


class UnsupportedMediaType(FhirError):
    status, code = 415, "not-supported"


class Unprocessable(FhirError):
    status, code = 422, "business-rule"


class Throttled(FhirError):
    status, code = 429, "throttled"


class Unavailable(FhirError):
    status, code = 503, "transient"


RETRY_AFTER_SECONDS = 2  # what a 503 for an unreachable datastore asks clients to wait


def datastore_refusal(exc: PyMongoError) -> FhirError | None:
    """The answer for a datastore failure that is not a bug, or None for one that is.

    Unreachable, frozen or timed out (ConnectionFailure covers server selection, connect and
    socket timeouts; ExecutionTimeout and WTimeoutError the server's own limits): 503 `transient`
    with Retry-After (R4 http.html: 503 for a temporarily unavailable server). A transaction that
    lost a write conflict to a concurrent one (the TransientTransactionError label, MongoDB
    transactions manual) and was not retried by the store: 409, which FHIR uses for version
    conflicts, so the client may read and retry. Checked in that order: PyMongo labels a
    transaction that could not reach the server transient too, and that is a 503."""
    if isinstance(exc, ConnectionFailure | ExecutionTimeout | WTimeoutError) or exc.timeout:
        return Unavailable("The datastore is not answering; retry shortly",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if exc.has_error_label("TransientTransactionError"):
        return Conflict("A concurrent request changed the same data; retry")
    return None


async def datastore_failure(_: Request, exc: Exception) -> Response:
    """Exception handler for PyMongoError: 503/409 per datastore_refusal, else a logged 500."""
    refusal = datastore_refusal(exc) if isinstance(exc, PyMongoError) else None
    if refusal is None:
        log.error("datastore_error", error_type=type(exc).__name__)
        return FhirError("Internal server error", status=500, code="exception").response()
    log.warning("datastore_unavailable", error_type=type(exc).__name__, status=refusal.status)
    return refusal.response()


_STATUS_CODES = {404: "not-found", 405: "not-supported", 401: "login", 403: "forbidden"}


def install_error_handlers(app: FastAPI) -> None:
    """Render every error as an OperationOutcome; never leak internals on a 500."""

    @app.exception_handler(FhirError)
    async def _fhir_error(_: Request, exc: FhirError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return Invalid(f"Invalid request parameter {where}: {first.get('msg', 'invalid')}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = _STATUS_CODES.get(exc.status_code, "processing")
        text = "Not found" if exc.status_code == 404 else str(exc.detail)
        return FhirError(text, status=exc.status_code, code=code).response()

    app.add_exception_handler(PyMongoError, datastore_failure)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled_error", error_type=type(exc).__name__)
        return FhirError("Internal server error", status=500, code="exception").response()
