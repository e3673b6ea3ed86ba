"""Structured JSON logs (structlog) that never carry note text, tokens or secrets.

A deny-list processor drops sensitive keys wherever a call site puts them, and a pattern scrub
removes anything shaped like a bearer token or JWT from the values that remain.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SENSITIVE_KEYS = frozenset({
    "authorization", "token", "access_token", "refresh_token", "id_token", "client_assertion",
    "consent_token", "password", "secret", "client_secret", "code_verifier", "code", "body",
    "text", "content", "data", "note", "resource", "cookie", "set-cookie", "kek", "private_key",
})
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)bearer\s+\S+")


def _scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower() in SENSITIVE_KEYS:
            event[key] = "[redacted]"
        elif isinstance(event[key], str):
            event[key] = _BEARER.sub("Bearer [redacted]", _JWT.sub("[jwt]", event[key]))
    return event


def configure(service: str, level: str = "INFO") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _scrub,
            structlog.processors.EventRenamer("msg"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    # uvicorn's own access log prints query strings (which can carry identifiers): ours replaces it.
    logging.getLogger("uvicorn.access").disabled = True
