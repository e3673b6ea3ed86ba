"""Load: mixed reads, searches, writes, token requests and psychotherapy-note reads through the
gateway, over real HTTP, for a fixed time (LOAD_S; longer under `make soak`). Concurrent clients:
two SMART backend services writing and searching (and asking for fresh client_credentials
tokens), a clinician and a patient signed in through the SMART launch reading and searching (and
refreshing their tokens), and a therapist minting consent tokens and reading psychotherapy notes
with them.

Afterwards: no request went unanswered, none was answered 5xx, every response carried a request
id, the gateway's audit trail holds exactly one record for each of those ids (none missing, none
twice), every release of psychotherapy notes is one disclosure record at the gateway and one in
psychnotes, and `mindchart audit verify` passes.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.actors import JWT_BEARER, BackendClient
from tests.e2e.test_psychnotes import parameters, psy_note
from tests.records_resources import phq9_total
from tests.resilience import conftest as rig

LOAD_S = 600.0 if rig.SOAK else 45.0
BACKENDS = 2
TOKEN_EVERY = 25  # each client asks the token endpoint again after this many requests
IDENT = "urn:mindchart:load"


@dataclass
class Tally:
    """Every request the load made, by what it was and how it was answered."""

    statuses: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    request_ids: list[str] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)  # request ids of psychnote reads that released notes
    unanswered: int = 0  # connection refused, reset or timed out
    no_request_id: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, kind: str, http: httpx.Client, method: str, url: str,
             **request: Any) -> httpx.Response | None:
        try:
            response = http.request(method, url, **request)
        except httpx.HTTPError:
            with self.lock:
                self.unanswered += 1
            return None
        rid = response.headers.get("x-request-id")
        with self.lock:
            self.statuses[response.status_code] += 1
            self.kinds[kind] += 1
            if rid:
                self.request_ids.append(rid)
            else:
                self.no_request_id += 1
        return response

    def released(self, response: httpx.Response | None) -> None:
        """A psychnote read that returned note content: the gateway must hold its disclosure."""
        if response is None or response.status_code != 200:
            return
        body = response.json()
        if body.get("resourceType") == "DocumentReference" or body.get("entry"):
            with self.lock:
                self.releases.append(response.headers["x-request-id"])


def _backend(gateway: httpx.Client, writer: BackendClient, tally: Tally, stop: threading.Event) -> None:
    """A SMART backend service: creates patients and PHQ-9 totals, updates, searches by identifier."""
    token = ""
    mine: list[tuple[str, str]] = []
    i = 0
    while not stop.is_set():
        if i % TOKEN_EVERY == 0:
            answer = tally.send("token client_credentials", gateway, "POST", "/oauth/token", data={
                "grant_type": "client_credentials", "scope": "system/*.cruds",
                "client_assertion_type": JWT_BEARER, "client_assertion": writer.assertion()})
            if answer is not None and answer.status_code == 200:
                token = answer.json()["access_token"]
        i += 1
        auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json",
                "Accept": "application/fhir+json"}
        step = i % 5
        if step == 0 or not mine:
            value = uuid.uuid4().hex[:12]
            r = tally.send("create", gateway, "POST", "/fhir/Patient", headers=auth, json={
                **rig.patient(f"load-{value}"), "identifier": [{"system": IDENT, "value": value}]})
            if r is not None and r.status_code == 201:
                mine.append((r.json()["id"], value))
        elif step == 1:
            tally.send("create", gateway, "POST", "/fhir/Observation", headers=auth,
                       json=phq9_total(mine[-1][0], score=i % 28))
        elif step == 2:
            rid, value = mine[i % len(mine)]
            tally.send("update", gateway, "PUT", f"/fhir/Patient/{rid}", headers=auth, json={
                **rig.patient(f"load-{value}-{i}"), "id": rid,
                "identifier": [{"system": IDENT, "value": value}]})
        elif step == 3:
            tally.send("search", gateway, "GET", "/fhir/Patient", headers=auth,
                       params={"identifier": f"{IDENT}|{mine[i % len(mine)][1]}"})
        else:
            tally.send("search", gateway, "GET", "/fhir/Observation", headers=auth,
                       params={"patient": mine[i % len(mine)][0], "code": "44261-6"})


def _turns(gateway: httpx.Client, who: rig.SmartSession, tally: Tally, stop: threading.Event) -> Iterator[int]:
    """1, 2, 3 ... until stopped; every TOKEN_EVERY-th turn first refreshes `who`'s tokens."""
    i = 0
    while not stop.is_set():
        i += 1
        if i % TOKEN_EVERY == 0:
            who.refreshed(tally.send("token refresh", gateway, "POST", "/oauth/token",
                                     data=who.refresh_form()))
        yield i


def _clinician(gateway: httpx.Client, who: rig.SmartSession, tally: Tally, stop: threading.Event) -> None:
    """A practitioner's SMART app (user/*.rs): searches patients and scores, reads patients."""
    for i in _turns(gateway, who, tally, stop):
        if i % 3 == 0:
            tally.send("search", gateway, "GET", "/fhir/Observation", headers=who.headers(),
                       params={"code": "44261-6", "_count": 20})
        elif i % 3 == 1:
            found = tally.send("search", gateway, "GET", "/fhir/Patient", headers=who.headers(),
                               params={"_count": 10})
            entries = found.json().get("entry", []) if found is not None and found.status_code == 200 else []
            if entries:
                tally.send("read", gateway, "GET", f"/fhir/Patient/{entries[i % len(entries)]['resource']['id']}",
                           headers=who.headers())
        else:
            tally.send("read", gateway, "GET", "/fhir/metadata", headers={"Accept": "application/fhir+json"})


def _patient(gateway: httpx.Client, who: rig.SmartSession, patient_id: str, tally: Tally,
             stop: threading.Event) -> None:
    """A patient's SMART app (patient/*.rs): their own record and scores."""
    for i in _turns(gateway, who, tally, stop):
        if i % 2 == 0:
            tally.send("read", gateway, "GET", f"/fhir/Patient/{patient_id}", headers=who.headers())
        else:
            tally.send("search", gateway, "GET", "/fhir/Observation", headers=who.headers(),
                       params={"patient": patient_id})


def _therapist(gateway: httpx.Client, who: rig.SmartSession, patient_id: str, notes: list[str],
               tally: Tally, stop: threading.Event) -> None:
    """The author of the patient's psychotherapy notes, reading them under the originator
    exception (45 CFR 164.508(a)(2)(i)(A)) with a consent token minted every TOKEN_EVERY reads."""
    consent = ""
    i = 0
    base = "/psychnotes/fhir"
    while not stop.is_set():
        if i % TOKEN_EVERY == 0:
            minted = tally.send("consent token", gateway, "POST", f"{base}/$consent-token",
                                headers=who.headers(), json=parameters(
                                    basis="originator-treatment",
                                    patient={"reference": f"Patient/{patient_id}"}))
            if minted is not None and minted.status_code == 200:
                consent = next(p["valueString"] for p in minted.json()["parameter"] if p["name"] == "token")
        i += 1
        note = notes[i % len(notes)]
        if i % 3 == 0:
            r = tally.send("psychnote search", gateway, "GET", f"{base}/DocumentReference",
                           headers=who.headers(consent), params={"patient": patient_id})
        elif i % 3 == 1:
            r = tally.send("psychnote read", gateway, "GET", f"{base}/DocumentReference/{note}",
                           headers=who.headers(consent))
        else:
            r = tally.send("psychnote read", gateway, "GET", f"{base}/DocumentReference/{note}/_history/1",
                           headers=who.headers(consent))
        tally.released(r)


@pytest.mark.timeout(int(LOAD_S) + 600)  # the load's fixed time, then bounded checks
def test_mixed_load_no_5xx_and_one_audit_record_per_request(
        resilient: rig.ResilientStack, resilient_writer: BackendClient, people: rig.People) -> None:
    notes = []
    with httpx.Client(base_url=resilient.gateway_url, timeout=60) as setup:
        for n in range(3):
            written = setup.post("/psychnotes/fhir/DocumentReference", headers=people.therapist.headers(),
                                 json=psy_note(people.patient_id, f"load note {n}: sleeps badly since May"))
            assert written.status_code == 201, written.text
            notes.append(written.headers["location"].split("/")[-3])

    tally = Tally()
    stop = threading.Event()
    clients = [httpx.Client(base_url=resilient.gateway_url, timeout=60) for _ in range(BACKENDS + 3)]
    actors = [threading.Thread(target=_backend, args=(clients[n], resilient_writer, tally, stop))
              for n in range(BACKENDS)]
    actors += [
        threading.Thread(target=_clinician, args=(clients[BACKENDS], people.clinician, tally, stop)),
        threading.Thread(target=_patient, args=(clients[BACKENDS + 1], people.patient,
                                                people.patient_id, tally, stop)),
        threading.Thread(target=_therapist, args=(clients[BACKENDS + 2], people.therapist,
                                                  people.patient_id, notes, tally, stop)),
    ]
    try:
        for actor in actors:
            actor.start()
        stop.wait(LOAD_S)
    finally:
        stop.set()
        for actor in actors:
            actor.join(timeout=120)
        for client in clients:
            client.close()

    counts = rig.audit_counts(resilient, tally.request_ids)
    unaudited = sum(1 for rid in tally.request_ids if counts[rid] == 0)
    duplicated = sum(1 for rid in tally.request_ids if counts[rid] > 1)
    gateway_db, psychnotes_db = resilient.db("gateway"), resilient.db("psychnotes")
    disclosed_at_gateway = Counter(d["request_id"] for d in gateway_db.audit_events.find(
        {"kind": "disclosure", "request_id": {"$in": tally.releases}}, {"request_id": 1}))
    disclosed_in_vault = Counter(d["request_id"] for d in psychnotes_db.disclosures.find(
        {"request_id": {"$in": tally.releases}}, {"request_id": 1}))
    undisclosed = sum(1 for rid in tally.releases
                      if disclosed_at_gateway[rid] != 1 or disclosed_in_vault[rid] != 1)
    rig.verify_chain(resilient)
    five_hundreds = sum(n for status, n in tally.statuses.items() if status >= 500)
    rig.report(f"mixed load for {LOAD_S:.0f}s ({len(actors)} clients)", requests=len(tally.request_ids)
           + tally.no_request_id, **{f"status_{s}": n for s, n in sorted(tally.statuses.items())},
           **{k.replace(" ", "_"): n for k, n in sorted(tally.kinds.items())},
           errors=tally.unanswered, no_request_id=tally.no_request_id, **{"5xx": five_hundreds},
           unaudited=unaudited, duplicated=duplicated, releases=len(tally.releases),
           undisclosed=undisclosed)
    assert tally.unanswered == 0
    assert five_hundreds == 0, tally.statuses
    assert tally.no_request_id == 0
    assert unaudited == 0 and duplicated == 0
    assert undisclosed == 0
    # The load was what it says: every kind of request ran, and almost all of them succeeded.
    assert {"create", "update", "search", "read", "token client_credentials", "token refresh",
            "consent token", "psychnote read", "psychnote search"} <= set(tally.kinds)
    assert tally.releases
    assert sum(n for s, n in tally.statuses.items() if s < 300) == len(tally.request_ids), tally.statuses
