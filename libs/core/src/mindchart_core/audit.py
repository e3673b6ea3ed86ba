"""The shape of an audit record: an R4 AuditEvent per IHE BALP 1.1 (shared/STANDARDS.md §8).

Built here so the gateway (one event per request) and psychnotes (consent decisions, disclosures)
emit identical shapes. Nothing here stores anything.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

DCM = "http://dicom.nema.org/resources/ontology/DCM"
REST = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
        "display": "RESTful Operation"}
INTERACTION_SYSTEM = "http://hl7.org/fhir/restful-interaction"
ACTION_BY_INTERACTION = {
    "create": "C", "read": "R", "vread": "R", "history-instance": "R", "update": "U",
    "patch": "U", "delete": "D", "search-type": "E", "search-system": "E", "history-type": "E",
    "history-system": "E", "operation": "E", "transaction": "E", "batch": "E", "token": "E",
}
_SOURCE = {"system": DCM, "code": "110153", "display": "Source Role ID"}
_DESTINATION = {"system": DCM, "code": "110152", "display": "Destination Role ID"}
_QUERY_INTERACTIONS = {"search-type", "search-system", "history-type", "history-system"}


def outcome_code(status: int) -> str:
    """AuditEvent.outcome: 0 success, 4 minor failure (4xx), 8 serious failure (5xx)."""
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


@dataclass
class RestAudit:
    """One REST request as the gateway saw it."""

    interaction: str
    method: str
    path: str
    query: str
    status: int
    request_id: str
    client_ip: str
    observer: str
    client_id: str | None = None
    subject: str | None = None
    fhir_user: str | None = None
    jti: str | None = None
    patient: str | None = None
    entity_ref: str | None = None
    purpose_of_use: list[str] = field(default_factory=list)
    outcome_desc: str | None = None
    latency_ms: float = 0.0
    recorded: datetime = field(default_factory=lambda: datetime.now(UTC))


def rest_audit_event(audit: RestAudit) -> dict[str, Any]:
    is_query = audit.interaction in _QUERY_INTERACTIONS
    client_role, server_role = (_SOURCE, _DESTINATION) if is_query or audit.interaction in (
        "create", "update", "patch", "delete") else (_DESTINATION, _SOURCE)
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": uuid.uuid4().hex,
        "type": REST,
        "subtype": [{"system": INTERACTION_SYSTEM, "code": audit.interaction}]
        if audit.interaction in ACTION_BY_INTERACTION and audit.interaction != "token"
        else [{"system": "http://mindchart.dev/CodeSystem/audit-subtype", "code": audit.interaction}],
        "action": ACTION_BY_INTERACTION.get(audit.interaction, "E"),
        "recorded": audit.recorded.isoformat().replace("+00:00", "Z"),
        "outcome": outcome_code(audit.status),
        "agent": [
            {
                "type": {"coding": [client_role]},
                "who": {"identifier": {"value": audit.client_id or "anonymous"}},
                "requestor": audit.subject is None,
                "network": {"address": audit.client_ip or "unknown", "type": "2"},
            },
            {
                "type": {"coding": [server_role]},
                "who": {"display": audit.observer},
                "requestor": False,
                "network": {"address": audit.observer, "type": "5"},
            },
        ],
        "source": {
            "observer": {"display": audit.observer},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                      "code": "4", "display": "Application Server"}],
        },
        "entity": [
            {
                "type": {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
                         "code": "XrequestId"},
                "what": {"identifier": {"value": audit.request_id}},
            }
        ],
    }
    if audit.outcome_desc or audit.status >= 400:
        event["outcomeDesc"] = audit.outcome_desc or f"HTTP {audit.status}"
    if audit.subject is not None:
        user: dict[str, Any] = {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                 "code": "IRCP"}]},
            "who": {"reference": audit.fhir_user} if audit.fhir_user
            else {"identifier": {"value": audit.subject}},
            "requestor": True,
        }
        if audit.jti:
            user["policy"] = [f"urn:ietf:params:oauth:jti:{audit.jti}"]
        if audit.purpose_of_use:
            user["purposeOfUse"] = [
                {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                             "code": code}]} for code in audit.purpose_of_use
            ]
        event["agent"].append(user)
    if audit.patient:
        event["entity"].append({
            "what": {"reference": audit.patient},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
        })
    if is_query:
        raw = f"{audit.method} {audit.path}{'?' + audit.query if audit.query else ''}"
        event["entity"].append({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24"},
            "query": base64.b64encode(raw.encode()).decode(),
        })
    elif audit.entity_ref:
        event["entity"].append({
            "what": {"reference": audit.entity_ref},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4"},
        })
    return event


# -- disclosures (45 CFR 164.528 accounting) ----------------------------------------------------
#
# A backend that releases patient data to a recipient outside treatment/payment defaults
# (psychotherapy notes, bulk exports) reports it to the gateway in the internal response header
# below. The gateway strips the header before the response leaves, and stores one PrivacyDisclosure
# AuditEvent per patient in its audit trail, from which `/audit/Patient/{id}/$disclosures` answers.

DISCLOSURE_HEADER = "x-mindchart-disclosure"

# Records keeps its own disclosure log for bulk export (one entry per patient per export and per
# file download: far too many for a header). The gateway reads it for the accounting with an
# access token it mints for itself: this client id (never registrable: client ids are
# `[A-Za-z0-9._-]`) and this scope (SMART 2.2 §scopes: a custom scope starts with `__`).
# Records answers its `Patient/{id}/$disclosures` to that token only.
ACCOUNTING_CLIENT = "urn:mindchart:gateway:accounting"
ACCOUNTING_SCOPE = "__mindchart.disclosures"
_DATE = re.compile(r"^(eq|ge|gt|le|lt)?(\d{4}-\d{2}-\d{2})(T[0-9:.]+(Z|[+-]\d{2}:\d{2})?)?$")


def recorded_range(value: str) -> dict[str, datetime] | None:
    """A FHIR `date` search value (R4 search.html §date: eq|ge|gt|le|lt, a day or an instant) as
    a MongoDB range on a UTC datetime; None when the value is not a date. The gateway's audit
    search and both halves of the accounting (gateway, records) read `date` alike through this."""
    match = _DATE.match(value)
    if match is None:
        return None
    prefix = match[1] or "eq"
    text = match[2] + (match[3] or "")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    end = moment + (timedelta(days=1) if match[3] is None else timedelta(milliseconds=1))
    return {"eq": {"$gte": moment, "$lt": end}, "ge": {"$gte": moment}, "gt": {"$gte": end},
            "le": {"$lt": end}, "lt": {"$lt": moment}}[prefix]


def accounting_key(event: dict[str, Any]) -> tuple[datetime, str]:
    """The order of an accounting (newest first): `recorded`, then the AuditEvent id for ties."""
    recorded = datetime.fromisoformat(str(event["recorded"]).replace("Z", "+00:00"))
    return recorded, str(event["id"])


def accounting_cursor(event: dict[str, Any]) -> str:
    """Where the next page of an accounting starts: after this event (see `accounting_key`)."""
    recorded, ident = accounting_key(event)
    return f"{recorded.astimezone(UTC).isoformat(timespec='milliseconds').replace('+00:00', 'Z')}|{ident}"


def parse_accounting_cursor(value: str) -> tuple[datetime, str] | None:
    """`accounting_cursor` read back; None when malformed."""
    stamp, _, ident = value.partition("|")
    if not ident or not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", ident):
        return None
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)), ident


@dataclass
class Disclosure:
    """One release of one patient's data to one recipient."""

    patient: str  # "Patient/123"
    entities: list[str]  # references released, e.g. ["DocumentReference/abc"]
    purpose_of_use: list[str]  # v3-ActReason codes, e.g. ["TREAT"]
    basis: str  # "Consent/<id>" or "exception:<basis>" or "scope:<client registration>"
    recipient_client_id: str
    recipient_user: str | None = None  # fhirUser of the recipient, when a person
    description: str = ""


def encode_disclosures(disclosures: list[Disclosure]) -> str:
    payload = [d.__dict__ for d in disclosures]
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def decode_disclosures(header: str) -> list[Disclosure]:
    payload = json.loads(base64.urlsafe_b64decode(header.encode()))
    return [Disclosure(**item) for item in payload]


def disclosure_audit_event(
    disclosure: Disclosure, *, custodian: str, request_id: str, recorded: datetime | None = None
) -> dict[str, Any]:
    """IHE.BasicAudit.PrivacyDisclosure.Source (BALP 1.1): who received what, when, why, on what basis."""
    moment = recorded or datetime.now(UTC)
    recipient: dict[str, Any] = {
        "type": {"coding": [_DESTINATION]},
        "who": {"reference": disclosure.recipient_user} if disclosure.recipient_user
        else {"identifier": {"value": disclosure.recipient_client_id}},
        "requestor": True,
        "purposeOfUse": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": c}]}
            for c in disclosure.purpose_of_use
        ],
    }
    if disclosure.recipient_user:
        recipient["altId"] = disclosure.recipient_client_id
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": uuid.uuid4().hex,
        "type": {"system": DCM, "code": "110106", "display": "Export"},
        "subtype": [{"system": "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle",
                     "code": "disclose", "display": "Disclose Record Lifecycle Event"}],
        "action": "R",
        "recorded": moment.isoformat().replace("+00:00", "Z"),
        "outcome": "0",
        "purposeOfEvent": recipient["purposeOfUse"],
        "agent": [
            {"type": {"coding": [_SOURCE]}, "who": {"display": custodian}, "requestor": False},
            recipient,
            {"type": {"coding": [{"system": "http://snomed.info/sct", "code": "159541003",
                                  "display": "Records custodian"}]},
             "who": {"display": custodian}, "requestor": False},
        ],
        "source": {"observer": {"display": custodian}},
        "entity": [
            {"what": {"reference": disclosure.patient},
             "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
             "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}},
            {"type": {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
                      "code": "XrequestId"},
             "what": {"identifier": {"value": request_id}}},
            {"type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
             "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "13"},
             "what": {"identifier": {"value": disclosure.basis}},
             "description": "legal basis of the disclosure"},
        ] + [
            {"what": {"reference": ref},
             "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
             "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4"}}
            for ref in disclosure.entities
        ],
    }
    if disclosure.description:
        event["outcomeDesc"] = disclosure.description
    return event


# -- consent decisions (IHE BALP AuthZconsent) --------------------------------------------------
#
# psychnotes records one of these for every decision of its consent gate: a consent token minted
# or refused, a read permitted or refused. The reason of a refusal travels in `outcomeDesc`.

AUTHZ_SUBTYPE_SYSTEM = "https://profiles.ihe.net/ITI/BALP/CodeSystem/AuthZsubType"


@dataclass
class ConsentDecision:
    """One permit/deny of the consent gate, with who asked, for what, on which basis."""

    permit: bool
    reason: str  # why: shown in outcomeDesc, kept for deny and permit alike
    action: str  # what was decided: "mint", "read", "vread", "search", "history", ...
    client_id: str | None
    fhir_user: str | None = None
    patient: str | None = None  # "Patient/123"
    basis: str | None = None  # "Consent/<id>" or "exception:<basis>"
    purpose_of_use: list[str] = field(default_factory=list)
    token_jti: str | None = None  # the consent token's jti, when there was one
    entities: list[str] = field(default_factory=list)  # notes the decision covers
    request_id: str = ""
    recorded: datetime = field(default_factory=lambda: datetime.now(UTC))


def consent_decision_audit_event(decision: ConsentDecision, *, observer: str) -> dict[str, Any]:
    """IHE.BasicAudit.AuthZconsent (BALP 1.1): outcome 0 = permit, 4 = deny (shared/STANDARDS.md §8)."""
    user: dict[str, Any] = {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                             "code": "IRCP", "display": "information recipient"}]},
        "who": {"reference": decision.fhir_user} if decision.fhir_user
        else {"identifier": {"value": decision.client_id or "anonymous"}},
        "requestor": True,
    }
    if decision.purpose_of_use:
        user["purposeOfUse"] = [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": c}]}
            for c in decision.purpose_of_use
        ]
    entities: list[dict[str, Any]] = [
        {"type": {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
                  "code": "XrequestId"},
         "what": {"identifier": {"value": decision.request_id}}},
    ]
    if decision.patient:
        entities.append({
            "what": {"reference": decision.patient},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
        })
    if decision.basis:
        basis: dict[str, Any] = {
            "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Consent"},
            "description": "legal basis (authorization or 45 CFR 164.508(a)(2) exception)",
        }
        basis["what"] = ({"reference": decision.basis} if decision.basis.startswith("Consent/")
                         else {"identifier": {"value": decision.basis}})
        entities.append(basis)
    if decision.token_jti:
        entities.append({
            "type": {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
                     "code": "OAuthToken"},
            "what": {"identifier": {"value": f"urn:ietf:params:oauth:jti:{decision.token_jti}"}},
            "description": "consent token",
        })
    entities += [
        {"what": {"reference": ref},
         "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
         "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4"}}
        for ref in decision.entities
    ]
    return {
        "resourceType": "AuditEvent",
        "id": uuid.uuid4().hex,
        "type": {"system": DCM, "code": "110113", "display": "Security Alert"},
        "subtype": [{"system": AUTHZ_SUBTYPE_SYSTEM, "code": "AuthZ-Consent",
                     "display": "Authorization Decision - Consent"},
                    {"system": "http://mindchart.dev/CodeSystem/consent-gate-action",
                     "code": decision.action}],
        "action": "E",
        "recorded": decision.recorded.isoformat().replace("+00:00", "Z"),
        "outcome": "0" if decision.permit else "4",
        "outcomeDesc": decision.reason,
        "agent": [
            {"type": {"coding": [{"system": DCM, "code": "110150", "display": "Application"}]},
             "who": {"identifier": {"value": decision.client_id or "anonymous"}},
             "requestor": False},
            user,
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                                  "code": "authserver", "display": "authorization server"}]},
             "who": {"display": observer}, "requestor": False},
        ],
        "source": {"observer": {"display": observer},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                             "code": "4", "display": "Application Server"}]},
        "entity": entities,
    }
