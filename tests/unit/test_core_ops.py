"""Logging scrubber, production refusal, audit shapes and the datastore timer in mindchart_core."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from datetime import timedelta

import pytest
import structlog
from prometheus_client import REGISTRY

from mindchart_core import audit, logs, metrics
from mindchart_core.settings import ServiceSettings, UnsafeConfiguration

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXZhbHVl"


def captured_log(**fields: object) -> dict[str, object]:
    out = io.StringIO()
    with redirect_stdout(out):
        logs.configure("test")
        structlog.get_logger("t").info("event", **fields)
    return dict(json.loads(out.getvalue().strip().splitlines()[-1]))


def test_sensitive_keys_and_token_shapes_never_reach_the_log() -> None:
    line = captured_log(password="hunter2-hunter2", token="abc", text="I feel hopeless",
                        access_token=JWT, detail=f"header was Bearer {JWT}", client_id="app-1")
    rendered = json.dumps(line)
    for secret in ("hunter2", "hopeless", JWT, "c2lnbmF0dXJl"):
        assert secret not in rendered
    assert line["client_id"] == "app-1"
    assert line["service"] == "test"


def test_production_refuses_default_credentials_and_embedded_datastores() -> None:
    ServiceSettings(env="development").refuse_unsafe_production()  # development: anything goes
    for url in ("mongodb://db:27017", "mongodb://u:changeme@db:27017",
                "mongodb://u:short@db:27017", "mongodb://u:a-long-real-password@127.0.0.1:27117"):
        with pytest.raises(UnsafeConfiguration):
            ServiceSettings(env="production", mongo_url=url).refuse_unsafe_production()
    ServiceSettings(env="production",
                    mongo_url="mongodb://svc:Q8v!x2LmP0rT9zK@mongo-records:27017/?replicaSet=rs0"
                    ).refuse_unsafe_production()


def test_secret_files_feed_settings(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic_settings import SettingsConfigDict

    class Probe(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="PROBE_", extra="ignore", populate_by_name=True)

    secret = tmp_path / "url"
    secret.write_text("mongodb://u:from-a-file-secret@db:27017\n")
    monkeypatch.setenv("PROBE_MONGO_URL_FILE", str(secret))
    assert Probe().mongo_url == "mongodb://u:from-a-file-secret@db:27017"


def test_rest_audit_event_is_balp_shaped() -> None:
    event = audit.rest_audit_event(audit.RestAudit(
        interaction="search-type", method="GET", path="/fhir/Observation", query="patient=1",
        status=200, request_id="r1", client_ip="127.0.0.1", observer="gw", client_id="app",
        subject="u1", fhir_user="Practitioner/9", jti="j1", patient="Patient/1",
        purpose_of_use=["TREAT"]))
    assert event["type"]["code"] == "rest" and event["action"] == "E" and event["outcome"] == "0"
    roles = [a["type"]["coding"][0]["code"] for a in event["agent"]]
    assert roles[:2] == ["110153", "110152"]  # BALP Query: client is Source, server Destination
    user = event["agent"][2]
    assert user["policy"] == ["urn:ietf:params:oauth:jti:j1"]
    assert user["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"
    entity_roles = {e.get("role", {}).get("code") for e in event["entity"]}
    assert {"1", "24"} <= entity_roles  # patient + query entity
    failed = audit.rest_audit_event(audit.RestAudit(
        interaction="read", method="GET", path="/fhir/Patient/1", query="", status=401,
        request_id="r2", client_ip="127.0.0.1", observer="gw"))
    assert failed["outcome"] == "4" and failed["outcomeDesc"] == "HTTP 401"


def test_disclosure_header_round_trip_and_event() -> None:
    disclosure = audit.Disclosure("Patient/1", ["DocumentReference/n1"], ["TREAT"], "Consent/c1",
                                  "app", "Practitioner/2", "released under authorization")
    assert audit.decode_disclosures(audit.encode_disclosures([disclosure])) == [disclosure]
    event = audit.disclosure_audit_event(disclosure, custodian="psychnotes", request_id="r")
    assert event["subtype"][0]["code"] == "disclose"
    assert {e["what"].get("reference") for e in event["entity"]} >= {"Patient/1", "DocumentReference/n1"}


def test_command_timer_records_only_the_command_name() -> None:
    from pymongo import monitoring

    timer = metrics.CommandTimer("unit")
    started = monitoring.CommandStartedEvent({"find": "notes", "filter": {"patient": "secret"}}, "db", 7,
                                             ("h", 1), None)
    timer.started(started)
    timer.succeeded(monitoring.CommandSucceededEvent(timedelta(milliseconds=1), {"ok": 1}, "find", 7, ("h", 1), None))
    value = REGISTRY.get_sample_value("mindchart_db_command_duration_seconds_count",
                                      {"service": "unit", "command": "find", "outcome": "ok"})
    assert value == 1.0


def test_each_service_refuses_production_without_its_keys() -> None:
    from gateway.settings import GatewaySettings
    from psychnotes.settings import PsychnotesSettings

    url = "mongodb://svc:Q8v!x2LmP0rT9zK@mongo:27017/?replicaSet=rs0"
    with pytest.raises(UnsafeConfiguration, match="SIGNING_KEY_FILE"):
        GatewaySettings(env="production", mongo_url=url).refuse_unsafe_production()
    with pytest.raises(UnsafeConfiguration, match="SIGNING_KEK_FILE"):  # sealing the keys at rest
        GatewaySettings(env="production", mongo_url=url,
                        signing_key_file="/run/secrets/key.pem").refuse_unsafe_production()
    with pytest.raises(UnsafeConfiguration, match="KEK_FILE"):
        PsychnotesSettings(env="production", mongo_url=url).refuse_unsafe_production()


def test_service_apps_refuse_to_start_unsafe_in_production() -> None:
    from records.app import create_app
    from records.settings import RecordsSettings

    with pytest.raises(UnsafeConfiguration, match="no credentials"):
        create_app(RecordsSettings(env="production", mongo_url="mongodb://records-db:27017"))


def test_tracing_is_off_by_default_and_spans_carry_the_request_id_when_on(tmp_path) -> None:
    """Run in a subprocess: turning tracing on installs a process-wide tracer provider."""
    import os
    import subprocess
    import sys

    from fastapi import FastAPI

    from mindchart_core import tracing

    assert not tracing.enabled() or os.environ.get("MINDCHART_TRACING")
    script = tmp_path / "traced.py"
    script.write_text(
        "from fastapi import FastAPI\n"
        "from fastapi.testclient import TestClient\n"
        "from opentelemetry import trace\n"
        "from mindchart_core import tracing\n"
        "app = FastAPI()\n"
        "@app.get('/ping')\n"
        "async def ping() -> dict: return {'ok': True}\n"
        "assert tracing.instrument(app, 'unit')\n"
        "from mindchart_core import asgi\n"
        "app.add_middleware(asgi.RequestContextMiddleware, service='unit')\n"
        "TestClient(app).get('/ping', headers={'X-Request-ID': 'trace-me-7'})\n"
        "trace.get_tracer_provider().force_flush()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run([sys.executable, str(script)], env={**env, "MINDCHART_TRACING": "console"},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"mindchart.request_id": "trace-me-7"' in result.stdout
    assert "mindchart-unit" in result.stdout
    plain = FastAPI()
    if not os.environ.get("MINDCHART_TRACING") and not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        assert tracing.instrument(plain, "unit") is False
        assert not plain.user_middleware
