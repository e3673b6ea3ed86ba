"""OpenTelemetry tracing, off unless configured.

Set `OTEL_EXPORTER_OTLP_ENDPOINT` (standard OTel variable) to export spans over OTLP/HTTP, or
`MINDCHART_TRACING=console` to print them. The gateway forwards W3C `traceparent`/`tracestate`, so
one trace spans gateway → backend; the request id (`X-Request-ID`) is put on every span too.
Span attributes carry routes and status codes only: never query strings, bodies or headers.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI

_configured = False


def enabled() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("MINDCHART_TRACING"))


def _setup_provider(service: str) -> None:
    global _configured
    if _configured:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": f"mindchart-{service}"}))
    exporter: SpanExporter
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor().instrument()
    _configured = True


def _server_request_hook(span: Any, scope: dict[str, Any]) -> None:
    if span is not None and span.is_recording():
        request_id = scope.get("state", {}).get("request_id")
        if request_id:
            span.set_attribute("mindchart.request_id", str(request_id))


def instrument(app: FastAPI, service: str) -> bool:
    """Add OTel's ASGI middleware when tracing is configured. Call it just before adding
    RequestContextMiddleware, so the request id is known when a span starts. True if added."""
    if not enabled():
        return False
    _setup_provider(service)
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    app.add_middleware(
        OpenTelemetryMiddleware, server_request_hook=_server_request_hook,
        exclude_spans=["receive", "send"],
    )
    return True
