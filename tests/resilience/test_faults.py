"""Faults under load: kill -9 each datastore and each service while writers run, freeze a
datastore (SIGSTOP) for longer than the datastore timeout. Afterwards every acknowledged write
is readable at its acknowledged version, none is duplicated, versions are consecutive, every
answered request is audited exactly once, the audit chain verifies, and the stack came back by
itself (the supervisor `mindchart run` uses)."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.resilience.conftest import (
    MONGO_TIMEOUT_S,
    SOAK,
    ResilientStack,
    audit_counts,
    patient,
    report,
    verify_chain,
)

IDENT = "urn:mindchart:resilience"
WRITERS = 4
ROUND_S = 20.0 if SOAK else 1.0  # write load after each fault, before waiting for recovery
ACKED_BEFORE, ACKED_AFTER = 8, 6  # acknowledged creates before the first fault, after each


@dataclass
class Ledger:
    """What the writers were told: acknowledged creates and versions, and every answer."""

    created: dict[str, str] = field(default_factory=dict)  # identifier value -> id (201)
    attempted: list[str] = field(default_factory=list)  # identifier values of every create sent
    versions: dict[str, int] = field(default_factory=dict)  # id -> highest version answered 2xx
    answered: dict[str, int] = field(default_factory=dict)  # request id -> status
    unaudited_503: set[str] = field(default_factory=set)  # "could not be audited" refusals
    errors: int = 0  # no answer at all (connection refused or reset while a process was down)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, response: httpx.Response) -> None:
        rid = response.request.headers["X-Request-ID"]
        with self.lock:
            self.answered[rid] = response.status_code
            if response.status_code == 503 and "could not be audited" in response.text:
                self.unaudited_503.add(rid)


def _writer(client: httpx.Client, ledger: Ledger, stop: threading.Event, n: int) -> None:
    mine: list[tuple[str, str]] = []  # (id, identifier value) of the patients this writer made
    i = 0
    while not stop.is_set():
        i += 1
        try:
            if mine and i % 2 == 0:  # update one of ours (no If-Match: each update is a version)
                rid, value = mine[i % len(mine)]
                r = client.put(f"/Patient/{rid}", json={**patient(f"w{n}-{i}"), "id": rid,
                                                        "identifier": [{"system": IDENT, "value": value}]})
                ledger.answer(r)
                if r.status_code in (200, 201):
                    version = int(r.json()["meta"]["versionId"])
                    with ledger.lock:
                        ledger.versions[rid] = max(version, ledger.versions.get(rid, 0))
            else:
                value = f"c-{uuid.uuid4().hex[:12]}"
                with ledger.lock:
                    ledger.attempted.append(value)
                r = client.post("/Patient", json={**patient(f"w{n}-{i}"),
                                                  "identifier": [{"system": IDENT, "value": value}]})
                ledger.answer(r)
                if r.status_code == 201:
                    body = r.json()
                    with ledger.lock:
                        ledger.created[value] = body["id"]
                        ledger.versions[body["id"]] = max(1, ledger.versions.get(body["id"], 0))
                    mine.append((body["id"], value))
            if r.status_code >= 500:
                time.sleep(0.1)  # a bounded load: no tight loop against a part that is down
        except httpx.HTTPError:
            with ledger.lock:
                ledger.errors += 1
            time.sleep(0.1)


class Load:
    """WRITERS threads creating and updating patients through the gateway until stopped."""

    def __init__(self, fhir: httpx.Client, ledger: Ledger) -> None:
        self.ledger = ledger
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=_writer, args=(fhir, ledger, self.stop, n))
                        for n in range(WRITERS)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def acknowledged(self, more: int, within_s: float = 90) -> None:
        """Wait until `more` further creates are acknowledged (bounded)."""
        target = len(self.ledger.created) + more
        deadline = time.monotonic() + within_s
        while len(self.ledger.created) < target and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.ledger.created) >= target, "writes did not resume"


def _check_ledger(resilient: ResilientStack, fhir: httpx.Client, ledger: Ledger) -> dict[str, int]:
    """Every acknowledged write readable at its version; no duplicates; consecutive versions;
    every answered request audited exactly once (bar the audit store's own 503s)."""
    lost = duplicated = gaps = 0
    missing: list[str] = []
    for value in ledger.attempted:
        r = fhir.get("/Patient", params={"identifier": f"{IDENT}|{value}"})
        assert r.status_code == 200, r.text
        found = [e["resource"]["id"] for e in r.json().get("entry", [])]
        duplicated += max(0, len(found) - 1)
        if value in ledger.created and ledger.created[value] not in found:
            lost += 1
            missing.append(f"{value}->{ledger.created[value]}: "
                           f"{fhir.get('/Patient/' + ledger.created[value]).status_code}")
    for rid, version in ledger.versions.items():
        r = fhir.get(f"/Patient/{rid}/_history/{version}")
        if r.status_code != 200:
            lost += 1
            missing.append(f"{rid} v{version}: {r.status_code}")
            continue
        history = fhir.get(f"/Patient/{rid}/_history", params={"_count": 1000})
        assert history.status_code == 200, history.text
        seen = sorted(int(e["resource"]["meta"]["versionId"]) for e in history.json()["entry"])
        if seen != list(range(1, len(seen) + 1)):
            gaps += 1
    counts = audit_counts(resilient, list(ledger.answered))
    unaudited = sum(1 for rid in ledger.answered
                    if counts[rid] == 0 and rid not in ledger.unaudited_503)
    twice = sum(1 for rid in ledger.answered if counts[rid] > 1)
    five_hundreds = sum(1 for s in ledger.answered.values() if s >= 500 and s not in (502, 503, 504))
    assert not missing, missing[:20]
    return {"requests": len(ledger.answered), "errors": ledger.errors,
            "acknowledged_creates": len(ledger.created), "lost_writes": lost,
            "duplicated": duplicated, "version_gaps": gaps, "unaudited": unaudited,
            "audited_twice": twice, "audit_store_503": len(ledger.unaudited_503),
            "5xx": five_hundreds}


TARGETS = ("datastore-records", "records", "datastore-gateway", "gateway",
           "datastore-psychnotes", "psychnotes")


def test_kill_9_under_write_load_loses_nothing(resilient: ResilientStack, fhir: httpx.Client) -> None:
    """One write load throughout; each datastore and each service in turn is killed with -9 a
    moment after writes are being acknowledged, and the load runs on until the supervisor has it
    back and writes are acknowledged again."""
    ledger = Ledger()
    restarts = resilient.watcher.restarts
    with Load(fhir, ledger) as load:
        load.acknowledged(ACKED_BEFORE, within_s=60)
        for target in TARGETS:
            killed = resilient.kill(target)
            time.sleep(ROUND_S)  # writes go on while it is down and being restarted
            resilient.wait_ready()
            assert resilient.pid(target) != killed, f"{target} was not restarted: {resilient.events}"
            load.acknowledged(ACKED_AFTER)
    counts = _check_ledger(resilient, fhir, ledger)
    verify_chain(resilient)
    report("kill -9 each datastore and service under write load", **counts,
           restarts=resilient.watcher.restarts - restarts)
    assert resilient.watcher.restarts - restarts >= len(TARGETS)
    assert counts["lost_writes"] == 0
    assert counts["duplicated"] == 0
    assert counts["version_gaps"] == 0
    assert counts["unaudited"] == 0
    assert counts["audited_twice"] == 0
    assert counts["5xx"] == 0, {s for s in ledger.answered.values() if s >= 500}


def test_frozen_datastore_answers_503_then_recovers(resilient: ResilientStack,
                                                    fhir: httpx.Client) -> None:
    """SIGSTOP records' datastore for longer than the timeouts: reads and writes answer a 503
    OperationOutcome with Retry-After (not a hang), records' /readyz says 503; after SIGCONT the
    same requests succeed without anything being restarted."""
    created = fhir.post("/Patient", json=patient("frozen"))
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    restarts = resilient.watcher.restarts
    statuses: list[int] = []
    resilient.freeze("datastore-records")
    try:
        for _ in range(2):
            for r in (fhir.get(f"/Patient/{rid}"), fhir.post("/Patient", json=patient("frozen2"))):
                statuses.append(r.status_code)
                assert r.status_code == 503, r.text
                assert r.json()["resourceType"] == "OperationOutcome"
                assert r.headers["retry-after"].isdigit()
        ready = httpx.get(f"{resilient.direct_url('records')}/readyz", timeout=MONGO_TIMEOUT_S * 10)
        assert ready.status_code == 503
        gateway_ready = httpx.get(f"{resilient.direct_url('gateway')}/readyz", timeout=10)
        assert gateway_ready.status_code == 200  # only records' datastore is frozen
    finally:
        resilient.thaw("datastore-records")
    resilient.wait_ready()
    after = fhir.get(f"/Patient/{rid}")
    assert after.status_code == 200, after.text
    assert resilient.watcher.restarts == restarts
    report("SIGSTOP datastore-records", requests=len(statuses) + 1,
           answered_503=statuses.count(503), **{"5xx": sum(s >= 500 and s != 503 for s in statuses)})


def test_frozen_audit_store_never_answers_unaudited(resilient: ResilientStack,
                                                    fhir: httpx.Client) -> None:
    """SIGSTOP the gateway's datastore (audit trail, clients, keys): every answer is a 503 with
    a request id, never a 500 or an unaudited success; afterwards every request that was not so
    refused is audited exactly once and the chain verifies."""
    fhir.get("/metadata")  # a token is in hand before the freeze
    ledger = Ledger()
    resilient.freeze("datastore-gateway")
    try:
        for _ in range(3):
            r = fhir.get("/Patient", params={"_count": 1})
            ledger.answer(r)
            assert r.status_code == 503, r.text
            assert r.headers.get("x-request-id")
            assert r.headers["retry-after"].isdigit()
        ready = httpx.get(f"{resilient.direct_url('gateway')}/readyz", timeout=10)
        assert ready.status_code == 503
    finally:
        resilient.thaw("datastore-gateway")
    resilient.wait_ready()
    for _ in range(5):
        r = fhir.get("/Patient", params={"_count": 1})
        ledger.answer(r)
        assert r.status_code == 200, r.text
    counts = audit_counts(resilient, list(ledger.answered))
    unaudited = [rid for rid in ledger.answered if counts[rid] == 0 and rid not in ledger.unaudited_503]
    verify_chain(resilient)
    report("SIGSTOP datastore-gateway", requests=len(ledger.answered),
           audit_store_503=len(ledger.unaudited_503), unaudited=len(unaudited),
           **{"5xx": sum(s >= 500 and s != 503 for s in ledger.answered.values())})
    assert not unaudited
    assert all(counts[rid] <= 1 for rid in ledger.answered)
