"""The resilience suite's own stack: it kills and freezes processes, so it never shares the
session's `live` stack. Datastores on disk and durable (as `make run` runs them), datastore calls
bounded by a short timeout so a freeze costs seconds, and the same supervisor as `mindchart run`
restarting whatever dies.

Every test reports its counts (requests, errors, lost writes, unaudited answers, 5xx) with
`report(...)`; they are printed in the terminal summary of every run (`pytest_terminal_summary`).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mindchart_cli import stack, supervisor
from tests.actors import (
    BackendAuth,
    BackendClient,
    create_user,
    register_app,
    register_backend,
    smart_login,
)
from tests.conftest import RunningStack, free_port

MONGO_TIMEOUT_S = 2.5  # MINDCHART_<SERVICE>_MONGO_TIMEOUT_SECONDS in this stack
HEADER_TIMEOUT_S = 3.0  # MINDCHART_HTTP_HEADER_TIMEOUT_SECONDS (slow heads: test_limits.py)
BODY_TIMEOUT_S = 4.0  # MINDCHART_HTTP_BODY_TIMEOUT_SECONDS (slow bodies)
SEND_TIMEOUT_S = 5.0  # MINDCHART_HTTP_SEND_TIMEOUT_SECONDS (slow readers: test_limits_slow_readers.py)
# Refusals before parsing audited one by one per window, then summarised (test_limits_refusal_audit.py)
REFUSAL_AUDIT_PER_WINDOW = 10
REFUSAL_AUDIT_WINDOW_S = 5.0
SOAK = os.environ.get("MINDCHART_SOAK") == "1"  # `make soak`: longer loads, more fuzzing
COUNTS: list[tuple[str, dict[str, int]]] = []


def rss_mib(pid: int) -> float:
    """A process's resident memory (VmRSS in /proc/<pid>/status), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def report(test: str, **counts: int) -> None:
    """Record a test's counts for the terminal summary, and print them (visible with -rA)."""
    COUNTS.append((test, counts))
    print(f"[resilience] {test}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not COUNTS:
        return
    terminalreporter.section("resilience counts")
    for test, counts in COUNTS:
        terminalreporter.write_line(f"{test}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


class ResilientStack(RunningStack):
    """A stack whose processes a test may kill or freeze; the supervisor brings them back."""

    def __init__(self, runner: stack.Stack, watcher: supervisor.Supervisor) -> None:
        super().__init__(runner)
        self.watcher = watcher
        self.events: list[str] = []

    def pid(self, label: str) -> int:
        return self.runner.processes[label].pid

    def kill(self, label: str) -> int:
        """kill -9 one child (its whole process group); the supervisor restarts it."""
        pid = self.pid(label)
        os.killpg(pid, signal.SIGKILL)
        return pid

    def freeze(self, label: str) -> None:
        os.killpg(self.pid(label), signal.SIGSTOP)

    def thaw(self, label: str) -> None:
        os.killpg(self.pid(label), signal.SIGCONT)

    def wait_ready(self, timeout: float = 90) -> None:
        """Every service answers /readyz 200 again (after the supervisor restarted things)."""
        deadline = time.monotonic() + timeout
        pending = set(stack.SERVICES)
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                try:
                    if httpx.get(f"{self.direct_url(name)}/readyz", timeout=2).status_code == 200:
                        pending.discard(name)
                except httpx.HTTPError:
                    pass
            if pending:
                time.sleep(0.3)
        assert not pending, f"not ready again within {timeout}s: {sorted(pending)}\n" + "\n".join(
            self.events[-20:])


@pytest.fixture(scope="session")
def resilient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResilientStack]:
    data_dir = tmp_path_factory.mktemp("mindchart-resilience")
    timeouts = {f"MINDCHART_{name.upper()}_MONGO_TIMEOUT_SECONDS": str(MONGO_TIMEOUT_S)
                for name in stack.SERVICES}
    config = stack.StackConfig(
        data_dir=data_dir,
        http_ports={name: free_port() for name in stack.SERVICES},
        db_ports={name: free_port() for name in stack.SERVICES},
        ephemeral=False,  # on disk and durable, as `make run` runs it
        log_to_files=True,
        extra_env={"MINDCHART_LOG_LEVEL": "INFO", **timeouts,
                   "MINDCHART_GATEWAY_UPSTREAM_TIMEOUT_SECONDS": "20",
                   "MINDCHART_HTTP_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT_S),
                   "MINDCHART_HTTP_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_S),
                   "MINDCHART_HTTP_SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT_S),
                   "MINDCHART_GATEWAY_REFUSAL_AUDIT_PER_WINDOW": str(REFUSAL_AUDIT_PER_WINDOW),
                   "MINDCHART_GATEWAY_REFUSAL_AUDIT_WINDOW_SECONDS": str(REFUSAL_AUDIT_WINDOW_S)},
    )
    runner = stack.Stack(config)
    runner.start()
    events: list[str] = []
    watcher = supervisor.Supervisor(runner, log=events.append, first_pause_s=0.2)
    halt = watcher.run_in_thread()
    running = ResilientStack(runner, watcher)
    running.events = events
    try:
        yield running
    finally:
        halt()
        runner.stop()


@pytest.fixture(scope="session")
def resilient_writer(resilient: ResilientStack, tmp_path_factory: pytest.TempPathFactory) -> BackendClient:
    client = BackendClient("resilience-writer", resilient.gateway_url)
    register_backend(resilient.cli_env, client, "system/*.cruds",
                     tmp=tmp_path_factory.mktemp("resilience-keys"))
    return client


@pytest.fixture(scope="session")
def fhir(resilient: ResilientStack, resilient_writer: BackendClient) -> Iterator[httpx.Client]:
    """A records client through the gateway; every request carries its own X-Request-ID."""
    def tag(request: httpx.Request) -> None:
        request.headers.setdefault("X-Request-ID", uuid.uuid4().hex)

    with httpx.Client(base_url=resilient.fhir, timeout=60,
                      auth=BackendAuth(resilient_writer, "system/*.cruds"),
                      headers={"Content-Type": "application/fhir+json",
                               "Accept": "application/fhir+json"},
                      event_hooks={"request": [tag]}) as client:
        yield client


# -- people signed in through the real SMART launch (the load and the faults tests act as them) ----

APP = "resilience-app"
APP_SCOPE = ("launch/patient openid fhirUser offline_access patient/*.rs user/*.rs "
             "user/DocumentReference.cruds")
PASSWORD = "resilience horse battery staple"


@dataclass
class SmartSession:
    """A user's tokens from the authorization-code flow; a refresh is a token request (SMART App
    Launch 2.2 §refresh-access-token; the gateway rotates the refresh token on every use)."""

    access_token: str
    refresh_token: str
    fhir_user: str

    def refresh_form(self) -> dict[str, str]:
        return {"grant_type": "refresh_token", "client_id": APP, "refresh_token": self.refresh_token}

    def refreshed(self, response: httpx.Response | None) -> None:
        """Keep the new pair from a refresh answered 200 (the old refresh token is spent)."""
        if response is not None and response.status_code == 200:
            body = response.json()
            self.access_token, self.refresh_token = body["access_token"], body["refresh_token"]

    def headers(self, consent: str | None = None) -> dict[str, str]:
        out = {"Authorization": f"Bearer {self.access_token}", "Accept": "application/fhir+json",
               "Content-Type": "application/fhir+json"}
        if consent:
            out["Consent-Token"] = consent
        return out


@dataclass
class People:
    """One practice: a patient (with a user account), a clinician reading records, and a
    therapist on the patient's care team writing psychotherapy notes; each signed in once."""

    patient_id: str
    practitioner_id: str
    patient: SmartSession
    clinician: SmartSession
    therapist: SmartSession  # audience: psychnotes


@pytest.fixture(scope="session")
def people(resilient: ResilientStack, fhir: httpx.Client) -> People:
    suffix = uuid.uuid4().hex[:6]
    patient_id = fhir.post("/Patient", json=patient(f"Loadpatient-{suffix}")).json()["id"]
    practitioner = fhir.post("/Practitioner", json={"resourceType": "Practitioner",
                                                    "name": [{"family": f"Loaddoc-{suffix}"}]})
    assert practitioner.status_code == 201, practitioner.text
    practitioner_id = practitioner.json()["id"]
    team = fhir.post("/CareTeam", json={
        "resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{patient_id}"},
        "participant": [{"member": {"reference": f"Practitioner/{practitioner_id}"}}]})
    assert team.status_code == 201, team.text
    env = resilient.cli_env
    create_user(env, f"pt-{suffix}", PASSWORD, "patient", f"Patient/{patient_id}")
    create_user(env, f"dr-{suffix}", PASSWORD, "practitioner", f"Practitioner/{practitioner_id}")
    register_app(env, APP, APP_SCOPE, audiences=("records", "psychnotes"))

    def login(user: str, scope: str, aud: str) -> SmartSession:
        body = smart_login(resilient.gateway_url, client_id=APP, username=user, password=PASSWORD,
                           scope=scope, aud=aud)
        return SmartSession(body["access_token"], body["refresh_token"], user)

    return People(
        patient_id=patient_id, practitioner_id=practitioner_id,
        patient=login(f"pt-{suffix}", "launch/patient patient/*.rs offline_access", resilient.fhir),
        clinician=login(f"dr-{suffix}", "user/*.rs offline_access", resilient.fhir),
        therapist=login(f"dr-{suffix}", "user/DocumentReference.cruds offline_access",
                        resilient.psychnotes))


def settled_get(client: httpx.Client, url: str, **request: Any) -> httpx.Response:
    """A GET that, answered 503 + Retry-After (the stack's "try again"), is tried again a few
    times, as a client should: checks after a fault read what is stored, not the fault's tail."""
    for _ in range(5):
        response = client.get(url, **request)
        if response.status_code != 503:
            return response
        time.sleep(min(2.0, float(response.headers.get("retry-after", "1"))))
    return response


def audit_counts(running: RunningStack, request_ids: list[str]) -> Counter[str]:
    """How many audit records the gateway holds for each of these request ids."""
    db = running.db("gateway")
    found: Counter[str] = Counter()
    for start in range(0, len(request_ids), 500):
        chunk = request_ids[start:start + 500]
        for doc in db.audit_events.find({"request_id": {"$in": chunk}, "kind": "rest"},
                                        {"request_id": 1}):
            found[doc["request_id"]] += 1
    return found


def verify_chain(running: RunningStack) -> dict[str, Any]:
    import json

    from tests.actors import run_cli

    result = run_cli(running.cli_env, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(json.loads(result.stdout))


def patient(family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}], "active": True}


__all__ = ["BODY_TIMEOUT_S", "HEADER_TIMEOUT_S", "MONGO_TIMEOUT_S", "REFUSAL_AUDIT_PER_WINDOW",
           "REFUSAL_AUDIT_WINDOW_S", "SEND_TIMEOUT_S", "SOAK", "Path", "People",
           "ResilientStack", "SmartSession", "audit_counts", "patient", "report", "settled_get",
           "verify_chain"]
