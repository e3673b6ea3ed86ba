"""Faults under load: kill -9 each datastore and each service while writers run, freeze a
datastore (SIGSTOP) for longer than the datastore timeout. Afterwards every acknowledged write
is readable at its acknowledged version, none is duplicated, versions are consecutive, every
answered request is audited exactly once, the audit chain verifies, and the stack came back by
itself (the supervisor `mindchart run` uses).

The write load covers both datastores holding clinical writes: patients in records, and
psychotherapy notes in psychnotes (created and updated by their author through the gateway, read
back afterwards with a consent token under the originator exception, each acknowledged version
with its text, each write with exactly one permit decision in psychnotes' own trail)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.e2e.test_psychnotes import parameters, psy_note
from tests.resilience.conftest import (
    MONGO_TIMEOUT_S,
    SOAK,
    People,
    ResilientStack,
    SmartSession,
    audit_counts,
    patient,
    report,
    settled_get,
    verify_chain,
)

IDENT = "urn:mindchart:resilience"
NOTE_MARK = "faults-note"  # every psychotherapy note text this test writes starts with it
WRITERS = 4  # records writers; one more writes psychotherapy notes
ROUND_S = 20.0 if SOAK else 1.0  # write load after each fault, before waiting for recovery
ACKED_BEFORE, ACKED_AFTER = 8, 6  # acknowledged creates before the first fault, after each
NOTES_AFTER = 2  # acknowledged psychotherapy-note creates before the next fault
# The gateway's datastore thawed: records answers 200 again within this (the feed's hold is 20 s).
RECOVERY_S = 6.0


@dataclass
class Ledger:
    """What the writers were told: acknowledged creates and versions, and every answer."""

    created: dict[str, str] = field(default_factory=dict)  # identifier value -> id (201)
    attempted: list[str] = field(default_factory=list)  # identifier values of every create sent
    versions: dict[str, int] = field(default_factory=dict)  # id -> highest version answered 2xx
    answered: dict[str, int] = field(default_factory=dict)  # request id -> status
    unaudited_503: set[str] = field(default_factory=set)  # "could not be audited" refusals
    errors: int = 0  # no answer at all (connection refused or reset while a process was down)
    # psychotherapy notes: acknowledged creates (text -> id), every create's text, and the text of
    # each acknowledged version with the request that wrote it
    notes_created: dict[str, str] = field(default_factory=dict)
    notes_attempted: list[str] = field(default_factory=list)
    note_texts: dict[tuple[str, int], str] = field(default_factory=dict)  # (id, version) -> text
    note_writes: dict[str, tuple[str, int]] = field(default_factory=dict)  # request id -> (id, version)
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


def _note_writer(vault: httpx.Client, therapist: SmartSession, patient_id: str, ledger: Ledger,
                 stop: threading.Event) -> None:
    """The patient's therapist writing psychotherapy notes: creates, and updates of their own
    notes without If-Match (each update answered 200 is the next version, ETag W/"n")."""
    mine: list[str] = []
    i = 0
    while not stop.is_set():
        i += 1
        try:
            if mine and i % 2 == 0:
                note_id = mine[i % len(mine)]
                text = f"{NOTE_MARK}-u-{uuid.uuid4().hex[:12]}"
                r = vault.put(f"/DocumentReference/{note_id}", headers=therapist.headers(),
                              json={**psy_note(patient_id, text), "id": note_id})
                ledger.answer(r)
                if r.status_code == 200:
                    version = int(r.headers["etag"].split('"')[1])
                    with ledger.lock:
                        ledger.note_texts[(note_id, version)] = text
                        ledger.note_writes[r.request.headers["X-Request-ID"]] = (note_id, version)
            else:
                text = f"{NOTE_MARK}-c-{uuid.uuid4().hex[:12]}"
                with ledger.lock:
                    ledger.notes_attempted.append(text)
                r = vault.post("/DocumentReference", headers=therapist.headers(),
                               json=psy_note(patient_id, text))
                ledger.answer(r)
                if r.status_code == 201:
                    note_id = r.headers["location"].split("/")[-3]
                    with ledger.lock:
                        ledger.notes_created[text] = note_id
                        ledger.note_texts[(note_id, 1)] = text
                        ledger.note_writes[r.request.headers["X-Request-ID"]] = (note_id, 1)
                    mine.append(note_id)
            if r.status_code >= 500:
                time.sleep(0.1)
        except httpx.HTTPError:
            with ledger.lock:
                ledger.errors += 1
            time.sleep(0.1)


class Load:
    """WRITERS threads creating and updating patients and one creating and updating
    psychotherapy notes, through the gateway until stopped."""

    def __init__(self, fhir: httpx.Client, vault: httpx.Client, people: People, ledger: Ledger) -> None:
        self.ledger = ledger
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=_writer, args=(fhir, ledger, self.stop, n))
                        for n in range(WRITERS)]
        self.threads.append(threading.Thread(target=_note_writer, args=(
            vault, people.therapist, people.patient_id, ledger, self.stop)))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def acknowledged(self, more: int, within_s: float = 90) -> None:
        """Wait until `more` further creates of patients, and of notes, are acknowledged (bounded)."""
        target = len(self.ledger.created) + more
        notes = len(self.ledger.notes_created) + NOTES_AFTER
        deadline = time.monotonic() + within_s
        while ((len(self.ledger.created) < target or len(self.ledger.notes_created) < notes)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert len(self.ledger.created) >= target, "writes did not resume"
        assert len(self.ledger.notes_created) >= notes, "psychotherapy note writes did not resume"


def _check_ledger(resilient: ResilientStack, fhir: httpx.Client, ledger: Ledger) -> dict[str, int]:
    """Every acknowledged write readable at its version; no duplicates; consecutive versions;
    every answered request audited exactly once (bar the audit store's own 503s)."""
    lost = duplicated = gaps = 0
    missing: list[str] = []
    for value in ledger.attempted:
        r = settled_get(fhir, "/Patient", params={"identifier": f"{IDENT}|{value}"})
        assert r.status_code == 200, r.text
        found = [e["resource"]["id"] for e in r.json().get("entry", [])]
        duplicated += max(0, len(found) - 1)
        if value in ledger.created and ledger.created[value] not in found:
            lost += 1
            missing.append(f"{value}->{ledger.created[value]}: "
                           f"{fhir.get('/Patient/' + ledger.created[value]).status_code}")
    for rid, version in ledger.versions.items():
        r = settled_get(fhir, f"/Patient/{rid}/_history/{version}")
        if r.status_code != 200:
            lost += 1
            missing.append(f"{rid} v{version}: {r.status_code}")
            continue
        history = settled_get(fhir, f"/Patient/{rid}/_history", params={"_count": 1000})
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


def _all_pages(vault: httpx.Client, headers: dict[str, str], params: dict[str, str]) -> list[str]:
    """Ids of every note a psychnotes search finds, following its `next` links."""
    found: list[str] = []
    r = settled_get(vault, "/DocumentReference", headers=headers, params=params)
    while True:
        assert r.status_code == 200, r.text
        bundle = r.json()
        found += [e["resource"]["id"] for e in bundle.get("entry", [])]
        following = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
        if not following:
            return found
        r = settled_get(vault, following[0], headers=headers)


def _check_notes(resilient: ResilientStack, vault: httpx.Client, people: People,
                 ledger: Ledger) -> dict[str, int]:
    """Every acknowledged psychotherapy-note version readable with its text, under a consent token
    the author mints (originator exception, 45 CFR 164.508(a)(2)(i)(A)); no note created twice;
    each note's versions consecutive; each acknowledged write has exactly one permit decision in
    psychnotes' trail and every stored version one write decision."""
    minted = vault.post("/$consent-token", headers=people.therapist.headers(), json=parameters(
        basis="originator-treatment", patient={"reference": f"Patient/{people.patient_id}"}))
    assert minted.status_code == 200, minted.text
    consent = next(p["valueString"] for p in minted.json()["parameter"] if p["name"] == "token")
    headers = people.therapist.headers(consent)
    lost, missing = 0, []
    for (note_id, version), text in sorted(ledger.note_texts.items()):
        r = settled_get(vault, f"/DocumentReference/{note_id}/_history/{version}", headers=headers)
        if r.status_code != 200 or r.json().get("description") != text:
            lost += 1
            missing.append(f"{note_id} v{version}: {r.status_code}")
    gaps = 0
    first_texts: Counter[str] = Counter()
    stored: dict[str, int] = {}  # this test's notes, as stored: id -> number of versions
    for note_id in _all_pages(vault, headers, {"patient": people.patient_id, "_count": "100"}):
        history = settled_get(vault, f"/DocumentReference/{note_id}/_history", headers=headers)
        assert history.status_code == 200, history.text
        versions = {int(e["resource"]["meta"]["versionId"]): e["resource"].get("description", "")
                    for e in history.json()["entry"]}
        if not str(versions.get(1, "")).startswith(NOTE_MARK):
            continue  # a note of another test
        first_texts[versions[1]] += 1
        stored[note_id] = len(versions)
        if sorted(versions) != list(range(1, len(versions) + 1)):
            gaps += 1
    trail = resilient.db("psychnotes").decisions
    writes = {"permit": True, "action": {"$in": ["create", "update"]}}
    undecided = sum(1 for rid, (note_id, _) in ledger.note_writes.items() if trail.count_documents(
        {**writes, "request_id": rid, "entities": f"DocumentReference/{note_id}"}) != 1)
    decided: Counter[str] = Counter()
    for decision in trail.find({**writes, "entities": {"$in": [f"DocumentReference/{n}" for n in stored]}},
                               {"entities": 1}):
        decided[decision["entities"][0].split("/", 1)[1]] += 1
    assert not missing, missing[:20]
    return {"note_writes_acknowledged": len(ledger.note_writes), "note_creates": len(ledger.notes_created),
            "notes_lost": lost, "notes_duplicated": sum(n - 1 for n in first_texts.values()),
            "note_version_gaps": gaps, "note_writes_without_decision": undecided,
            "note_versions_stored": sum(stored.values()),
            "note_versions_without_decision": sum(max(0, n - decided[i]) for i, n in stored.items()),
            "unacknowledged_note_creates_stored": sum(1 for t in first_texts if t not in ledger.notes_created)}

TARGETS = ("datastore-records", "records", "datastore-gateway", "gateway",
           "datastore-psychnotes", "psychnotes")


# Six kills, each waited out with bounded waits (ready within 90 s, writes within 90 s): on a
# busy machine that can take longer than the suite's 300 s per test, but never forever.
@pytest.mark.timeout(900)
def test_kill_9_under_write_load_loses_nothing(resilient: ResilientStack, fhir: httpx.Client,
                                               people: People) -> None:
    """One write load throughout; each datastore and each service in turn is killed with -9 a
    moment after writes are being acknowledged, and the load runs on until the supervisor has it
    back and writes are acknowledged again."""
    ledger = Ledger()
    restarts = resilient.watcher.restarts
    vault = httpx.Client(base_url=resilient.psychnotes, timeout=60, event_hooks={"request": [
        lambda request: request.headers.setdefault("X-Request-ID", uuid.uuid4().hex)]})
    with vault:
        with Load(fhir, vault, people, ledger) as load:
            load.acknowledged(ACKED_BEFORE, within_s=60)
            for target in TARGETS:
                killed = resilient.kill(target)
                time.sleep(ROUND_S)  # writes go on while it is down and being restarted
                resilient.wait_ready()
                assert resilient.pid(target) != killed, f"{target} was not restarted: {resilient.events}"
                load.acknowledged(ACKED_AFTER)
        counts = _check_ledger(resilient, fhir, ledger)
        note_counts = _check_notes(resilient, vault, people, ledger)
    verify_chain(resilient)
    report("kill -9 each datastore and service under write load", **counts, **note_counts,
           restarts=resilient.watcher.restarts - restarts)
    assert resilient.watcher.restarts - restarts >= len(TARGETS)
    assert counts["lost_writes"] == 0
    assert counts["duplicated"] == 0
    assert counts["version_gaps"] == 0
    assert counts["unaudited"] == 0
    assert counts["audited_twice"] == 0
    assert counts["5xx"] == 0, {s for s in ledger.answered.values() if s >= 500}
    assert note_counts["notes_lost"] == 0
    assert note_counts["notes_duplicated"] == 0
    assert note_counts["note_version_gaps"] == 0
    assert note_counts["note_writes_without_decision"] == 0
    assert note_counts["note_versions_without_decision"] == 0  # decision and version: one transaction


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
        thawed = time.monotonic()
    resilient.wait_ready()
    # records vouches for revocations again once the gateway's feed answers it, and until then
    # answers 503 (fail closed). The gateway answers the feed request it held through the freeze
    # as soon as its own list is fresh again (its first refresh after the thaw, within a second),
    # so records is back within a few seconds of the thaw: a gateway that left that request held
    # until its hold (20 s) ended would fail here. The bound is the refresh interval, records'
    # pause after a failed request and a loaded machine's scheduling, well under the hold.
    deadline = thawed + RECOVERY_S
    while True:
        r = fhir.get("/Patient", params={"_count": 1})
        ledger.answer(r)
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        assert time.monotonic() < deadline, f"records still answered 503 {RECOVERY_S:g} s after the thaw"
        time.sleep(0.2)
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
