"""The consent gate's memory (psychnotes/gate_cache.py) never outlives a revocation: revoked on
the replica that serves the read, the very next read is refused; revoked on another psychnotes
replica (same datastore), reads here are refused within `gate_cache_seconds` (1 s). Every read
in between is one the replica would have answered a second earlier."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import RunningStack
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
from tests.replicas import Replica, running

GATE_CACHE_SECONDS = 1.0  # PsychnotesSettings.gate_cache_seconds, the documented interval
MARGIN_SECONDS = 4.0  # scheduling on a busy 2-core machine; the bound is still a few seconds


@pytest.fixture(scope="module")
def second_vault(live: RunningStack) -> Iterator[str]:
    """A second psychnotes replica on the same datastore and keys, reached directly."""
    second = Replica("psychnotes", "psychnotes-second-replica")
    with running(live, second):
        yield f"{second.url}/psychnotes/fhir"


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


def coroner_release(live: RunningStack, label: str) -> tuple[str, str, str, str]:
    """A note of a new patient and a liaison officer holding a coroner-exception token for that
    patient (45 CFR 164.508(a)(2)(ii), 164.512(g)(1); psychnotes/policy.py): the note's id, its
    text, the officer's access token and the consent token."""
    patient_id = f"gc-{uuid.uuid4().hex[:6]}"
    text = marker(label.replace("-", ""))
    note = write_note(live, user_token(live, f"Practitioner/th-{label}"), patient_id, text)
    liaison = officer(live, f"liaison-{label}")
    token = mint_consent_token(live, liaison, basis="coroner",
                               patient={"reference": f"Patient/{patient_id}"}, justification=WHY)
    return note, text, liaison, token


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
    note, text, liaison, token = coroner_release(live, "gate-cache-2")

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
    note, text, liaison, token = coroner_release(live, "gate-cache-3")
    url = f"{live.psychnotes}/DocumentReference/{note}"
    for _ in range(3):
        assert httpx.get(url, headers=headers(liaison, token), timeout=30).status_code == 200
    revoked = httpx.post(f"{live.psychnotes}/$revoke-consent-token", headers=headers(liaison),
                         json=parameters(token=token), timeout=30)
    assert revoked.status_code == 200, revoked.text
    refused = httpx.get(url, headers=headers(liaison, token), timeout=30)
    assert_refused(refused, 403, text)
    assert_audited(live, refused, permit=False, reason="revoked")
