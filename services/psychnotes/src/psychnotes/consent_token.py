"""Consent tokens (shared/DESIGN.md "Consent token"): compact JWS signed by psychnotes' own ES256
key, header `typ: consent+jwt`, sent as the `Consent-Token` request header.

Claims: `iss` and `aud` = the psychnotes base URL; `patient`; `basis` (`Consent/<id>` or
`exception:<basis>`); `grantee` (`client_id`, `fhirUser`); `purpose_of_use` (v3-ActReason codes);
`notes` (which notes: `ids`, a `start`/`end` date range on DocumentReference.date, and for the
originator exception the `author`; every present part must match; `{"all": true}` when an
exception covers every note of the patient); `iat`, `nbf`, `exp`, `jti`.
Verification here is cryptographic and structural only; the live checks (grantee = caller,
authorization still in force, note in scope) are the gate's (policy.py).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

TYP = "consent+jwt"
ALGORITHM = "ES256"
CLOCK_SKEW_SECONDS = 5
MAX_TOKEN_CHARS = 8192
_COMPACT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


class InvalidConsentToken(ValueError):
    """The presented consent token cannot be trusted; the message is the audited reason."""


@dataclass(frozen=True)
class NoteScope:
    """Which notes a token reaches. Every present part must match (they narrow each other)."""

    ids: frozenset[str] | None = None
    start: datetime | None = None
    end: datetime | None = None  # exclusive
    author: str | None = None

    def covers(self, note_id: str, date: datetime, author: str) -> bool:
        if self.ids is not None and note_id not in self.ids:
            return False
        if self.start is not None and date < self.start:
            return False
        if self.end is not None and date >= self.end:
            return False
        return self.author is None or author == self.author

    def claims(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.ids is not None:
            out["ids"] = sorted(self.ids)
        if self.start is not None:
            out["start"] = int(self.start.timestamp())
        if self.end is not None:
            out["end"] = int(self.end.timestamp())
        if self.author is not None:
            out["author"] = self.author
        return out or {"all": True}  # every note of the token's patient, said explicitly

    @classmethod
    def from_claims(cls, claims: Any) -> NoteScope:
        if not isinstance(claims, dict) or not claims:
            raise InvalidConsentToken("the consent token names no notes")
        if claims == {"all": True}:
            return cls()
        ids = claims.get("ids")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise InvalidConsentToken("malformed notes.ids claim")

        def moment(name: str) -> datetime | None:
            value = claims.get(name)
            if value is None:
                return None
            if not isinstance(value, int):
                raise InvalidConsentToken(f"malformed notes.{name} claim")
            return datetime.fromtimestamp(value, UTC)

        author = claims.get("author")
        if author is not None and not isinstance(author, str):
            raise InvalidConsentToken("malformed notes.author claim")
        return cls(ids=frozenset(ids) if ids is not None else None, start=moment("start"),
                   end=moment("end"), author=author)


@dataclass(frozen=True)
class ConsentToken:
    jti: str
    patient: str  # Patient/<id>
    basis: str  # Consent/<id> | exception:<basis>
    client_id: str
    fhir_user: str | None
    purpose_of_use: tuple[str, ...]
    notes: NoteScope
    expires_at: int

    @property
    def consent_id(self) -> str | None:
        return self.basis.removeprefix("Consent/") if self.basis.startswith("Consent/") else None

    @property
    def exception(self) -> str | None:
        return self.basis.removeprefix("exception:") if self.basis.startswith("exception:") else None


def mint(key: ECKey, *, base_url: str, patient: str, basis: str, client_id: str,
         fhir_user: str | None, purpose_of_use: list[str], notes: NoteScope,
         expires_at: int) -> tuple[str, ConsentToken]:
    now = int(time.time())
    token = ConsentToken(jti=uuid.uuid4().hex, patient=patient, basis=basis, client_id=client_id,
                         fhir_user=fhir_user, purpose_of_use=tuple(purpose_of_use), notes=notes,
                         expires_at=expires_at)
    claims = {
        "iss": base_url, "aud": base_url, "iat": now, "nbf": now, "exp": expires_at,
        "jti": token.jti, "patient": patient, "basis": basis,
        "grantee": {"client_id": client_id, "fhirUser": fhir_user},
        "purpose_of_use": list(purpose_of_use), "notes": notes.claims(),
    }
    header = {"alg": ALGORITHM, "typ": TYP, "kid": key.kid}
    return jwt.encode(header, claims, key, algorithms=[ALGORITHM]), token


def verify(raw: str, key: ECKey, *, base_url: str) -> ConsentToken:
    """Signature (our key, ES256 only), typ, issuer, audience, lifetime and claim shapes."""
    if len(raw) > MAX_TOKEN_CHARS or not _COMPACT.match(raw):
        raise InvalidConsentToken("the consent token is not a signed compact JWS")
    try:
        decoded = jwt.decode(raw, key, algorithms=[ALGORITHM])
    except (JoseError, ValueError, TypeError):
        raise InvalidConsentToken("the consent token's signature is not psychnotes'") from None
    header = decoded.header
    if header.get("typ") != TYP:
        raise InvalidConsentToken(f"the token is not a consent token (typ must be {TYP})")
    if header.get("kid") != key.kid:
        raise InvalidConsentToken("the consent token names an unknown key")
    claims = decoded.claims
    try:
        jwt.JWTClaimsRegistry(
            leeway=CLOCK_SKEW_SECONDS,
            iss={"essential": True, "value": base_url},
            aud={"essential": True, "value": base_url},
            exp={"essential": True},
            jti={"essential": True},
        ).validate(claims)
    except JoseError as exc:
        if "exp" in str(exc).lower() or type(exc).__name__ == "ExpiredTokenError":
            raise InvalidConsentToken("the consent token has expired") from None
        raise InvalidConsentToken("the consent token is not for this server") from None
    grantee = claims.get("grantee")
    patient, basis = claims.get("patient"), claims.get("basis")
    purposes = claims.get("purpose_of_use")
    if not (isinstance(grantee, dict) and isinstance(grantee.get("client_id"), str)
            and isinstance(patient, str) and patient.startswith("Patient/")
            and isinstance(basis, str) and basis.startswith(("Consent/", "exception:"))
            and isinstance(purposes, list) and purposes
            and all(isinstance(p, str) for p in purposes)
            and (grantee.get("fhirUser") is None or isinstance(grantee["fhirUser"], str))):
        raise InvalidConsentToken("the consent token lacks required claims")
    return ConsentToken(jti=str(claims["jti"]), patient=patient, basis=basis,
                        client_id=grantee["client_id"], fhir_user=grantee.get("fhirUser"),
                        purpose_of_use=tuple(purposes), notes=NoteScope.from_claims(claims.get("notes")),
                        expires_at=int(claims["exp"]))
