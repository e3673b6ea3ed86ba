"""Conditional delete and conditional patch (R4 http.html §conditional-delete, §patch) and
system-level history (`GET [base]/_history`, `?_since=`), through the gateway and records' policy."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import httpx

from tests.actors import mint_token, records_client
from tests.conftest import RunningStack
from tests.records_resources import created_id, outcome, patient, phq9_total

PATCH = {"Content-Type": "application/json-patch+json"}


def test_conditional_delete(fhir: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    one = created_id(fhir.post("/Patient", json=patient(f"Delone{tag}", identifier=[{"system": "urn:t", "value": tag}])))
    fhir.post("/Patient", json=patient(f"Deltwo{tag}"))
    fhir.post("/Patient", json=patient(f"Deltwo{tag}"))
    assert fhir.delete("/Patient", params={"identifier": f"urn:t|{tag}"}).status_code == 204
    outcome(fhir.get(f"/Patient/{one}"), 410, "deleted")
    # Several matches: 412, and nothing deleted.
    outcome(fhir.delete("/Patient", params={"name": f"Deltwo{tag}"}), 412)
    assert len(fhir.get("/Patient", params={"name": f"Deltwo{tag}"}).json()["entry"]) == 2
    # No match: nothing to delete.
    assert fhir.delete("/Patient", params={"identifier": f"urn:t|{tag}"}).status_code == 204
    outcome(fhir.delete("/Patient"), 400)  # criteria are required
    outcome(fhir.delete("/Patient", params={"nonsense": "x"}), 400)


def test_conditional_delete_sees_only_what_the_caller_may(live: RunningStack, fhir: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    mine = created_id(fhir.post("/Patient", json=patient(f"Mine{tag}")))
    theirs = created_id(fhir.post("/Patient", json=patient(f"Theirs{tag}")))
    their_obs = created_id(fhir.post("/Observation", json=phq9_total(theirs)))
    token = mint_token(live, scope="patient/*.cruds", patient=mine, sub="cd-app", client_id="cd-app")
    with records_client(live, token=token) as app:
        deleted = app.delete("/Observation", params={"_id": their_obs})
        assert deleted.status_code == 204  # the same as for no match at all
    assert fhir.get(f"/Observation/{their_obs}").status_code == 200  # still there


def test_conditional_patch(fhir: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    pid = created_id(fhir.post("/Patient", json=patient(f"Patchme{tag}", identifier=[{"system": "urn:t", "value": tag}])))
    ops = [{"op": "replace", "path": "/gender", "value": "female"}]
    patched = fhir.patch("/Patient", params={"identifier": f"urn:t|{tag}"}, json=ops, headers=PATCH)
    assert patched.status_code == 200, patched.text
    assert patched.json()["id"] == pid and patched.json()["gender"] == "female"
    assert patched.json()["meta"]["versionId"] == "2"
    outcome(fhir.patch("/Patient", params={"identifier": f"urn:t|none-{tag}"}, json=ops, headers=PATCH), 404)
    fhir.post("/Patient", json=patient(f"Patchme{tag}"))
    outcome(fhir.patch("/Patient", params={"name": f"Patchme{tag}"}, json=ops, headers=PATCH), 412)


def test_system_history_and_since(live: RunningStack, fhir: httpx.Client) -> None:
    time.sleep(0.01)
    since = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    tag = uuid.uuid4().hex[:8]
    pid = created_id(fhir.post("/Patient", json=patient(f"Hist{tag}")))
    obs = created_id(fhir.post("/Observation", json=phq9_total(pid)))
    assert fhir.delete(f"/Observation/{obs}").status_code in (200, 204)
    recent = fhir.get("/_history", params={"_since": since, "_count": 100}).json()
    assert recent["type"] == "history"
    seen = [(e["request"]["method"], e["fullUrl"].rsplit("/", 2)[-2:]) for e in recent["entry"]]
    mine = [(m, r) for m, r in seen if r[1] in (pid, obs)]
    assert mine == [("DELETE", ["Observation", obs]), ("POST", ["Observation", obs]), ("POST", ["Patient", pid])]
    # Paging walks the same versions, newest first, without repeats.
    walked: list[str] = []
    page = fhir.get("/_history", params={"_since": since, "_count": 1}).json()
    while True:
        walked += [e["fullUrl"] + e["response"]["etag"] for e in page.get("entry", [])]
        nxt = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
        if nxt is None or len(walked) > 50:
            break
        page = fhir.get(nxt).json()
    assert walked == [e["fullUrl"] + e["response"]["etag"] for e in recent["entry"]]
    # A patient-scoped token sees only its compartment in the system history.
    token = mint_token(live, scope="patient/*.rs", patient=pid, sub="h-app", client_id="h-app")
    other = created_id(fhir.post("/Patient", json=patient(f"Histother{tag}")))
    with records_client(live, token=token) as app:
        theirs = app.get("/_history", params={"_since": since, "_count": 100}).json()
    urls = {e["fullUrl"] for e in theirs.get("entry", [])}
    assert f"{live.fhir}/Patient/{pid}" in urls and f"{live.fhir}/Patient/{other}" not in urls
    statement = httpx.get(f"{live.fhir}/metadata").json()
    assert {"code": "history-system"} in statement["rest"][0]["interaction"]
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert resources["Patient"]["conditionalDelete"] == resources["Observation"]["conditionalDelete"] == "single"
