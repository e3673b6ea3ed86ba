"""Mindchart's shared library: what must behave identically in every service.

FHIR JSON I/O, OperationOutcome errors, validation, SMART scopes, access-token verification,
audit-event shape, settings base, logging and request context, and MongoDB's matching semantics
for the services' two-phase queries (`matcher`). No FastAPI app, no database connections.
"""

from mindchart_core import (
    asgi,
    audit,
    errors,
    fhirjson,
    health,
    logs,
    matcher,
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
    "matcher",
    "scopes",
    "settings",
    "tokens",
    "validation",
]
