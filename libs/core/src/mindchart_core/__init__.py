"""Mindchart's shared library: what must behave identically in every service.

FHIR JSON I/O, OperationOutcome errors, validation, SMART scopes, access-token verification,
audit-event shape, settings base, logging and request context. No FastAPI app, no database code.
"""

from mindchart_core import (
    asgi,
    audit,
    errors,
    fhirjson,
    health,
    logs,
    scopes,
    settings,
    tokens,
    validation,
)

__all__ = [
    "asgi",
    "audit",
    "errors",
    "fhirjson",
    "health",
    "logs",
    "scopes",
    "settings",
    "tokens",
    "validation",
]
