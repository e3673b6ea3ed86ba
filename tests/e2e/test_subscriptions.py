"""Topic-based Subscriptions end to end (issue 17): a real webhook receiver this test starts, the
whole stack on its own (so records can be killed), everything through the gateway as a client
would. Delivery timings are shortened by configuration, never asserted."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.actors import BackendAuth, BackendClient, mint_token, run_cli
from tests.conftest import RunningStack, whole_stack
from tests.records_resources import patient, progress_note

IG = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
TOPIC = "https://mindchart.health/fhir/SubscriptionTopic"
SECRET_HEADER = "Bearer receiver-" + uuid.uuid4().hex


class Receiver:
    """An HTTP server that records every notification POSTed to it; `fail(path, n)` makes the
    next n requests to `path` answer 500."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], dict[str, Any], int]] = []
        self.failures: dict[str, int] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
                with receiver.lock:
                    failing = receiver.failures.get(self.path, 0)
                    receiver.failures[self.path] = max(0, failing - 1)
                    status = 500 if failing else 200
                    receiver.received.append((self.path, dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, path: str, times: int) -> None:
        with self.lock:
            self.failures[path] = times

    def at(self, path: str, kind: str | None = None, *, accepted: bool | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [b for p, _, b, status in self.received if p == path
                    and (kind is None or kind_of(b) == kind) and (accepted is None or (status == 200) == accepted)]

    def headers_at(self, path: str) -> list[dict[str, str]]:
        with self.lock:
            return [h for p, h, _, _ in self.received if p == path]


def parameter(bundle: dict[str, Any], name: str) -> Any:
    params = bundle["entry"][0]["resource"]["parameter"]
    return next((p for p in params if p["name"] == name), None)


def kind_of(bundle: dict[str, Any]) -> str:
    return str(parameter(bundle, "type")["valueCode"])


def event_numbers(bundle: dict[str, Any]) -> list[str]:
    params = bundle["entry"][0]["resource"]["parameter"]
    return [part["valueString"] for p in params if p["name"] == "notification-event"
            for part in p["part"] if part["name"] == "event-number"]


def focus(bundle: dict[str, Any]) -> list[str]:
    params = bundle["entry"][0]["resource"]["parameter"]
    return [part["valueReference"]["reference"] for p in params if p["name"] == "notification-event"
            for part in p["part"] if part["name"] == "focus"]


def wait_for(check: Callable[[], Any], what: str, timeout: float = 40) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# Delivery timings of this stack (shortened by configuration, never asserted).
LEASE_S = 5.0  # MINDCHART_RECORDS_SUBSCRIPTION_LEASE_SECONDS: a dead worker's claim outlives it this long
POLL_S = 0.2  # MINDCHART_RECORDS_SUBSCRIPTION_POLL_SECONDS
RETRY_BASE_S = 0.2  # MINDCHART_RECORDS_SUBSCRIPTION_RETRY_BASE_SECONDS
# A transaction left open by a process killed -9 holds its writes until the datastore reaps it:
# after 60 s idle on SecantusDB (secantus/transactions.py DEFAULT_LIFETIME_SECONDS), as on MongoDB
# (transactionLifetimeLimitSeconds, "less than one minute" by default: MongoDB manual, Transactions:
# Production Considerations, Runtime Limit). Killed inside fan-out's transaction (counter and
# notification of the subscription), records' new process gets WriteConflict on that subscription
# until then (measured: a transaction on the same document commits 60.4 s after the kill).
TRANSACTION_LIFETIME_S = 60.0
# After records is back: the dead transaction reaped and the dead worker's lease run out (both
# counted from the kill, so at most the longer of them), then fan-out, the grant check and the
# POST, each within a few polls; 15 s of that for a machine shared with other suites.
REDELIVERY_WITHIN_S = max(TRANSACTION_LIFETIME_S, LEASE_S) + 15


@pytest.fixture(scope="module")
def subs_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with whole_stack(tmp_path_factory.mktemp("subs-var"), **{
            "MINDCHART_RECORDS_SUBSCRIPTION_RETRY_BASE_SECONDS": str(RETRY_BASE_S),
            "MINDCHART_RECORDS_SUBSCRIPTION_MIN_HEARTBEAT_SECONDS": "1",
            "MINDCHART_RECORDS_SUBSCRIPTION_POLL_SECONDS": str(POLL_S),
            "MINDCHART_RECORDS_SUBSCRIPTION_LEASE_SECONDS": str(LEASE_S),
            "MINDCHART_RECORDS_SUBSCRIPTION_GRANT_CACHE_SECONDS": "0"}) as running:
        yield running


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.server.shutdown()


def register(live: RunningStack, client_id: str, scope: str, endpoints: list[str], tmp: Path,
             client: BackendClient | None = None) -> BackendClient:
    """Register (or, given `client`, re-register with the same key) a backend client."""
    client = client or BackendClient(client_id, live.gateway_url)
    jwks = tmp / f"{client_id}.jwks.json"
    jwks.write_text(json.dumps(client.public_jwks()))
    args = ["client", "create", "--id", client_id, "--auth", "private_key_jwt", "--jwks", str(jwks),
            "--scope", scope, "--audience", "records"]
    for endpoint in endpoints:
        args += ["--subscription-endpoint", endpoint]
    result = run_cli(live.cli_env, *args)
    assert result.returncode == 0, result.stderr
    return client


def fhir(live: RunningStack, client: BackendClient, scope: str = "system/*.cruds") -> httpx.Client:
    return httpx.Client(base_url=live.fhir, timeout=30, auth=BackendAuth(client, scope), headers={
        "Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})


def subscription(endpoint: str, topic: str, content: str, *, filters: list[str] = (),  # type: ignore[assignment]
                 heartbeat: int | None = None, headers: list[str] | None = None) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": f"{IG}/backport-payload-content", "valueCode": content}]}}
    if heartbeat is not None:
        channel["extension"] = [{"url": f"{IG}/backport-heartbeat-period", "valueUnsignedInt": heartbeat}]
    if headers:
        channel["header"] = headers
    body: dict[str, Any] = {
        "resourceType": "Subscription", "meta": {"profile": [f"{IG}/backport-subscription"]},
        "status": "requested", "reason": "tell the EHR about signed notes", "criteria": f"{TOPIC}/{topic}",
        "channel": channel}
    if filters:
        body["_criteria"] = {"extension": [{"url": f"{IG}/backport-filter-criteria", "valueString": f}
                                           for f in filters]}
    return body


def status_of(http: httpx.Client, sub_id: str) -> str:
    return str(http.get(f"/Subscription/{sub_id}").json()["status"])


@pytest.fixture(scope="module")
def ehr(subs_stack: RunningStack, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> BackendClient:
    paths = ["/id-only", "/full", "/heartbeat", "/flaky", "/crash", "/header"]
    return register(subs_stack, "ehr-subscriber", "system/*.cruds",
                    [receiver.url + p for p in paths] + ["https://10.1.2.3/hook"], tmp_path_factory.mktemp("k"))


def new_patient(http: httpx.Client) -> str:
    response = http.post("/Patient", json=patient())
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def subscribe(http: httpx.Client, body: dict[str, Any], receiver: Receiver, path: str) -> str:
    response = http.post("/Subscription", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "requested"
    sub_id = str(created["id"])
    wait_for(lambda: receiver.at(path, "handshake"), f"the handshake at {path}")
    wait_for(lambda: status_of(http, sub_id) == "active", "the subscription to become active")
    return sub_id


def test_topics_are_discoverable_and_readable(subs_stack: RunningStack, ehr: BackendClient) -> None:
    statement = httpx.get(f"{subs_stack.fhir}/metadata").json()
    entry = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Subscription")
    advertised = {e["valueCanonical"] for e in entry["extension"]}
    assert f"{TOPIC}/note-signed" in advertised and f"{TOPIC}/screening-recorded" in advertised
    assert f"{IG}/backport-subscription" in entry["supportedProfile"]
    with fhir(subs_stack, ehr) as http:
        topic = http.get("/Basic/note-signed").json()
        assert topic["code"]["coding"][0]["code"] == "SubscriptionTopic"
        assert {"url": "http://hl7.org/fhir/StructureDefinition/artifact-url",
                "valueUri": f"{TOPIC}/note-signed"} in topic["extension"]


def test_id_only_and_full_resource_get_their_patients_signed_note_and_nothing_else(
        subs_stack: RunningStack, ehr: BackendClient, receiver: Receiver) -> None:
    with fhir(subs_stack, ehr) as http:
        mine, other = new_patient(http), new_patient(http)
        only = [f"DocumentReference?patient=Patient/{mine}"]
        id_only = subscribe(http, subscription(receiver.url + "/id-only", "note-signed", "id-only", filters=only),
                            receiver, "/id-only")
        subscribe(http, subscription(receiver.url + "/full", "note-signed", "full-resource", filters=only),
                  receiver, "/full")
        # A therapist drafts and signs ($sign, records/lifecycle) a note for each patient.
        author = "Practitioner/subs-author"
        token = mint_token(subs_stack, sub="subs-author", fhirUser=f"{subs_stack.fhir}/{author}",
                           scope="user/DocumentReference.cruds user/Provenance.cruds")
        with httpx.Client(base_url=subs_stack.fhir, timeout=30, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}) as therapist:
            signed = {}
            for pid in (other, mine):
                draft = therapist.post("/DocumentReference", json=progress_note(
                    pid, docStatus="preliminary", author=[{"reference": author}]))
                assert draft.status_code == 201, draft.text
                done = therapist.post(f"/DocumentReference/{draft.json()['id']}/$sign")
                assert done.status_code == 200, done.text
                signed[pid] = done.json()
        signed = signed[mine]
        got = wait_for(lambda: receiver.at("/id-only", "event-notification"), "the id-only event")
        full = wait_for(lambda: receiver.at("/full", "event-notification"), "the full-resource event")
        assert [event_numbers(b) for b in got] == [["1"]]
        assert focus(got[0]) == [f"{subs_stack.fhir}/DocumentReference/{signed['id']}/_history/{signed['meta']['versionId']}"]
        assert got[0]["type"] == "history" and "resource" not in got[0]["entry"][1]
        assert parameter(got[0], "subscription")["valueReference"]["reference"].endswith(f"Subscription/{id_only}")
        read = http.get(f"/DocumentReference/{signed['id']}").json()
        assert [event_numbers(b) for b in full] == [["1"]]
        assert full[0]["entry"][1]["resource"] == read  # exactly what a read returns
        # nothing about the other patient reached either endpoint
        assert all(other not in json.dumps(b) for b in receiver.at("/id-only") + receiver.at("/full"))
        events = http.get(f"/Subscription/{id_only}/$events", params={"eventsSinceNumber": "1"}).json()
        assert events["type"] == "history" and event_numbers(events) == ["1"]
        assert parameter(events, "type")["valueCode"] == "query-event"
        status = http.get(f"/Subscription/{id_only}/$status").json()
        assert status["type"] == "searchset"
        assert parameter(status, "events-since-subscription-start")["valueString"] == "1"


def test_heartbeats_arrive_on_the_requested_period(subs_stack: RunningStack, ehr: BackendClient,
                                                   receiver: Receiver) -> None:
    with fhir(subs_stack, ehr) as http:
        subscribe(http, subscription(receiver.url + "/heartbeat", "note-created", "empty", heartbeat=1,
                                     filters=["DocumentReference?patient=Patient/nobody"]), receiver, "/heartbeat")
        beats = wait_for(lambda: len(receiver.at("/heartbeat", "heartbeat")) >= 2 and receiver.at(
            "/heartbeat", "heartbeat"), "two heartbeats")
        assert parameter(beats[0], "status")["valueCode"] == "active"
        assert parameter(beats[0], "topic") is None  # empty payloads carry no topic


def test_a_failing_receiver_gets_the_same_event_number_once_it_recovers(
        subs_stack: RunningStack, ehr: BackendClient, receiver: Receiver) -> None:
    with fhir(subs_stack, ehr) as http:
        pid = new_patient(http)
        sub_id = subscribe(http, subscription(receiver.url + "/flaky", "note-created", "id-only",
                                              filters=[f"DocumentReference?patient=Patient/{pid}"]), receiver, "/flaky")
        receiver.fail("/flaky", 3)
        note = http.post("/DocumentReference", json=progress_note(pid)).json()
        ok = wait_for(lambda: receiver.at("/flaky", "event-notification", accepted=True), "the retried event")
        refused = receiver.at("/flaky", "event-notification", accepted=False)
        assert len(refused) == 3 and {tuple(event_numbers(b)) for b in refused} == {("1",)}
        assert [event_numbers(b) for b in ok] == [["1"]]
        assert focus(ok[0]) == [f"{subs_stack.fhir}/DocumentReference/{note['id']}/_history/1"]
        assert status_of(http, sub_id) == "active"


def test_an_acknowledged_write_is_delivered_after_records_is_killed(
        subs_stack: RunningStack, ehr: BackendClient, receiver: Receiver) -> None:
    with fhir(subs_stack, ehr) as http:
        pid = new_patient(http)
        subscribe(http, subscription(receiver.url + "/crash", "note-created", "id-only",
                                     filters=[f"DocumentReference?patient=Patient/{pid}"]), receiver, "/crash")
        response = http.post("/DocumentReference", json=progress_note(pid))
        assert response.status_code == 201
        subs_stack.runner.kill("records")  # kill -9 right after the acknowledgement
        subs_stack.runner.restart_service("records")  # returns once records' /readyz answers 200
        # When the kill lands inside the fan-out this write started, its transaction
        # blocks the subscription until the datastore reaps it (40 s timed out on a clean-clone run).
        got = wait_for(lambda: receiver.at("/crash", "event-notification", accepted=True),
                       "the event after restart", timeout=REDELIVERY_WITHIN_S)
        assert focus(got[0]) == [f"{subs_stack.fhir}/DocumentReference/{response.json()['id']}/_history/1"]


def test_channel_headers_are_sent_stored_encrypted_and_never_shown(
        subs_stack: RunningStack, ehr: BackendClient, receiver: Receiver) -> None:
    with fhir(subs_stack, ehr) as http:
        sub_id = subscribe(http, subscription(receiver.url + "/header", "note-created", "empty",
                                              filters=["DocumentReference?patient=Patient/none"],
                                              headers=[f"Authorization: {SECRET_HEADER}"]), receiver, "/header")
        assert receiver.headers_at("/header")[0]["Authorization"] == SECRET_HEADER
        shown = http.get(f"/Subscription/{sub_id}").json()
        assert SECRET_HEADER not in json.dumps(shown) and shown["channel"]["header"][0].startswith("Authorization:")
    stored = subs_stack.db("records").subscriptions.find_one({"_id": sub_id})
    assert SECRET_HEADER.encode() not in json.dumps(stored, default=repr).encode()
    assert SECRET_HEADER not in subs_stack.logs()


def test_unregistered_private_or_plain_http_endpoints_are_refused(
        subs_stack: RunningStack, ehr: BackendClient, receiver: Receiver) -> None:
    with fhir(subs_stack, ehr) as http:
        for endpoint in ("https://ehr.example.org/hook", "https://10.1.2.3/hook", receiver.url + "/unregistered"):
            response = http.post("/Subscription", json=subscription(endpoint, "note-created", "id-only"))
            assert response.status_code == 422, (endpoint, response.text)
            assert response.json()["resourceType"] == "OperationOutcome"
        bad = subscription(receiver.url + "/full", "no-such-topic", "id-only")
        assert http.post("/Subscription", json=bad).status_code == 422
        assert http.get("/Subscription", params={"url": "https://10.1.2.3/hook"}).json()["total"] == 0


def test_a_subscriber_whose_scopes_no_longer_cover_the_topic_gets_no_more_payloads(
        subs_stack: RunningStack, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("narrowed")
    payer = register(subs_stack, "payer-subscriber", "system/*.cruds", [receiver.url + "/payer"], tmp)
    with fhir(subs_stack, payer) as http:
        pid = new_patient(http)
        sub_id = subscribe(http, subscription(receiver.url + "/payer", "note-created", "full-resource",
                                              filters=[f"DocumentReference?patient=Patient/{pid}"]), receiver, "/payer")
        http.post("/DocumentReference", json=progress_note(pid))
        wait_for(lambda: receiver.at("/payer", "event-notification"), "the first event")
    # The administrator narrows the payer's registration: notes are no longer covered.
    register(subs_stack, "payer-subscriber", "system/Observation.rs system/Subscription.rs",
             [receiver.url + "/payer"], tmp, client=payer)
    with fhir(subs_stack, payer, "system/Subscription.rs") as reader_http, \
            fhir(subs_stack, register(subs_stack, "payer-writer", "system/*.cruds", [], tmp)) as other:
        assert other.post("/DocumentReference", json=progress_note(pid)).status_code == 201
        wait_for(lambda: status_of(reader_http, sub_id) == "error", "the subscription to stop")
        status = reader_http.get(f"/Subscription/{sub_id}/$status").json()
        assert "no longer permit" in parameter(status, "error")["valueCodeableConcept"]["text"]
    delivered = receiver.at("/payer", "event-notification")
    assert [event_numbers(b) for b in delivered] == [["1"]], [focus(b) for b in delivered]
    assert "subscription_delivery_crashed" not in subs_stack.logs()


def test_a_patient_context_subscription_hears_only_about_its_patient(
        subs_stack: RunningStack, ehr: BackendClient, receiver: Receiver,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A SMART user with patient context subscribes without a patient filter: events are numbered
    and delivered only for that patient, so nothing about others shows, not even as a gap."""
    tmp = tmp_path_factory.mktemp("patient-app")
    register(subs_stack, "patient-app", "patient/*.rs patient/Subscription.cruds", [receiver.url + "/patient"], tmp)
    with fhir(subs_stack, ehr) as http:
        mine, other = new_patient(http), new_patient(http)
        result = run_cli(subs_stack.cli_env, "user", "create", "--username", "alex-subs", "--password",
                         "correct horse battery", "--role", "patient", "--fhir-user", f"Patient/{mine}")
        assert result.returncode == 0, result.stderr
        token = mint_token(subs_stack, sub="alex-subs", client_id="patient-app", patient=mine,
                           fhirUser=f"{subs_stack.fhir}/Patient/{mine}", roles=["patient"],
                           scope="patient/*.rs patient/Subscription.cruds")
        with httpx.Client(base_url=subs_stack.fhir, timeout=30, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}) as app:
            sub_id = subscribe(app, subscription(receiver.url + "/patient", "note-created", "full-resource"),
                               receiver, "/patient")
            assert http.get(f"/Subscription/{sub_id}").status_code == 404  # another client's
            for pid in (other, mine, other, mine):
                assert http.post("/DocumentReference", json=progress_note(pid)).status_code == 201
            # events are numbered in write order: once the second of this patient's notes is
            # in, any event for the other patient's notes written before it would be too
            got = wait_for(lambda: len(receiver.at("/patient", "event-notification")) >= 2 and receiver.at(
                "/patient", "event-notification"), "the patient's two events")
            assert sorted(event_numbers(b)[0] for b in got) == ["1", "2"]
            assert {b["entry"][1]["resource"]["subject"]["reference"] for b in got} == {f"Patient/{mine}"}
            assert other not in json.dumps(got)
            status = app.get(f"/Subscription/{sub_id}/$status").json()
            assert parameter(status, "events-since-subscription-start")["valueString"] == "2"
