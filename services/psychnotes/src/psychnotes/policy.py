"""The consent gate: who may record, attest, receive and read, and what a token releases.

Every rule cites its source (45 CFR Part 164 as digested in shared/STANDARDS.md §6):
- 164.508(a)(2): any use or disclosure of psychotherapy notes needs the patient's authorization,
  except the listed grounds (`EXCEPTIONS`); a disclosure for treatment to *another* provider
  still needs one. So a token is minted only from an authorization in force or an exception.
- 164.508(c)(1)(iii): the authorization names who may receive: a person matched by `fhirUser`,
  an app (client id) only through its own backend tokens (`is_recipient`).
- 164.508(b)(2): a covered entity may not rely on a defective authorization (expired, revoked,
  known false): one recorded by anyone but the patient is attested by a second person with the
  compliance role before it takes effect (`check_attestation`), and nobody receives under an
  authorization they recorded.
- 164.508(b)(5): the patient may revoke at any time; revocation takes effect at once on the replica
  that records it and within `gate_cache_seconds` (1 s) on the others (`may_revoke`;
  `check_token_in_force` reads the stored Consent through gate_cache.Bases).
- 164.524(a)(1)(i): the right of access excludes psychotherapy notes: a patient-context token
  never reads them and a Consent cannot name its own patient (`is_patient_context`).
- 164.501: the notes are the treating professional's; who treats whom is records' CareTeam
  (careteam.py), never inferred from having written a note.

A refusal is a `Refusal` carrying the reason that is audited (the
client sees the same text: reasons never mention notes the caller cannot see).

Minting (shared/DESIGN.md "Consent token"):
- from a Consent: the authorization is in force (active, within its period), names the caller as
  a recipient (fhirUser, or client_id), authorizes the requested purpose, and covers the requested
  notes; the token's note scope is the authorization's narrowed by the request, its `exp` at most
  `consent_token_minutes` away and never past the authorization's end;
- from a 45 CFR 164.508(a)(2) exception (`EXCEPTIONS`): originator-treatment only for the notes'
  author and only their own notes (scope `author`); every other basis needs the `compliance` role
  in the access token and a written justification, kept in `exception_grants`.

Reading: the token verifies (consent_token.verify, remembered per token until its exp), its
grantee is this request's caller (client_id and fhirUser of the verified access token), its basis
is still in force now (the stored Consent, at most `gate_cache_seconds` old and re-read at once
after this replica changes it; an exception grant must still exist and not be revoked,
`$revoke-consent-token`; gate_cache.py), and each note returned is the token's patient's and
inside the token's note scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mindchart_core import errors
from mindchart_core.tokens import AccessToken
from psychnotes import gate_cache, store
from psychnotes.consent import Authorization
from psychnotes.consent_token import ConsentToken, NoteScope

COMPLIANCE_ROLE = "compliance"
ORIGINATOR = "originator-treatment"
# 164.508(a)(2) exceptions -> the v3-ActReason purpose recorded for each. Each code checked
# against http://terminology.hl7.org/CodeSystem/v3-ActReason (THO, v3-ActReason 2.1.0, the
# _ActHealthInformationManagementReason / PurposeOfUse concepts): TREAT "treatment", TRAIN
# "training", HLEGAL "legal", HCOMPL "health compliance", HDECD "decedent", THREAT "threat".
EXCEPTIONS: dict[str, str] = {
    ORIGINATOR: "TREAT",            # (a)(2)(i)(A) the originator's own treatment use
    "training": "TRAIN",            # (a)(2)(i)(B) supervised mental-health training programs
    "legal-defense": "HLEGAL",      # (a)(2)(i)(C) defending a legal action by the individual
    "hhs": "HCOMPL",                # (a)(2)(ii) 164.502(a)(2)(ii): the HHS Secretary
    "required-by-law": "HLEGAL",    # (a)(2)(ii) 164.512(a)
    "oversight": "HCOMPL",          # (a)(2)(ii) 164.512(d): oversight of the originator
    "coroner": "HDECD",             # (a)(2)(ii) 164.512(g)(1)
    "serious-threat": "THREAT",     # (a)(2)(ii) 164.512(j)(1)(i)
}


class Refusal(errors.FhirError):
    """403 forbidden, audited with `diagnostics` as the reason."""

    status, code = 403, "forbidden"


class TokenRefusal(errors.FhirError):
    """401: the consent token presented cannot be trusted (forged, expired, not ours)."""

    status, code = 401, "login"

    def __init__(self, diagnostics: str) -> None:
        super().__init__(diagnostics, headers={
            "WWW-Authenticate": 'Consent-Token error="invalid_token"'})


@dataclass(frozen=True)
class NoteRequest:
    """The notes a mint request asks for (all optional: absent means what the basis allows)."""

    ids: frozenset[str] | None = None
    start: datetime | None = None
    end: datetime | None = None


def caller_user(token: AccessToken) -> str | None:
    return token.fhir_user_ref


def caller_key(token: AccessToken) -> str:
    """Who the caller is, as a Consent names parties: the user's fhirUser, else `client:<id>`."""
    return caller_user(token) or f"client:{token.client_id}"


def is_patient_context(token: AccessToken) -> bool:
    """A token acting for a patient: `patient/` scopes, a `patient` launch context, or a patient
    user. 45 CFR 164.524(a)(1)(i): the individual's right of access excludes psychotherapy notes,
    so such a token never reads them, whatever a Consent says."""
    user = caller_user(token) or ""
    return bool(token.patient) or "patient" in token.scope.contexts() or user.startswith("Patient/")


def is_backend(token: AccessToken) -> bool:
    """A SMART Backend Services token: no user, no patient, system/ scopes only."""
    return (caller_user(token) is None and not token.patient
            and token.scope.contexts() == {"system"})


def is_recipient(auth: Authorization, token: AccessToken) -> bool:
    """Whether this authorization names the caller as recipient (45 CFR 164.508(c)(1)(iii): "the
    name or other specific identification of the person(s) ... to whom the covered entity may
    make the requested use or disclosure").

    - a person is matched by the token's `fhirUser`, never by the app they use;
    - a client id (`client:<id>`) is matched only by that client's own backend tokens: a user
      signed in to that app is not the app, so naming an app never opens notes to its users;
    - a patient-context token is never a recipient (164.524(a)(1)(i));
    - whoever recorded the authorization never receives under it (the two-person rule: an
      authorization must be verified by someone other than the one it benefits).
    """
    if is_patient_context(token) or auth.recorded_by == caller_key(token):
        return False
    user = caller_user(token)
    if user is not None:
        return user in auth.recipients
    return is_backend(token) and f"client:{token.client_id}" in auth.recipients


def consent_reader(auth: Authorization, token: AccessToken) -> str | None:
    """Who may read a Consent, as the role they read it in; None for anyone else (404). The
    authorization names what the patient wants kept private (164.508(c)(1)(i)), so it is shown
    to its patient, its recorder, its attester, the recipients it names (is_recipient) and the
    compliance role, and to no one else: not to other clinicians, not to other users of an app
    it names."""
    if is_own_patient(auth.patient, token):
        return "patient"
    key = caller_key(token)
    if auth.recorded_by == key:
        return "recorder"
    if auth.attested_by is not None and auth.attested_by == key:
        return "attester"
    if is_recipient(auth, token):
        return "recipient"
    if COMPLIANCE_ROLE in token.roles:
        return "compliance officer"
    return None


def is_own_patient(patient: str, token: AccessToken) -> bool:
    """The token is the patient's own (their launch context or their fhirUser)."""
    return (bool(token.patient) and f"Patient/{token.patient}" == patient) or (
        caller_user(token) == patient)


def may_revoke(auth: Authorization, token: AccessToken) -> str | None:
    """45 CFR 164.508(b)(5): the individual may revoke an authorization at any time (in writing);
    the recorder (who entered it, and enters the written revocation) and the compliance role
    may record the revocation too. Returns the role, else None."""
    role = consent_reader(auth, token)
    return role if role in ("patient", "recorder", "attester", "compliance officer") else None


def check_attestation(auth: Authorization, token: AccessToken, now: datetime) -> None:
    """The two-person check on an authorization recorded by anyone but the patient: a second
    person with the compliance role verifies it (45 CFR 164.508(b)(2): a covered entity may not
    rely on a defective authorization, e.g. one "known by the covered entity to be false", so it
    must be checked by someone other than the person it lets read). The recorder never attests
    their own; a named recipient never attests one naming them."""
    if COMPLIANCE_ROLE not in token.roles:
        raise Refusal("Attesting an authorization needs the compliance role")
    if auth.recorded_by == caller_key(token):
        raise Refusal("The person who recorded an authorization cannot attest it")
    user = caller_user(token)
    if (user is not None and user in auth.recipients) or f"client:{token.client_id}" in auth.recipients:
        raise Refusal("A recipient named in an authorization cannot attest it")
    if auth.status != "proposed":
        raise Refusal(f"Only a proposed authorization is attested; this one is {auth.status}")
    if now >= auth.end:
        raise Refusal("The authorization has expired")


def may_read_notes(token: AccessToken) -> bool:
    """Scopes that permit reading notes, and never a patient-context token (164.524(a)(1)(i))."""
    if is_patient_context(token):
        return False
    return token.scope.allows("DocumentReference", "read") or token.scope.allows(
        "DocumentReference", "search-type")


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return max(x for x in (a, b) if x is not None) if a or b else None


def _earlier(a: datetime | None, b: datetime | None) -> datetime | None:
    return min(x for x in (a, b) if x is not None) if a or b else None


def scope_from_consent(auth: Authorization, wanted: NoteRequest) -> NoteScope:
    """The authorization's notes narrowed by the request; asking beyond them is refused."""
    ids = auth.note_ids
    if wanted.ids is not None:
        if ids is not None and not wanted.ids <= ids:
            raise Refusal("The requested notes are not covered by this authorization")
        ids = wanted.ids
    start, end = _later(auth.data_start, wanted.start), _earlier(auth.data_end, wanted.end)
    if start and end and end <= start:
        raise Refusal("The requested date range is outside this authorization")
    return NoteScope(ids=ids, start=start, end=end)


def check_consent_mint(auth: Authorization, token: AccessToken, purpose: str,
                       now: datetime) -> None:
    if not is_recipient(auth, token):
        raise Refusal("This authorization does not name the caller as a recipient")
    reason = auth.in_force(now)
    if reason:
        raise Refusal(f"No token can be minted: {reason}")
    if purpose not in auth.purposes:
        raise Refusal(f"The purpose {purpose} is not authorized by this authorization")


def check_exception_mint(basis: str, token: AccessToken, purpose: str | None,
                         justification: str, min_chars: int) -> str:
    """The purpose code of an allowed exception request, or a Refusal."""
    if basis not in EXCEPTIONS:
        raise errors.Unprocessable(f"basis must be one of: {', '.join(EXCEPTIONS)}",
                                   expression=["Parameters.parameter[basis]"])
    expected = EXCEPTIONS[basis]
    if purpose is not None and purpose != expected:
        raise Refusal(f"The {basis} exception is for purpose {expected}, not {purpose}")
    if basis == ORIGINATOR:
        user = caller_user(token)
        if not user or not user.startswith("Practitioner/"):
            raise Refusal("Only the notes' author (a practitioner fhirUser) may use the "
                          "originator-treatment exception")
        return expected
    if COMPLIANCE_ROLE not in token.roles:
        raise Refusal(f"The {basis} exception needs the compliance role")
    if len(justification.strip()) < min_chars:
        raise Refusal(f"The {basis} exception needs a written justification "
                      f"(at least {min_chars} characters)")
    return expected


async def check_token_in_force(db: store.Db, consent_token: ConsentToken, token: AccessToken,
                               now: datetime, bases: gate_cache.Bases) -> None:
    """Grantee = caller, and the basis still holds right now: the Consent or exception grant as
    stored, at most `bases.ttl` seconds old (gate_cache.py: a revocation by this process is seen
    at the next read, one by another replica within that interval)."""
    if consent_token.client_id != token.client_id or consent_token.fhir_user != caller_user(token):
        raise Refusal("The consent token was issued to another caller")
    consent_id = consent_token.consent_id
    if consent_id is not None:
        doc = await bases.get(gate_cache.consent_key(consent_id),
                              lambda: store.get_consent(db, consent_id))
        if doc is None:
            raise Refusal("The authorization behind this consent token no longer exists")
        auth = Authorization.from_index(doc)
        reason = auth.in_force(now)
        if reason:
            raise Refusal(f"The consent token is no longer valid: {reason}")
        if auth.patient != consent_token.patient or not is_recipient(auth, token) or not (
                set(consent_token.purpose_of_use) <= auth.purposes):
            raise Refusal("The consent token does not match its authorization")
        return
    grant = await bases.get(gate_cache.grant_key(consent_token.jti),
                            lambda: store.get_exception_grant(db, consent_token.jti))
    if grant is not None and grant.get("revoked"):
        raise Refusal("The exception grant behind this consent token was revoked")
    if grant is None or grant["patient"] != consent_token.patient or (
            grant["basis"] != consent_token.exception):
        raise Refusal("The exception grant behind this consent token is not on record")


def may_revoke_exception(grant: dict[str, Any], token: AccessToken) -> str:
    """Who may end an exception grant early: its grantee (the same client and user that minted
    it: one may always give up a permission), or the compliance role (oversight of exception
    use, the role that grants all but originator-treatment). Returns the role, else Refusal."""
    if grant.get("client_id") == token.client_id and grant.get("fhir_user") == caller_user(token):
        return "grantee"
    if COMPLIANCE_ROLE in token.roles:
        return "compliance officer"
    raise Refusal("Only the grantee or the compliance role may revoke an exception grant")


def note_filter(consent_token: ConsentToken) -> dict[str, Any]:
    """The MongoDB filter of everything this token reaches (search never looks outside it)."""
    scope = consent_token.notes
    clauses: list[dict[str, Any]] = [{"patient": consent_token.patient}]
    if scope.ids is not None:
        clauses.append({"_id": {"$in": sorted(scope.ids)}})
    if scope.start is not None:
        clauses.append({"date": {"$gte": scope.start}})
    if scope.end is not None:
        clauses.append({"date": {"$lt": scope.end}})
    if scope.author is not None:
        clauses.append({"author": scope.author})
    return {"$and": clauses}


def covers(consent_token: ConsentToken, doc: dict[str, Any] | None, note_id: str) -> bool:
    if doc is None or doc.get("patient") != consent_token.patient:
        return False
    date = doc["date"] if doc["date"].tzinfo else doc["date"].replace(tzinfo=UTC)
    return consent_token.notes.covers(note_id, date, doc["author"])
