"""What a whole end-to-end run leaves behind: logs free of secrets and note text, one request id
across gateway and backend, and the Prometheus series operators alert on. Runs after every other
test on the shared stack (see `pytest_collection_modifyitems`)."""

from __future__ import annotations

import json
import re
import time

import httpx

from tests.actors import SENSITIVE_MARKERS, BackendClient
from tests.conftest import RunningStack

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.")
SERVICE_LOGS = ("gateway", "records", "psychnotes")


def service_log(live: RunningStack, name: str) -> str:
    return (live.runner.log_dir / f"{name}.log").read_text(errors="replace")


def test_request_id_travels_from_gateway_to_backend(live: RunningStack, writer_http: httpx.Client) -> None:
    response = writer_http.get("/Patient", headers={"X-Request-ID": "trace-propagation-42"})
    assert response.headers["x-request-id"] == "trace-propagation-42"
    # The gateway writes its access line once the last byte is sent, so allow it a moment.
    for name in ("gateway", "records"):
        deadline = time.monotonic() + 10
        while True:
            lines = [json.loads(line) for line in service_log(live, name).splitlines() if line.startswith("{")]
            if any(line.get("request_id") == "trace-propagation-42" for line in lines):
                break
            assert time.monotonic() < deadline, f"{name} never logged the request id"
            time.sleep(0.1)


def test_logs_hold_no_tokens_secrets_or_note_text(live: RunningStack, writer: BackendClient) -> None:
    for name in SERVICE_LOGS:
        text = service_log(live, name)
        assert '"msg": "request"' in text, f"{name} wrote no request log lines at all"
        assert not JWT.search(text), f"{name} logged a JWT"
        assert "Bearer ey" not in text
        leaked = [marker for marker in SENSITIVE_MARKERS if marker in text]
        assert not leaked, f"{name} logged sensitive text: {leaked[:3]}"
        private = json.dumps(writer.key.as_dict(private=True)["d"])
        assert private.strip('"') not in text


def test_metrics_show_the_series_operators_need(live: RunningStack, writer: BackendClient) -> None:
    """Each service exposes the series dashboards alert on, after the traffic that feeds them:
    a token request, a records search, a psychotherapy-note read refused at the consent gate, a
    patient listing their authorizations. The test makes that traffic itself, so it passes run
    alone as well as after the whole suite."""
    from tests.e2e.test_psychnotes import headers, patient_token, user_token

    token = writer.token("system/Patient.rs")  # gateway: mindchart_tokens_issued_total
    searched = httpx.get(f"{live.fhir}/Patient", params={"_count": 1}, headers=headers(token))
    assert searched.status_code == 200, searched.text
    therapist = user_token(live, "Practitioner/th-metrics")
    refused = httpx.get(f"{live.psychnotes}/DocumentReference/no-such-note", headers=headers(therapist))
    assert refused.status_code == 403, refused.text  # the gate refuses before any lookup
    own = httpx.get(f"{live.psychnotes}/Consent", params={"patient": "metrics-pt"},
                    headers=headers(patient_token(live, "metrics-pt")))
    assert own.status_code == 200, own.text  # a patient lists their own authorizations
    expected = {
        "gateway": ["mindchart_http_requests_total", "mindchart_http_request_duration_seconds",
                    "mindchart_db_command_duration_seconds", "mindchart_tokens_issued_total"],
        "records": ["mindchart_http_requests_total", "mindchart_db_command_duration_seconds",
                    "mindchart_export_jobs_running"],
        "psychnotes": ["mindchart_http_requests_total", "mindchart_db_command_duration_seconds",
                       "mindchart_consent_decisions_total"],
    }
    for service, series in expected.items():
        text = httpx.get(f"{live.direct_url(service)}/metrics").text
        for name in series:
            assert re.search(rf"^{name}(_count|_bucket)?[{{ ]", text, re.MULTILINE), f"{service}: {name}"
        assert 'status="200"' in text
    # Export jobs run on their own stack in test_export.py; here the series must be declared.
    records = httpx.get(f"{live.direct_url('records')}/metrics").text
    assert "# TYPE mindchart_export_jobs_total counter" in records


def test_gateway_names_the_route_of_every_proxied_request(live: RunningStack, writer_http: httpx.Client) -> None:
    """Dashboards tell a search from a read: the gateway's access log and metrics carry route
    templates (`/fhir/{type}`, `/fhir/{type}/{id}`, operations), never `unmatched`, and never an id."""
    patient = writer_http.post("/Patient", json={"resourceType": "Patient"}).json()["id"]
    marker = f"route-names-{patient[:8]}"
    asked = {
        f"/Patient/{patient}": "/fhir/{type}/{id}",
        "/Observation?code=44261-6": "/fhir/{type}",
        f"/Patient/{patient}/_history/1": "/fhir/{type}/{id}/_history/{vid}",
        f"/Patient/{patient}/$everything": "/fhir/{type}/{id}/$everything",
        "/Patient/$no-such-operation": "/fhir/{type}/{operation}",
    }
    for index, path in enumerate(asked):
        writer_http.get(path, headers={"X-Request-ID": f"{marker}-{index}"})
    unauthenticated = httpx.get(f"{live.psychnotes}/DocumentReference", headers={"X-Request-ID": f"{marker}-x"})
    assert unauthenticated.status_code == 401
    expected = {f"{marker}-{i}": route for i, route in enumerate(asked.values())}
    expected[f"{marker}-x"] = "/psychnotes/fhir/{type}"
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in service_log(live, "gateway").splitlines() if line.startswith("{")]
        logged = {line["request_id"]: line.get("route") for line in lines
                  if line.get("msg") == "request" and str(line.get("request_id", "")).startswith(marker)}
        if len(logged) == len(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert logged == expected
    metrics = httpx.get(f"{live.direct_url('gateway')}/metrics").text
    assert 'route="/fhir/{type}/{id}"' in metrics and 'route="/fhir/{type}"' in metrics
    assert patient not in metrics
