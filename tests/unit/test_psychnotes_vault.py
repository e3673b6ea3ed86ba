"""psychnotes' envelope encryption and consent-token format, without a server."""

from __future__ import annotations

import os
import time

import pytest
from joserfc.jwk import ECKey

from psychnotes import consent_token, keys, vault


def keyring(*keks: bytes) -> keys.Keyring:
    return keys.Keyring(current_id=keys.kek_id(keks[0]), keks={keys.kek_id(k): k for k in keks})


NOTE = {"resourceType": "DocumentReference", "id": "n1", "description": "the lake again"}
BINDING = vault.Binding("DocumentReference", "n1", 1, "Patient/a")


def test_seal_and_open_round_trip_without_plaintext() -> None:
    ring = keyring(os.urandom(32))
    sealed = vault.seal(ring, NOTE, BINDING)
    assert b"the lake" not in bytes(sealed["ct"])
    assert vault.open_sealed(ring, sealed, BINDING) == b'{"resourceType":"DocumentReference","id":"n1","description":"the lake again"}'
    assert vault.seal(ring, NOTE, BINDING)["dek"]["key"] != sealed["dek"]["key"]  # fresh data key


@pytest.mark.parametrize("other", [
    vault.Binding("DocumentReference", "n2", 1, "Patient/a"),
    vault.Binding("DocumentReference", "n1", 2, "Patient/a"),
    vault.Binding("DocumentReference", "n1", 1, "Patient/b"),
    vault.Binding("Consent", "n1", 1, "Patient/a"),
])
def test_a_sealed_note_opens_only_where_it_belongs(other: vault.Binding) -> None:
    ring = keyring(os.urandom(32))
    with pytest.raises(vault.VaultError):
        vault.open_sealed(ring, vault.seal(ring, NOTE, BINDING), other)


def test_rewrap_changes_only_the_wrapped_key() -> None:
    old, new = os.urandom(32), os.urandom(32)
    sealed = vault.seal(keyring(old), NOTE, BINDING)
    both = keyring(new, old)
    rewrapped = vault.rewrap(both, sealed, BINDING)
    assert rewrapped is not None and rewrapped["ct"] == sealed["ct"]
    assert rewrapped["dek"]["kek"] == keys.kek_id(new)
    assert vault.open_sealed(keyring(new), rewrapped, BINDING).startswith(b'{"resourceType"')
    assert vault.rewrap(both, rewrapped, BINDING) is None
    with pytest.raises(vault.VaultError, match="not configured"):
        vault.open_sealed(keyring(os.urandom(32)), rewrapped, BINDING)


def test_a_tampered_ciphertext_fails() -> None:
    ring = keyring(os.urandom(32))
    sealed = vault.seal(ring, NOTE, BINDING)
    flipped = bytes(sealed["ct"])[:-1] + bytes([bytes(sealed["ct"])[-1] ^ 1])
    with pytest.raises(vault.VaultError):
        vault.open_sealed(ring, {**sealed, "ct": flipped}, BINDING)


def test_consent_tokens_verify_only_with_our_key_type_and_audience() -> None:
    key = ECKey.import_key(ECKey.generate_key("P-256").as_dict(private=True), parameters={"kid": "k"})
    raw, minted = consent_token.mint(
        key, base_url="https://x/psychnotes/fhir", patient="Patient/a", basis="Consent/c",
        client_id="app", fhir_user="Practitioner/p", purpose_of_use=["TREAT"],
        notes=consent_token.NoteScope(ids=frozenset({"n1"})), expires_at=int(time.time()) + 60)
    assert consent_token.verify(raw, key, base_url="https://x/psychnotes/fhir") == minted
    other = ECKey.import_key(ECKey.generate_key("P-256").as_dict(private=True), parameters={"kid": "k"})
    for candidate, base in ((key, "https://y/psychnotes/fhir"), (other, "https://x/psychnotes/fhir")):
        with pytest.raises(consent_token.InvalidConsentToken):
            consent_token.verify(raw, candidate, base_url=base)


def test_note_scope_parts_narrow_each_other() -> None:
    from datetime import UTC, datetime

    scope = consent_token.NoteScope(ids=frozenset({"n1"}), start=datetime(2026, 1, 1, tzinfo=UTC),
                                    author="Practitioner/p")
    assert scope.covers("n1", datetime(2026, 5, 1, tzinfo=UTC), "Practitioner/p")
    assert not scope.covers("n2", datetime(2026, 5, 1, tzinfo=UTC), "Practitioner/p")
    assert not scope.covers("n1", datetime(2025, 5, 1, tzinfo=UTC), "Practitioner/p")
    assert not scope.covers("n1", datetime(2026, 5, 1, tzinfo=UTC), "Practitioner/q")
    assert consent_token.NoteScope.from_claims(scope.claims()) == scope.__class__(
        ids=scope.ids, start=scope.start, author=scope.author)
    assert consent_token.NoteScope().claims() == {"all": True}
    with pytest.raises(consent_token.InvalidConsentToken):
        consent_token.NoteScope.from_claims({})
