"""The bad-input catalogue's limits: oversized and too many headers, an oversized request target,
slow heads and slow bodies (slowloris) and a JSON Patch bomb. Each gets a clear 4xx with an
OperationOutcome (RFC 6749 JSON on /oauth), stores nothing, holds no memory or connection for
long, and leaves the service healthy. Spoken over raw sockets: an HTTP client library would refuse
to send most of these."""

from __future__ import annotations

import json
import select
import socket
import threading
import uuid
from typing import Any

import httpx
import pytest

from tests.resilience.conftest import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    ResilientStack,
    audit_counts,
    report,
    rss_mib,
)

MIB = 1024 * 1024
SERVICES = ("gateway", "records", "psychnotes")
# How long a test waits for the server to give up on a slow client: several times the configured
# deadline, so a loaded machine cannot fail it; a server with no deadline never answers at all.
PATIENCE_S = 4 * max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S) + 10


def _port(resilient: ResilientStack, service: str) -> int:
    return resilient.config.http_ports[service]


def _exchange(port: int, head: bytes, *, trickle: bytes = b"", every_s: float = 0.0) -> tuple[
        int, dict[str, str], bytes]:
    """Send `head`, then `trickle` a byte at a time `every_s` apart for as long as the server
    listens; read until it closes. The response's status, headers and body, with the number of
    trickled bytes sent under the header "x-trickled" ((0, ...) if it closed without a response)."""
    answer, trickled = b"", 0
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S) as sock:
        try:
            sock.sendall(head)
            for byte in trickle:
                readable, _, _ = select.select([sock], [], [], every_s)
                if readable:  # the server answered (and is closing): stop sending
                    chunk = sock.recv(65536)
                    answer += chunk
                    if not chunk:
                        break
                    continue
                sock.sendall(bytes([byte]))
                trickled += 1
            while chunk := sock.recv(65536):
                answer += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server gave up on us first
    if not answer:
        return 0, {"x-trickled": str(trickled)}, b""
    head_part, _, body = answer.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = dict((k.lower(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:]))
    headers["x-trickled"] = str(trickled)
    return int(lines[0].split()[1]), headers, body


def _healthy(resilient: ResilientStack, service: str) -> None:
    assert httpx.get(f"{resilient.direct_url(service)}/readyz", timeout=10).status_code == 200


def _outcome(body: bytes) -> dict[str, Any]:
    outcome: dict[str, Any] = json.loads(body)
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return outcome


@pytest.mark.parametrize("service", SERVICES)
def test_oversized_heads_are_refused(resilient: ResilientStack, service: str) -> None:
    port = _port(resilient, service)
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    cases = {
        "header of 40 KiB": (get + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431),
        "101 header fields": (get + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", 431),
        "request target of 20 KiB": (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    }
    refused = 0
    for name, (head, expected) in cases.items():
        status, headers, body = _exchange(port, head)
        assert status == expected, f"{name}: {status} {body[:200]!r}"
        assert headers.get("connection") == "close", name
        assert _outcome(body)["issue"][0]["code"] == "too-long"
        refused += 1
    if service == "gateway":  # the token endpoint answers in its own language (RFC 6749 §5.2)
        status, _, body = _exchange(port, b"POST /oauth/token HTTP/1.1\r\nHost: x\r\nX-Big: "
                                    + b"a" * 40_000 + b"\r\n\r\n")
        assert status == 431 and json.loads(body)["error"] == "invalid_request"
        refused += 1
    # Within the limits, the same request is served, also after large bodies sent in one write
    # on the same connection (none of their bytes count as head).
    status, _, _ = _exchange(port, get + b"X-Fine: " + b"a" * 8_000 + b"\r\nConnection: close\r\n\r\n")
    assert status == 200
    body = b"x" * 200_000
    post = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    status, _, rest = _exchange(port, post * 2 + get + b"Connection: close\r\n\r\n")
    assert status == 405 and b"HTTP/1.1 200" in rest, rest[-300:]
    _healthy(resilient, service)
    report(f"bad-input limits: oversized heads at {service}", requests=refused + 1,
           refused=refused, served_within_limits=1, fivexx=0)


def test_huge_headers_on_eight_connections_hold_no_memory(resilient: ResilientStack) -> None:
    """The review's attack: a 64 MiB header on each of 8 connections, before any authentication.
    The gateway stops reading at its limit, so neither the bytes nor its memory grow."""
    pid = resilient.pid("gateway")
    before = rss_mib(pid)
    sent: list[int] = []

    def attack() -> None:
        total = 0
        with socket.create_connection(("127.0.0.1", _port(resilient, "gateway")), timeout=30) as sock:
            try:
                sock.sendall(b"GET /fhir/Patient HTTP/1.1\r\nHost: x\r\nX-Big: ")
                chunk = b"a" * MIB
                while total < 64 * MIB:
                    sock.sendall(chunk)
                    total += len(chunk)
            except OSError:
                pass  # refused and closed: the point
        sent.append(total)

    threads = [threading.Thread(target=attack) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    grown = rss_mib(pid) - before
    assert len(sent) == 8
    assert max(sent) < 64 * MIB, f"the gateway read a whole 64 MiB header: {sent}"
    assert grown < 64, f"the gateway grew by {grown:.0f} MiB"
    _healthy(resilient, "gateway")
    report("bad-input limits: 64 MiB headers on 8 connections", connections=8,
           refused=sum(1 for n in sent if n < 64 * MIB), rss_growth_mib=int(grown), fivexx=0)


@pytest.mark.parametrize("service", SERVICES)
def test_slow_heads_are_cut_off(resilient: ResilientStack, service: str) -> None:
    port = _port(resilient, service)
    # A head that stops half way, and one that trickles a byte every half second, forever.
    stalled = _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    trickled = _exchange(port, b"GET /healthz HTTP/1.1\r\n", trickle=b"X-Slow: " + b"a" * 200,
                         every_s=0.5)
    for status, headers, body in (stalled, trickled):
        assert status == 408, body[:200]
        assert headers.get("connection") == "close"
        assert _outcome(body)["issue"][0]["code"] == "timeout"
    # A connection that never sends a byte is closed too.
    assert _exchange(port, b"")[0] == 408
    _healthy(resilient, service)
    report(f"bad-input limits: slow heads at {service}", requests=3, refused=3, fivexx=0)


def test_slow_body_is_answered_408_audited_and_nothing_stored(
        resilient: ResilientStack, fhir: httpx.Client) -> None:
    marker = f"slow-{uuid.uuid4().hex[:10]}"
    body = json.dumps({"resourceType": "Patient", "identifier": [
        {"system": "urn:mindchart:bad-input", "value": marker}]}).encode()
    token = fhir.auth.client.token(fhir.auth.scope)  # type: ignore[attr-defined]
    request_id = f"{marker}-req"
    head = (f"POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/fhir+json\r\nContent-Length: {len(body)}\r\n"
            f"X-Request-ID: {request_id}\r\n\r\n").encode()
    # Half the body, then a byte every second: it would take minutes to arrive.
    status, headers, answer = _exchange(_port(resilient, "gateway"), head + body[:20],
                                        trickle=body[20:], every_s=1.0)
    assert status == 408, answer[:300]
    assert headers.get("connection") == "close"
    assert _outcome(answer)["issue"][0]["code"] == "timeout"
    assert fhir.get("/Patient", params={"identifier": f"urn:mindchart:bad-input|{marker}"}
                    ).json().get("total", 0) == 0
    assert audit_counts(resilient, [request_id])[request_id] == 1  # answered, so audited once

    # Straight at records without a token: answered 401 before the body is read, and the
    # connection still trickling a body is closed soon after the deadline, not held open.
    records_head = (b"POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body))
    status, headers, _ = _exchange(_port(resilient, "records"), records_head + body[:20],
                                   trickle=body[20:], every_s=1.0)
    assert status == 401
    assert int(headers["x-trickled"]) < len(body) - 20, "the connection stayed open for the whole body"
    for service in SERVICES:
        _healthy(resilient, service)
    report("bad-input limits: slow bodies", requests=2, refused=2, stored=0, unaudited=0, fivexx=0)


def test_json_patch_bomb_is_refused_quickly_and_stores_nothing(
        resilient: ResilientStack, fhir: httpx.Client) -> None:
    """The review's bomb: ~1 KB of `copy` operations, each doubling the Patient's name array."""
    created = fhir.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Bomb"}]})
    assert created.status_code == 201, created.text
    path = f"/Patient/{created.json()['id']}"
    bomb = [{"op": "copy", "from": "/name", "path": "/name/-"}] * 40
    pid = resilient.pid("records")
    before = rss_mib(pid)
    answer = fhir.patch(path, content=json.dumps(bomb),
                        headers={"Content-Type": "application/json-patch+json"})
    grown = rss_mib(pid) - before
    assert answer.status_code == 422, answer.text[:300]
    assert answer.json()["issue"][0]["code"] == "too-costly"
    assert grown < 64, f"records grew by {grown:.0f} MiB"
    current = fhir.get(path).json()
    assert current["meta"]["versionId"] == "1" and current["name"] == [{"family": "Bomb"}]
    _healthy(resilient, "records")
    report("bad-input limits: JSON Patch bomb", requests=1, refused=1, stored=0,
           rss_growth_mib=int(grown), fivexx=0)
