"""The OperationDefinitions of psychnotes' operations, served at `[base]/OperationDefinition/{id}`
and named by the CapabilityStatement's `operation` entries.

R4 operationdefinition.html: `name`, `status`, `kind`, `code`, `system`, `type` and `instance` are
required; each parameter has `name`, `use` (in | out), `min`, `max` and a `type` (opd-1: a type
or parts). `affectsState: false` marks an operation that may also be invoked with GET (R4
operations.html: "operations that do not affect state can be invoked with GET"); statement.py
refuses a GET route for any other. An out parameter named `return` of a resource type is the
response body itself (R4 operations.html "Response").

Ids are `<ResourceType>-<code>` for type and instance operations and `<code>` for system ones,
as the core specification names its own (e.g. `Resource-validate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONSENT_TOKEN_HEADER = "Consent-Token"
JWKS_PATH = "/.well-known/jwks.json"  # psychnotes' document-signing keys (lifecycle/keys.py)


@dataclass(frozen=True)
class Parameter:
    name: str
    use: str  # in | out
    min: int
    max: str
    type: str | None  # None: a parameter made of parts (R4 opd-1: a type or parts)
    documentation: str
    parts: tuple[Parameter, ...] = ()

    def as_fhir(self) -> dict[str, Any]:
        return {"name": self.name, "use": self.use, "min": self.min, "max": self.max,
                **({"type": self.type} if self.type else {}), "documentation": self.documentation,
                **({"part": [p.as_fhir() for p in self.parts]} if self.parts else {})}


@dataclass(frozen=True)
class Operation:
    code: str
    resource: str | None  # None: a system operation at [base]/$code
    instance: bool  # [base]/Type/{id}/$code, else [base]/Type/$code
    title: str
    description: str
    affects_state: bool
    parameters: tuple[Parameter, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.resource}-{self.code}" if self.resource else self.code

    def definition(self, base_url: str) -> dict[str, Any]:
        return {
            "resourceType": "OperationDefinition",
            "id": self.id,
            "url": f"{base_url}/OperationDefinition/{self.id}",
            "name": "".join(w[:1].upper() + w[1:] for w in self.title.replace("-", " ").split()),
            "title": self.title,
            "status": "active",
            "kind": "operation",
            "publisher": "Mindchart",
            "description": self.description,
            "affectsState": self.affects_state,
            "code": self.code,
            **({"resource": [self.resource]} if self.resource else {}),
            "system": self.resource is None,
            "type": self.resource is not None and not self.instance,
            "instance": self.instance,
            **({"parameter": [p.as_fhir() for p in self.parameters]} if self.parameters else {}),
        }


def _in(name: str, kind: str, documentation: str, *, min: int = 0, max: str = "1") -> Parameter:
    return Parameter(name, "in", min, max, kind, documentation)


def _out(name: str, kind: str, documentation: str, *, min: int = 1, max: str = "1") -> Parameter:
    return Parameter(name, "out", min, max, kind, documentation)


_NOTE_SCOPE = (
    _in("note", "Reference", "DocumentReference/<id>: only these notes (default: every note the "
        "basis covers)", max="*"),
    _in("start", "dateTime", "Only notes dated from this date or instant"),
    _in("end", "dateTime", "Only notes dated up to this date or instant"),
)
_TOKEN_OUT = (
    _out("token", "string", f"The consent token (a compact JWS): send it as the "
         f"`{CONSENT_TOKEN_HEADER}` header, next to the access token, on every read"),
    _out("expires", "instant", "When the token stops working (minutes, never past the "
         "authorization's end)"),
    _out("patient", "Reference", "The patient whose notes it opens"),
    _out("basis", "string", "Consent/<id>, or exception:<basis>"),
    _out("purpose", "code", "Purpose of use (v3-ActReason)", max="*"),
)


def _consent_status_change(code: str, title: str, status: str, description: str) -> Operation:
    """An instance operation on a Consent that moves it to `status` and answers with it."""
    return Operation(code, "Consent", True, title, description, affects_state=True,
                     parameters=(_out("return", "Consent", f"The authorization, now {status}"),))


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "sign", "DocumentReference", True, "Sign a psychotherapy note",
        "The note's author signs their draft (docStatus preliminary): it becomes docStatus final, "
        "authenticator the signer, and psychnotes stores (encrypted) a Provenance for that exact "
        "version whose signature is a JWS with a detached payload over the RFC 8785 form of the "
        "plaintext, signed with the key published at [base]" + JWKS_PATH + ". A supervisee's "
        "signature leaves the note preliminary, tagged https://mindchart.dev/fhir/CodeSystem/"
        "awaiting-cosignature with their supervisor; the supervisor's $sign (agent role verifier) "
        "makes it final. Signing a correction (relatesTo replaces) supersedes the note it "
        "corrects. A signed note is locked: PUT and DELETE answer 409. No input; the answer is "
        "200 with no body, its ETag the signed version (read the note with a consent token).",
        affects_state=True),
    Operation(
        "entered-in-error", "DocumentReference", True, "Mark a signed psychotherapy note entered in error",
        "The author of a signed note marks it entered-in-error (docStatus and status) with a "
        "written reason, kept in an encrypted Provenance. It stays readable by id and in its "
        "history; a search leaves it out unless it asks for a status. The answer is 200 with no "
        "body, its ETag the new version.",
        affects_state=True,
        parameters=(_in("reason", "string", "Why the note was entered in error (written, "
                        "a few words at least)", min=1),)),
    Operation(
        "verify-signature", "DocumentReference", True, "Verify the signatures of a psychotherapy note",
        "Checks every signature psychnotes holds for the note against the decrypted stored bytes "
        "of the version it covers. Behind the consent gate like a read (a "
        f"`{CONSENT_TOKEN_HEADER}` covering the note); audited, not a disclosure (no word of the "
        "note leaves).",
        affects_state=False,
        parameters=(
            _out("result", "boolean", "True when every signature verifies"),
            _out("message", "string", "What was checked, or what failed"),
            Parameter("signature", "out", 0, "*", None, "One per signature", parts=(
                _out("provenance", "Provenance", "The signature's Provenance (a reference to it "
                     "when its stored bytes no longer decrypt)"),
                _out("version", "string", "The note version it signs"),
                _out("signer", "Reference", "Who signed", min=0),
                _out("role", "code", "author, or verifier for a supervisor's co-signature", min=0),
                _out("valid", "boolean", "Whether it matches the stored version"),
                _out("message", "string", "What failed", min=0),
            )),
        )),
    _consent_status_change(
        "revoke", "Revoke an authorization", "inactive",
        "45 CFR 164.508(b)(5): the patient, the person who recorded it or the compliance role "
        "revokes an authorization. It becomes inactive and every consent token minted from it is "
        "refused from the next request on. Revoking twice answers the same."),
    _consent_status_change(
        "attest", "Attest an authorization", "active",
        "An authorization recorded by anyone but the patient stays proposed until a second person "
        "with the compliance role attests it; nobody attests their own. It becomes active."),
    Operation(
        "consent-token", "Consent", True, "Mint a consent token from an authorization",
        "A recipient the authorization names (by fhirUser, or a client by its backend tokens) "
        "mints a short-lived consent token for its patient's notes, for a purpose the "
        "authorization allows. Patient-context tokens never read psychotherapy notes.",
        affects_state=True,
        parameters=(_in("purpose", "code", "Purpose of use (v3-ActReason), one the "
                        "authorization allows", min=1), *_NOTE_SCOPE, *_TOKEN_OUT)),
    Operation(
        "consent-token", None, False, "Mint a consent token under a 164.508(a)(2) exception",
        "A consent token without an authorization, on one of the grounds of 45 CFR "
        "164.508(a)(2): originator-treatment (the caller is the notes' author; only their own "
        "notes), or training, legal-defense, hhs, required-by-law, oversight, coroner, "
        "serious-threat (a compliance role and a written justification). Audited as a grant that "
        "$revoke-consent-token can end early.",
        affects_state=True,
        parameters=(
            _in("basis", "code", "originator-treatment | training | legal-defense | hhs | "
                "required-by-law | oversight | coroner | serious-threat", min=1),
            _in("patient", "Reference", "Patient/<id>", min=1),
            _in("purpose", "code", "Purpose of use (v3-ActReason)"),
            _in("justification", "string", "Why (required for every basis but "
                "originator-treatment)"),
            *_NOTE_SCOPE, *_TOKEN_OUT)),
    Operation(
        "revoke-consent-token", None, False, "End an exception grant",
        "Ends a 164.508(a)(2) exception grant at once: every later use of its consent token is "
        "refused. For its grantee or the compliance role. Give jti or token, once.",
        affects_state=True,
        parameters=(
            _in("jti", "string", "The grant: the consent token's jti"),
            _in("token", "string", "The consent token itself (unexpired)"),
            _out("jti", "string", "The grant revoked"),
            _out("basis", "string", "exception:<basis>"),
            _out("patient", "Reference", "The grant's patient"),
            _out("revoked", "boolean", "Always true"),
            _out("revokedBy", "string", "Who revoked it"),
            _out("revokedAt", "instant", "When"),
        )),
)


def find(resource: str | None, code: str) -> Operation | None:
    return next((o for o in OPERATIONS if o.resource == resource and o.code == code), None)


def definitions(base_url: str) -> dict[str, dict[str, Any]]:
    return {o.id: o.definition(base_url) for o in OPERATIONS}


__all__ = ["CONSENT_TOKEN_HEADER", "OPERATIONS", "Operation", "Parameter", "definitions", "find"]
