"""Requests the HTTP layer refuses before the gateway's application sees them (431, 414, a head
408, a malformed 400) are in the audit trail, one BALP "rest" AuditEvent each with a failure
outcome and the peer's address, never a header value; a flood of them is recorded one by one
only up to a bound per window and summarised beyond it, so it cannot fill the audit store.

Each test speaks from its own loopback address (127.0.0.x: all of 127/8 is local on Linux), so
the trail's records of it are told apart from every other test's by the peer address alone."""

from __future__ import annotations

import json
import random
import socket
import time
from typing import Any

import httpx

from tests.resilience.conftest import (
    HEADER_TIMEOUT_S,
    MONGO_TIMEOUT_S,
    REFUSAL_AUDIT_PER_WINDOW,
    REFUSAL_AUDIT_WINDOW_S,
    ResilientStack,
    report,
    verify_chain,
)

SECRET = "Bearer do-not-log-" + "x" * 40
PATIENCE_S = 4 * REFUSAL_AUDIT_WINDOW_S + 4 * HEADER_TIMEOUT_S + 30


def _peer() -> str:
    return f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}"


def _send(port: int, peer: str, data: bytes) -> int:
    """Send `data` from `peer`, read the answer until the server closes: its status (0: none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(PATIENCE_S)
        sock.bind((peer, 0))
        sock.connect(("127.0.0.1", port))
        answer = b""
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                answer += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _refusal_records(resilient: ResilientStack, peer: str) -> list[dict[str, Any]]:
    """The trail's http-refused records whose client agent is `peer` (or names it in a summary)."""
    db = resilient.db("gateway")
    found = []
    for doc in db.audit_events.find({"kind": "rest", "event.subtype.code": "http-refused"}):
        event = doc["event"]
        details = {d["type"] for e in event["entity"] for d in e.get("detail", [])}
        if event["agent"][0]["network"]["address"] == peer or f"peer {peer}" in details:
            found.append(doc)
    return found


def _summarised(doc: dict[str, Any], peer: str) -> int:
    for entity in doc["event"]["entity"]:
        for detail in entity.get("detail", []):
            if detail["type"] == f"peer {peer}":
                return int(detail["valueString"])
    return 0


def _wait_for(resilient: ResilientStack, peer: str, total: int) -> list[dict[str, Any]]:
    """The records of `peer` once they account for `total` refusals (bounded wait)."""
    deadline = time.monotonic() + PATIENCE_S
    while True:
        records = _refusal_records(resilient, peer)
        one_by_one = [r for r in records if not _summarised(r, peer)]
        if len(one_by_one) + sum(_summarised(r, peer) for r in records) >= total:
            return records
        assert time.monotonic() < deadline, f"{len(records)} records of {total} refusals: {records}"
        time.sleep(0.5)


def test_each_refusal_before_parsing_is_audited_without_header_values(
        resilient: ResilientStack) -> None:
    port = resilient.config.http_ports["gateway"]
    peer = _peer()
    get = b"GET /fhir/Patient HTTP/1.1\r\nHost: x\r\nAuthorization: " + SECRET.encode() + b"\r\n"
    cases = {
        431: get + b"X-Big: " + SECRET.encode() * 1000 + b"\r\n\r\n",
        414: b"GET /fhir/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        408: get,  # the head never ends
        400: get + b"Not a header line\r\n\r\n",
    }
    # A connection that never sends a byte is closed 408 too, but carried no request (a
    # browser's preconnect): not audited. It goes first, so its record would be there by now.
    assert _send(port, peer, b"") == 408
    for expected, data in cases.items():
        assert _send(port, peer, data) == expected, expected
    records = _wait_for(resilient, peer, len(cases))
    assert len(records) == len(cases), records
    one_by_one = [r for r in records if not _summarised(r, peer)]
    # All four one by one, unless earlier tests spent this window's bound (then the rest are in
    # a summary, counted).
    assert one_by_one and len(one_by_one) + sum(_summarised(r, peer) for r in records) == len(cases)
    if len(one_by_one) == len(cases):
        assert sorted(r["status"] for r in one_by_one) == sorted(cases)
    for record in records:
        event = record["event"]
        assert event["type"]["code"] == "rest"
        assert event["outcome"] == "4"  # minor failure: the client's fault
        assert event["outcomeDesc"]
        assert event["agent"][0]["network"] == {"address": peer, "type": "2"}
        text = json.dumps(record, default=str)
        assert "do-not-log" not in text and "Not a header line" not in text
    report("bad-input limits: refusals before parsing audited", requests=len(cases),
           audited=len(records), header_values_recorded=0, fivexx=0)


def test_a_flood_of_refusals_is_summarised_beyond_the_bound(resilient: ResilientStack) -> None:
    port = resilient.config.http_ports["gateway"]
    peer = _peer()
    flood = 6 * REFUSAL_AUDIT_PER_WINDOW
    for _ in range(flood):
        assert _send(port, peer, b"NOT HTTP AT ALL\r\n\r\n") == 400
    records = _wait_for(resilient, peer, flood)
    summaries = [r for r in records if _summarised(r, peer)]
    one_by_one = [r for r in records if not _summarised(r, peer)]
    assert summaries, "nothing was summarised"
    assert len(one_by_one) + sum(_summarised(r, peer) for r in summaries) == flood
    # The flood cost far fewer records than requests.
    assert len(records) < flood / 2, len(records)
    for summary in summaries:
        assert "not recorded one by one" in summary["event"]["outcomeDesc"]
    assert httpx.get(f"{resilient.direct_url('gateway')}/readyz", timeout=10).status_code == 200
    report("bad-input limits: a flood of malformed requests", requests=flood,
           audit_records=len(records), one_by_one=len(one_by_one), summaries=len(summaries),
           fivexx=0)


def test_refusals_during_an_audit_store_outage_are_recorded_after_it(
        resilient: ResilientStack) -> None:
    """The audit store frozen (SIGSTOP) past its timeouts: refusals are still answered at once,
    and their records are written when it answers again, none lost."""
    port = resilient.config.http_ports["gateway"]
    peer = _peer()
    resilient.freeze("datastore-gateway")
    try:
        for _ in range(3):
            assert _send(port, peer, b"NOT HTTP AT ALL\r\n\r\n") == 400
        time.sleep(3 * MONGO_TIMEOUT_S)  # the outage: writes of them fail and are kept
    finally:
        resilient.thaw("datastore-gateway")
    records = _wait_for(resilient, peer, 3)
    assert len(records) + sum(_summarised(r, peer) for r in records) >= 3
    assert sum(1 for r in records if not _summarised(r, peer)) + sum(
        _summarised(r, peer) for r in records) == 3
    resilient.wait_ready()
    verify_chain(resilient)  # the trail verifies with them in it, none written twice
    report("bad-input limits: refusals while the audit store is frozen", requests=3, audited=3,
           lost=0, fivexx=0)
