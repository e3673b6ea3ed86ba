"""The consent gate's memory (psychnotes/gate_cache.py) never outlives a revocation: revoked on
the replica that serves the read, the very next read is refused; revoked on another psychnotes
replica (same datastore), reads here are refused within `gate_cache_seconds` (1 s). Every read
in between is one the replica would have answered a second earlier."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import RunningStack, free_port
from tests.e2e.test_psychnotes import (
    READER_SCOPE,
    assert_audited,
    assert_refused,
    authorization,
    headers,
    marker,
    mint_consent_token,
    parameters,
    patient_token,
    record_consent,
    user_token,
    write_note,
)
from tests.e2e.test_psychnotes_exception_revocation import WHY, officer

GATE_CACHE_SECONDS = 1.0  # PsychnotesSettings.gate_cache_seconds, the documented interval
MARGIN_SECONDS = 4.0  # scheduling on a busy 2-core machine; the bound is still a few seconds


@pytest.fixture(scope="module")
def second_vault(live: RunningStack) -> Iterator[str]:
    """A second psychnotes replica on the same datastore and keys, reached directly."""
    port = free_port()
    log = open(live.runner.log_dir / "psychnotes-second-replica.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "psychnotes.app:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **live.config.service_env("psychnotes"),
             "MINDCHART_PSYCHNOTES_PORT": str(port)},
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "the second psychnotes replica exited; see its log"
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the second psychnotes replica did not start"
            time.sleep(0.2)
        yield f"{url}/psychnotes/fhir"
    finally:
        process.terminate()
        process.wait(timeout=30)


def refused_within(read: Callable[[], httpx.Response],
                   seconds: float = GATE_CACHE_SECONDS + MARGIN_SECONDS) -> tuple[httpx.Response, float]:
    """Read until refused (a change made by another replica is seen within the gate's
    interval); the refusal and how long after the change it came."""
    started = time.monotonic()
    while True:
        response = read()
        if response.status_code != 200:
            return response, time.monotonic() - started
        assert time.monotonic() - started < seconds, (
            f"still released {seconds:.0f} s after the revocation on the other replica")
        time.sleep(0.05)


def test_a_consent_revoked_on_another_replica_stops_reads_here_within_the_interval(
    live: RunningStack, second_vault: str
) -> None:
    patient_id = f"gc-{uuid.uuid4().hex[:6]}"
    therapist = user_token(live, "Practitioner/th-gate-cache")
    text = marker("gatecache")
    note = write_note(live, therapist, patient_id, text)
    patient = patient_token(live, patient_id)
    consent_id = record_consent(live, patient, authorization(
        patient_id, recipient={"reference": "Practitioner/dr-okafor"}, notes=[note]))
    okafor = user_token(live, "Practitioner/dr-okafor", client_id="referral-ehr", scope=READER_SCOPE)
    granted = mint_consent_token(live, okafor, consent_id, purpose="TREAT")

    def read() -> httpx.Response:
        return httpx.get(f"{live.psychnotes}/DocumentReference/{note}",
                         headers=headers(okafor, granted), timeout=30)

    for _ in range(3):  # the serving replica now remembers this token and its Consent
        assert read().status_code == 200

    revoked = httpx.post(f"{second_vault}/Consent/{consent_id}/$revoke", headers=headers(patient),
                         timeout=30)
    assert revoked.status_code == 200 and revoked.json()["status"] == "inactive", revoked.text
    # The replica that recorded the revocation refuses at once.
    assert_refused(httpx.get(f"{second_vault}/DocumentReference/{note}",
                             headers=headers(okafor, granted), timeout=30), 403, text)

    refusal, _ = refused_within(read)
    assert_refused(refusal, 403, text)
    assert_audited(live, refusal, permit=False, reason="revoked")
    assert_refused(read(), 403, text)  # and from then on


def test_an_exception_grant_revoked_on_another_replica_stops_reads_here_within_the_interval(
    live: RunningStack, second_vault: str
) -> None:
    patient_id = f"gc-{uuid.uuid4().hex[:6]}"
    therapist = user_token(live, "Practitioner/th-gate-cache-2")
    text = marker("gatecache2")
    note = write_note(live, therapist, patient_id, text)
    liaison = officer(live, "liaison-gate-cache")
    token = mint_consent_token(live, liaison, basis="coroner",
                               patient={"reference": f"Patient/{patient_id}"}, justification=WHY)

    def read() -> httpx.Response:
        return httpx.get(f"{live.psychnotes}/DocumentReference/{note}",
                         headers=headers(liaison, token), timeout=30)

    assert read().status_code == 200 and read().status_code == 200
    revoked = httpx.post(f"{second_vault}/$revoke-consent-token", headers=headers(liaison),
                         json=parameters(token=token), timeout=30)
    assert revoked.status_code == 200, revoked.text

    refusal, _ = refused_within(read)
    assert_refused(refusal, 403, text)
    assert_audited(live, refusal, permit=False, reason="revoked")


def test_a_revocation_on_the_serving_replica_refuses_the_very_next_read(
    live: RunningStack,
) -> None:
    """No interval at all where the revocation is recorded: the replica forgets what it held."""
    patient_id = f"gc-{uuid.uuid4().hex[:6]}"
    therapist = user_token(live, "Practitioner/th-gate-cache-3")
    text = marker("gatecache3")
    note = write_note(live, therapist, patient_id, text)
    liaison = officer(live, "liaison-gate-cache-3")
    token = mint_consent_token(live, liaison, basis="coroner",
                               patient={"reference": f"Patient/{patient_id}"}, justification=WHY)
    url = f"{live.psychnotes}/DocumentReference/{note}"
    for _ in range(3):
        assert httpx.get(url, headers=headers(liaison, token), timeout=30).status_code == 200
    revoked = httpx.post(f"{live.psychnotes}/$revoke-consent-token", headers=headers(liaison),
                         json=parameters(token=token), timeout=30)
    assert revoked.status_code == 200, revoked.text
    refused = httpx.get(url, headers=headers(liaison, token), timeout=30)
    assert_refused(refused, 403, text)
    assert_audited(live, refused, permit=False, reason="revoked")
