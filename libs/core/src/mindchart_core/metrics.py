"""Prometheus series every service exposes at /metrics (names shared so dashboards work across
services): HTTP traffic (recorded by asgi.RequestContextMiddleware), datastore command latency,
token issuance, consent refusals and export jobs."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from pymongo import monitoring

HTTP_REQUESTS = Counter(
    "mindchart_http_requests_total", "HTTP requests", ["service", "method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "mindchart_http_request_duration_seconds", "HTTP request latency", ["service", "method", "route"]
)
DB_LATENCY = Histogram(
    "mindchart_db_command_duration_seconds", "Datastore command latency",
    ["service", "command", "outcome"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
TOKENS_ISSUED = Counter(
    "mindchart_tokens_issued_total", "Access tokens issued by the gateway", ["grant_type"]
)
TOKEN_REFUSALS = Counter(
    "mindchart_token_refusals_total", "Token requests refused", ["grant_type", "error"]
)
CONSENT_DECISIONS = Counter(
    "mindchart_consent_decisions_total", "Psychotherapy-note consent checks", ["decision", "reason"]
)
HTTP_CUT_OFF = Counter(
    "mindchart_http_cut_off_total",
    "Connections the HTTP layer answered or closed itself (mindchart_core.http_limits): a refused "
    "head (431, 414, 408), a request that does not parse (400), a client that stopped reading",
    ["reason"])
EXPORT_JOBS = Counter("mindchart_export_jobs_total", "Bulk export jobs by final state", ["state"])
EXPORT_JOBS_RUNNING = Gauge("mindchart_export_jobs_running", "Bulk export jobs running now")

_COMMANDS = frozenset({
    "find", "insert", "update", "delete", "aggregate", "count", "findAndModify", "getMore",
    "commitTransaction", "abortTransaction", "createIndexes", "ping", "distinct",
})


class CommandTimer(monitoring.CommandListener):
    """PyMongo command listener feeding DB_LATENCY; pass as `event_listeners=[CommandTimer(svc)]`.

    Only the command name is recorded: never the filter or document, which can hold PHI.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self._started: dict[int, float] = {}
        # The histogram's child per (command, outcome): `.labels()` builds and looks up its key
        # under a lock on every call, and every audited request makes at least one command.
        self._children: dict[tuple[str, str], Any] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self._started[event.request_id] = time.perf_counter()

    def _finish(self, event: monitoring.CommandSucceededEvent | monitoring.CommandFailedEvent,
                outcome: str) -> None:
        began = self._started.pop(event.request_id, None)
        if began is None:
            return
        name = event.command_name if event.command_name in _COMMANDS else "other"
        child = self._children.get((name, outcome))
        if child is None:
            child = self._children[(name, outcome)] = DB_LATENCY.labels(self.service, name, outcome)
        child.observe(time.perf_counter() - began)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self._finish(event, "ok")

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._finish(event, "error")
