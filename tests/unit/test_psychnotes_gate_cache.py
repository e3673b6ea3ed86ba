"""The consent gate's memory (psychnotes/gate_cache.py), without a server: a remembered consent
token is still refused once it expires, and a basis document is never kept past its interval or
across a revocation made meanwhile. (Across replicas: tests/e2e/test_psychnotes_gate_cache.py.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from joserfc.jwk import ECKey

from psychnotes import consent_token, gate_cache

BASE = "http://127.0.0.1:8000/psychnotes/fhir"
KEY = ECKey.import_key(ECKey.generate_key("P-256").as_dict(private=True), parameters={"kid": "k"})


def mint(expires_in: int) -> str:
    raw, _ = consent_token.mint(
        KEY, base_url=BASE, patient="Patient/a", basis="exception:coroner", client_id="app",
        fhir_user="Practitioner/x", purpose_of_use=["HDECD"], notes=consent_token.NoteScope(),
        expires_at=int(time.time()) + expires_in)
    return raw


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_remembered_consent_token_is_refused_once_it_expires() -> None:
    clock, calls = Clock(), []

    def verify(raw: str) -> consent_token.ConsentToken:
        calls.append(raw)
        return consent_token.verify(raw, KEY, base_url=BASE)

    tokens = gate_cache.VerifiedConsentTokens(clock=clock)
    raw = mint(60)
    first = tokens.verify(raw, verify)
    assert tokens.verify(raw, verify) == first and len(calls) == 1  # the signature checked once
    clock.now += 60 + consent_token.CLOCK_SKEW_SECONDS + 1
    with pytest.raises(consent_token.InvalidConsentToken, match="expired"):
        tokens.verify(raw, verify)
    assert not tokens._tokens  # dropped: the next use is verified afresh (and refused: expired)


def test_a_refused_token_is_not_remembered() -> None:
    tokens = gate_cache.VerifiedConsentTokens()
    forged = mint(60)[:-4] + "AAAA"
    for _ in range(2):
        with pytest.raises(consent_token.InvalidConsentToken, match="signature"):
            tokens.verify(forged, lambda r: consent_token.verify(r, KEY, base_url=BASE))


def test_a_full_memory_keeps_its_bound() -> None:
    tokens = gate_cache.VerifiedConsentTokens(size=3)
    for _ in range(10):
        tokens.verify(mint(60), lambda r: consent_token.verify(r, KEY, base_url=BASE))
    assert len(tokens._tokens) <= 3


def test_a_basis_is_read_again_after_its_interval_and_after_a_revocation() -> None:
    async def scenario() -> None:
        stored: dict[str, Any] = {"_id": "c1", "status": "active"}
        reads = []

        async def load() -> dict[str, Any] | None:
            reads.append(1)
            return dict(stored)

        bases = gate_cache.Bases(ttl=0.2)
        assert (await bases.get("Consent/c1", load))["status"] == "active"
        assert (await bases.get("Consent/c1", load))["status"] == "active"
        assert len(reads) == 1
        stored["status"] = "inactive"  # revoked by another replica
        await asyncio.sleep(0.25)
        assert (await bases.get("Consent/c1", load))["status"] == "inactive"
        stored["status"] = "active"
        bases.forget("Consent/c1")  # changed by this replica: no interval at all
        assert (await bases.get("Consent/c1", load))["status"] == "active"
        assert len(reads) == 3

    asyncio.run(scenario())


def test_a_read_in_flight_during_a_revocation_is_not_remembered() -> None:
    async def scenario() -> None:
        bases = gate_cache.Bases(ttl=60)
        stored = {"_id": "g1", "revoked": False}
        started, release = asyncio.Event(), asyncio.Event()

        async def slow_load() -> dict[str, Any] | None:
            snapshot = dict(stored)  # read before the revocation is written
            started.set()
            await release.wait()
            return snapshot

        async def load() -> dict[str, Any] | None:
            return dict(stored)

        in_flight = asyncio.create_task(bases.get("grant:g1", slow_load))
        await started.wait()
        stored["revoked"] = True
        bases.forget("grant:g1")
        release.set()
        assert (await in_flight)["revoked"] is False  # that request answered as it was
        assert (await bases.get("grant:g1", load))["revoked"] is True  # the next one sees it

    asyncio.run(scenario())


def test_nothing_is_remembered_when_not_found_or_disabled() -> None:
    async def scenario() -> None:
        reads = []

        async def missing() -> dict[str, Any] | None:
            reads.append(1)
            return None

        bases = gate_cache.Bases(ttl=60)
        assert await bases.get("grant:x", missing) is None
        assert await bases.get("grant:x", missing) is None
        off = gate_cache.Bases(ttl=0)

        async def found() -> dict[str, Any] | None:
            reads.append(1)
            return {"_id": "y"}

        await off.get("grant:y", found)
        await off.get("grant:y", found)
        assert len(reads) == 4

    asyncio.run(scenario())
