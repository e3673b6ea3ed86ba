"""The Provenance that records a signature, and the check that a signed version is unchanged.

R4 Provenance: `target` the note's exact version (`DocumentReference/{id}/_history/{vid}`),
`recorded`, `activity` v3-DocumentCompletion#LA "legally authenticated" (provenance-activity-type,
extensible), `agent` the signer with a provenance-participant-type role (`author` for the author's
signature, `verifier` for a supervisor's co-signature), and `signature` (R4 datatypes.html
#Signature: `type` 1..* from signature-type, i.e. ASTM E1762-95 OIDs, `when` 1..1, `who` 1..1,
`targetFormat`, `sigFormat`, `data` base64).

`signature.data` is records' system signature: a compact JWS with a detached payload over the
RFC 8785 canonical form of that version's stored JSON, exactly as records serves it (id and meta
included: what records attests is that version, byte for byte after canonicalization), signed by
records' own key (lifecycle/keys.py), `kid` naming it in the JWK Set published at
`[base]/.well-known/jwks.json`; Da Vinci CDex signatures.html CONF-029..031 (sigFormat
application/jose, JCS, targetFormat naming the canonicalization).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from mindchart_core import signatures
from records.lifecycle.keys import SigningKeys
from records.store import StoredResource, instant

ACTIVITY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DocumentCompletion",
                        "code": "LA", "display": "legally authenticated"}]}
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
SIGNATURE_TYPE = "urn:iso-astm:E1762-95:2013"
# ASTM E1762-95 signature purposes (R4 valueset-signature-type).
AUTHOR_SIGNATURE = {"system": SIGNATURE_TYPE, "code": "1.2.840.10065.1.12.1.1",
                    "display": "Author's Signature"}
VERIFICATION_SIGNATURE = {"system": SIGNATURE_TYPE, "code": "1.2.840.10065.1.12.1.5",
                          "display": "Verification Signature"}
ROLES = {"author": AUTHOR_SIGNATURE, "verifier": VERIFICATION_SIGNATURE}


def signed_payload(raw: bytes) -> bytes:
    """What the JWS covers: the version's stored JSON in RFC 8785 canonical form."""
    return signatures.canonical(raw)


def provenance(note: StoredResource, signer: str, role: str, keys: SigningKeys, moment: datetime,
               jwks_url: str) -> dict[str, Any]:
    """The Provenance for `signer`'s signature (role `author` or `verifier`) of this version."""
    if note.raw is None:
        raise ValueError("a deleted version cannot be signed")
    jws = signatures.sign_detached(signed_payload(note.raw), keys.current, header={"jku": jwks_url})
    when = instant(moment)
    return {
        "resourceType": "Provenance",
        "target": [{"reference": f"DocumentReference/{note.id}/_history/{note.version}"}],
        "recorded": when,
        "activity": ACTIVITY,
        "agent": [{"type": {"coding": [{"system": PARTICIPANT_TYPE, "code": role}]},
                   "who": {"reference": signer}}],
        "signature": [{
            "type": [ROLES[role]],
            "when": when,
            "who": {"reference": signer},
            "targetFormat": signatures.TARGET_FORMAT,
            "sigFormat": signatures.SIG_FORMAT,
            "data": base64.b64encode(jws.encode()).decode(),
        }],
    }


@dataclass(frozen=True)
class SignedVersion:
    """One signature found in a Provenance: which version it covers, by whom, as what."""

    provenance_id: str
    version: int
    signer: str
    role: str
    jws: str


def signatures_in(provenance_raw: bytes, provenance_id: str, note_id: str) -> list[SignedVersion]:
    """The JWS signatures a stored Provenance carries for versions of DocumentReference/note_id."""
    resource = orjson.loads(provenance_raw)
    versions = []
    for target in resource.get("target") or []:
        parts = str(target.get("reference", "")).split("/")
        if len(parts) >= 4 and parts[-4:-2] == ["DocumentReference", note_id] and parts[-2] == "_history" \
                and parts[-1].isdigit():
            versions.append(int(parts[-1]))
    role = next((c.get("code") for a in resource.get("agent") or []
                 for c in (a.get("type") or {}).get("coding") or []
                 if c.get("system") == PARTICIPANT_TYPE), "author")
    found = []
    for sig in resource.get("signature") or []:
        if sig.get("sigFormat") != signatures.SIG_FORMAT:
            continue
        try:
            jws = base64.b64decode(str(sig.get("data", "")), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            jws = ""
        signer = str((sig.get("who") or {}).get("reference", ""))
        found += [SignedVersion(provenance_id, v, signer, str(role), jws) for v in versions]
    return found


def verify(signed: SignedVersion, raw: bytes | None, keys: SigningKeys) -> str | None:
    """None when the signature verifies over `raw` (the stored version), else why not."""
    if raw is None:
        return f"version {signed.version} is not stored"
    try:
        signatures.verify_detached(signed.jws, signed_payload(raw), keys.all)
    except signatures.SignatureInvalid as problem:
        return f"version {signed.version}: {problem}"
    except (orjson.JSONDecodeError, ValueError):
        return f"version {signed.version}: the stored bytes are not JSON"
    return None


__all__ = [
    "ACTIVITY",
    "AUTHOR_SIGNATURE",
    "VERIFICATION_SIGNATURE",
    "SignedVersion",
    "provenance",
    "signatures_in",
    "signed_payload",
    "verify",
]
