"""The patient's authorization as an R4 `Consent`, checked for the 45 CFR 164.508(c)(1) core
elements before it is stored, and summarised into the fields the consent gate checks live.

Element by element (shared/STANDARDS.md §6-7), all required, else 422 with the element's path:

- (i) what: `provision.data` (DocumentReference/<id> of this patient's notes, meaning `instance`)
  and/or `provision.dataPeriod` (notes dated within start..end), at the root or in the permit rule;
- (ii) who may disclose: `organization` (the custodian) or `performer`;
- (iii) who may receive: a nested `provision` of `type: permit` whose `actor` has role
  v3-ParticipationType `IRCP` and a reference: `Practitioner/<id>` (or another person reference,
  matched against the caller's `fhirUser`) or an identifier with system `CLIENT_ID_SYSTEM`
  (matched against the caller's OAuth client_id);
- (iv) purpose: `purpose` (v3-ActReason) in that permit rule; a token is minted for one of them;
- (v) expiry: `provision.period.end`, in the future; no token outlives it;
- (vi) signature and date: `dateTime` and the signed form as `sourceAttachment`.

Nested `deny` rules are refused rather than silently ignored. A stored Consent is not edited: it is
revoked (`$revoke` sets status `inactive`, effective at once for every token minted from it) and,
if the patient wants different terms, a new one is recorded, as with a paper authorization.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from mindchart_core import errors

CLIENT_ID_SYSTEM = "urn:ietf:params:oauth:client-id"  # local convention: an OAuth client as actor
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CREATABLE_STATUSES = frozenset({"active", "draft", "proposed"})
DEFAULT_SCOPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                             "code": "patient-privacy"}]}
DEFAULT_CATEGORY = [{"coding": [{"system": "http://loinc.org", "code": "64292-6",
                                 "display": "Release of information consent"}]}]
DEFAULT_POLICY_RULE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentpolicycodes",
                                   "code": "hipaa-auth"}]}
_PERSON = re.compile(r"^(Practitioner|PractitionerRole|RelatedPerson|Patient|Person)/[A-Za-z0-9\-.]{1,64}$")
_NOTE = re.compile(r"^DocumentReference/([A-Za-z0-9\-.]{1,64})$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_instant(value: str, *, end: bool = False) -> datetime:
    """A FHIR date or dateTime as a UTC instant; a date used as an end means the whole day.

    ValueError for anything else, including instants that leave Python's year 1-9999 once put in
    UTC (0001-01-01T00:00:00+14:00); the end of the last day, 9999-12-31, is the latest instant."""
    if _DATE.match(value):
        day = datetime.fromisoformat(value).replace(tzinfo=UTC)
        if not end:
            return day
        return day + timedelta(days=1) if day.date() < datetime.max.date() else datetime.max.replace(
            tzinfo=UTC)
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("a dateTime with a time needs a time zone")
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("the instant is outside the years 1-9999 in UTC") from None


@dataclass(frozen=True)
class Authorization:
    """What the gate needs from a Consent, extracted once at write time and stored beside it."""

    patient: str
    status: str
    start: datetime | None
    end: datetime
    recipients: frozenset[str]  # "Practitioner/x" or "client:<client_id>"
    purposes: frozenset[str]
    note_ids: frozenset[str] | None
    data_start: datetime | None
    data_end: datetime | None
    recorded_by: str | None = None  # caller key (policy.caller_key) of whoever recorded it
    attested_by: str | None = None  # the compliance officer who attested it (two-person rule)

    def index(self) -> dict[str, Any]:
        return {"patient": self.patient, "status": self.status, "start": self.start,
                "recorded_by": self.recorded_by, "attested_by": self.attested_by,
                "end": self.end, "recipients": sorted(self.recipients),
                "purposes": sorted(self.purposes),
                "note_ids": sorted(self.note_ids) if self.note_ids is not None else None,
                "data_start": self.data_start, "data_end": self.data_end}

    @classmethod
    def from_index(cls, doc: dict[str, Any]) -> Authorization:
        ids = doc.get("note_ids")
        return cls(patient=doc["patient"], status=doc["status"], start=_utc(doc.get("start")),
                   end=_utc(doc["end"]), recipients=frozenset(doc["recipients"]),  # type: ignore[arg-type]
                   purposes=frozenset(doc["purposes"]),
                   note_ids=frozenset(ids) if ids is not None else None,
                   data_start=_utc(doc.get("data_start")), data_end=_utc(doc.get("data_end")),
                   recorded_by=doc.get("recorded_by") or _legacy_recorder(doc),
                   attested_by=doc.get("attested_by"))

    def in_force(self, now: datetime) -> str | None:
        """None when this authorization can release notes now, else why not (164.508(b)(2))."""
        if self.status != "active":
            return f"the authorization is {self.status}" + (" (revoked)" if self.status == "inactive" else "")
        if now >= self.end:
            return "the authorization has expired"
        if self.start is not None and now < self.start:
            return "the authorization is not yet in force"
        return None


def _legacy_recorder(doc: dict[str, Any]) -> str | None:
    """Authorizations stored before `recorded_by`: `created_by` held a fhirUser or a client id."""
    created = doc.get("created_by")
    if not created:
        return None
    return str(created) if "/" in str(created) else f"client:{created}"


def _utc(value: Any) -> datetime | None:
    if value is None:
        return None
    moment: datetime = value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _missing(element: str, what: str) -> errors.FhirError:
    return errors.Unprocessable(
        f"An authorization for psychotherapy notes needs {what} (45 CFR 164.508(c)(1)): {element}",
        expression=[f"Consent.{element}"])


def _period(period: dict[str, Any], element: str) -> tuple[datetime | None, datetime | None]:
    try:
        start = parse_instant(period["start"]) if "start" in period else None
        end = parse_instant(period["end"], end=True) if "end" in period else None
    except ValueError:
        raise errors.Unprocessable(f"{element} is not a valid period",
                                   expression=[f"Consent.{element}"]) from None
    if start and end and end <= start:
        raise errors.Unprocessable(f"{element} ends before it starts", expression=[f"Consent.{element}"])
    return start, end


def _recipient_key(actor: dict[str, Any]) -> str | None:
    reference = actor.get("reference", {})
    ref = str(reference.get("reference", ""))
    if _PERSON.match(ref):
        return ref
    identifier = reference.get("identifier", {})
    if identifier.get("system") == CLIENT_ID_SYSTEM and identifier.get("value"):
        return f"client:{identifier['value']}"
    return None


def check_authorization(resource: dict[str, Any], now: datetime) -> Authorization:
    """422 unless the Consent carries every 164.508(c)(1) core element; its gate summary."""
    status = resource.get("status")
    if status not in CREATABLE_STATUSES:
        raise errors.Unprocessable("A new authorization is recorded as active, draft or proposed",
                                   expression=["Consent.status"])
    patient = str(resource.get("patient", {}).get("reference", ""))
    if not re.fullmatch(r"Patient/[A-Za-z0-9\-.]{1,64}", patient):
        raise _missing("patient", "the patient it is about (Patient/id)")
    if "dateTime" not in resource:
        raise _missing("dateTime", "the date it was signed")
    attachment = resource.get("sourceAttachment")
    if not attachment or not (attachment.get("data") or attachment.get("url")):
        raise _missing("sourceAttachment", "the signed form")
    if not resource.get("organization") and not resource.get("performer"):
        raise _missing("organization", "who may disclose (organization or performer)")
    root = resource.get("provision")
    if not root:
        raise _missing("provision", "the provisions (what, to whom, why, until when)")
    start, end = _period(root.get("period", {}), "provision.period")
    if end is None:
        raise _missing("provision.period.end", "an expiration date")
    if end <= now:
        raise errors.Unprocessable("The authorization has already expired (45 CFR 164.508(b)(2)(i))",
                                   expression=["Consent.provision.period.end"])
    nested = root.get("provision", [])
    if any(p.get("type") != "permit" for p in nested):
        raise errors.Unprocessable("Only nested permit provisions are supported; record a narrower "
                                   "authorization instead of a deny rule",
                                   expression=["Consent.provision.provision.type"])
    if root.get("type") is not None:
        raise errors.Unprocessable("The root provision carries no type (R4 Consent); put the "
                                   "permit in a nested provision", expression=["Consent.provision.type"])
    permits = [p for p in nested if p.get("type") == "permit"]
    if not permits:
        raise _missing("provision.provision", "a nested permit provision naming the recipient")
    recipients: set[str] = set()
    purposes: set[str] = set()
    for i, permit in enumerate(permits):
        for actor in permit.get("actor", []):
            roles = [c for c in actor.get("role", {}).get("coding", [])
                     if c.get("system") == PARTICIPATION and c.get("code") == "IRCP"]
            key = _recipient_key(actor)
            if roles and key:
                recipients.add(key)
            elif roles:
                raise errors.Unprocessable(
                    "A recipient is a person reference (Practitioner/id, ...) or an identifier "
                    f"with system {CLIENT_ID_SYSTEM}",
                    expression=[f"Consent.provision.provision[{i}].actor"])
        purposes.update(str(c["code"]) for c in permit.get("purpose", [])
                        if c.get("system") == ACT_REASON and c.get("code"))
    if not recipients:
        raise _missing("provision.provision.actor", "who may receive (an actor with role IRCP)")
    if patient in recipients:
        raise errors.Unprocessable(
            "An authorization cannot name its own patient as recipient: the right of access "
            "excludes psychotherapy notes (45 CFR 164.524(a)(1)(i))",
            expression=["Consent.provision.provision.actor"])
    if not purposes:
        raise _missing("provision.provision.purpose", "each purpose (v3-ActReason)")
    note_ids: set[str] | None = None
    data_start = data_end = None
    for where, provision in [("provision", root)] + [
            (f"provision.provision[{i}]", p) for i, p in enumerate(permits)]:
        for j, data in enumerate(provision.get("data", [])):
            match = _NOTE.match(str(data.get("reference", {}).get("reference", "")))
            if match is None or data.get("meaning") != "instance":
                raise errors.Unprocessable(
                    "provision.data lists psychotherapy notes (DocumentReference/id, meaning instance)",
                    expression=[f"Consent.{where}.data[{j}]"])
            note_ids = (note_ids or set()) | {match.group(1)}
        if "dataPeriod" in provision:
            data_start, data_end = _period(provision["dataPeriod"], f"{where}.dataPeriod")
    if note_ids is None and data_start is None and data_end is None:
        raise _missing("provision.data", "a description of the notes (provision.data or dataPeriod)")
    return Authorization(
        patient=patient, status=str(status), start=start, end=end,
        recipients=frozenset(recipients), purposes=frozenset(purposes),
        note_ids=frozenset(note_ids) if note_ids is not None else None,
        data_start=data_start, data_end=data_end)


def with_defaults(resource: dict[str, Any]) -> dict[str, Any]:
    """Scope, category and policy rule of a HIPAA authorization when the client left them out."""
    out = dict(resource)
    out.setdefault("scope", DEFAULT_SCOPE)
    out.setdefault("category", DEFAULT_CATEGORY)
    if "policy" not in out and "policyRule" not in out:
        out["policyRule"] = DEFAULT_POLICY_RULE
    return out
