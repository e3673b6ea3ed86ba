"""The FHIR path's single ASGI callable (gateway/front.py) answers as the middleware stack it
replaces did, layer by layer: request id, CORS, audit of every answer (refusals included), body
limits declared and streamed, the disclosure header never leaving, metrics by route template; a
CORS preflight still gets the stack's answer."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx

from tests.actors import BackendClient
from tests.conftest import RunningStack
from tests.records_resources import patient

MAX_BODY = 1024 * 1024  # MINDCHART_GATEWAY_MAX_BODY_BYTES's default


def audited(live: RunningStack, response: httpx.Response) -> dict[str, Any]:
    request_id = response.headers["x-request-id"]
    found = live.db("gateway").audit_events.find_one({"request_id": request_id, "kind": "rest"})
    assert found is not None, f"no audit record for {response.request.method} {response.url}"
    return dict(found)


def test_a_read_carries_request_id_cors_and_its_audit_record(live: RunningStack,
                                                              writer_http: httpx.Client) -> None:
    created = writer_http.post("/Patient", json=patient("Front"))
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    given = f"front-{uuid.uuid4().hex}"
    read = writer_http.get(f"/Patient/{pid}", headers={"X-Request-ID": given})
    assert read.status_code == 200 and read.json()["id"] == pid
    assert read.headers.get_list("x-request-id") == [given]
    assert read.headers["access-control-allow-origin"] == "*"
    assert "ETag" in read.headers["access-control-expose-headers"]
    assert not any(k.lower().startswith("x-mindchart") for k in read.headers)
    record = audited(live, read)
    assert record["status"] == 200 and record["method"] == "GET"
    assert record["path"] == f"/fhir/Patient/{pid}" and record["patient"] == f"Patient/{pid}"
    assert record["event"]["subtype"][0]["code"] == "read"
    # A malformed id is replaced by one of the gateway's own, echoed once.
    odd = writer_http.get(f"/Patient/{pid}", headers={"X-Request-ID": "bad id!"})
    assert odd.headers.get_list("x-request-id") != ["bad id!"]
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
    assert audited(live, odd)["status"] == 200


def test_refusals_are_audited_with_the_headers_of_their_layer(live: RunningStack,
                                                             writer_http: httpx.Client) -> None:
    # No token: the endpoint's 401, with CORS (as when dispatch sat inside the CORS layer).
    anonymous = httpx.get(f"{live.fhir}/Patient", timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.headers["access-control-allow-origin"] == "*"
    assert anonymous.json()["resourceType"] == "OperationOutcome"
    assert audited(live, anonymous)["status"] == 401
    # An unsupported method: 405 with Allow, audited.
    options = writer_http.request("TRACE", "/Patient")
    assert options.status_code == 405 and "GET" in options.headers["allow"]
    assert audited(live, options)["status"] == 405
    # A declared body over the limit: the body-limit layer's 413, audited, outside CORS.
    before = live.db("records").Patient.count_documents({})
    declared = writer_http.post("/Patient", content=b"{" + b" " * (MAX_BODY + 10) + b"}")
    assert declared.status_code == 413, declared.text
    assert declared.json()["issue"][0]["code"] == "too-costly"
    assert "access-control-allow-origin" not in declared.headers
    assert audited(live, declared)["status"] == 413

    # The same, streamed without a length (chunked): counted as it arrives.
    def chunks() -> Iterator[bytes]:
        yield b"{"
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536
        yield b"}"

    streamed = writer_http.post("/Patient", content=chunks())
    assert streamed.status_code == 413
    assert audited(live, streamed)["status"] == 413
    assert live.db("records").Patient.count_documents({}) == before


def test_a_preflight_gets_the_cors_answer(live: RunningStack) -> None:
    preflight = httpx.options(f"{live.fhir}/Patient", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"}, timeout=30)
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert audited(live, preflight)["method"] == "OPTIONS"


def test_metrics_count_fhir_reads_by_route_template(live: RunningStack, writer: BackendClient) -> None:
    def reads() -> float:
        text = httpx.get(f"{live.gateway_url}/metrics", timeout=30).text
        found = re.search(r'^mindchart_http_requests_total\{method="GET",route="/fhir/\{type\}/\{id\}",'
                          r'service="gateway",status="404"\} (\S+)$', text, re.M)
        return float(found[1]) if found else 0.0

    before = reads()
    token = writer.token("system/Patient.rs")
    for _ in range(3):
        missing = httpx.get(f"{live.fhir}/Patient/no-such-{uuid.uuid4().hex[:8]}",
                            headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert missing.status_code == 404
    assert reads() == before + 3


def test_a_path_the_client_percent_encoded_reaches_the_backend_encoded(
        live: RunningStack, writer_http: httpx.Client) -> None:
    """The ASGI path is decoded; the gateway quotes it again before the request line, so a
    non-Latin-1 character, a control character, a space or a `%` in an id gets the backend's own
    answer (a 4xx read as the client meant it), never the gateway's 500."""
    for odd in ("%C8%BE", "A%F3%89%8F%A0%C2%96", "a%20b", "%25zz", "%0A"):
        read = writer_http.get(f"/Patient/{odd}")
        assert 400 <= read.status_code < 500, (odd, read.status_code, read.text)
        assert read.json()["resourceType"] == "OperationOutcome"
        assert audited(live, read)["status"] == read.status_code
    # The gateway stays healthy and an ordinary read after them is unchanged.
    created = writer_http.post("/Patient", json=patient("Encoded"))
    assert writer_http.get(f"/Patient/{created.json()['id']}").status_code == 200
