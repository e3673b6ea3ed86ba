"""What a payer's CDex request asks for: the Task as records accepts it (Da Vinci CDex 2.1).

Checked against HL7 Da Vinci CDex 2.1.0 (hl7.org/fhir/us/davinci-cdex, its examples in
github.com/HL7/davinci-ecdx input/examples):

- Data requests (profile `cdex-task-data-request`): `Task.code` from
  `http://hl7.org/fhir/us/davinci-cdex/CodeSystem/cdex-temp` = `data-request-code` (inputs
  `data-code`, a CodeableConcept such as LOINC 11506-3 Progress note) or `data-request-query`
  (inputs `data-query`, a FHIR query string); the input types come from
  `http://hl7.org/fhir/us/davinci-hrex/CodeSystem/hrex-temp`. `purpose-of-use` (cdex-temp,
  v3-ActReason CodeableConcept, e.g. CLMATTCH, COVAUTH) and `signature-flag` (cdex-temp,
  boolean) are further inputs.
- Attachment requests (profile `cdex-task-attachment-request`): `Task.code` (cdex-temp) =
  `attachment-request-code` (or `-questionnaire`, not supported here); the tracking id is a
  `Task.identifier` whose type is cdex-temp `tracking-id`; the LOINC codes needed are `data-code`
  inputs (the issue called them "attachments-needed": the 2.1 profile and examples use
  `data-code`); `payer-url` (cdex-temp, valueUrl) names the payer's `$submit-attachment`
  endpoint; `service-date` (cdex-temp, valueDate); the due date is `Task.restriction.period.end`;
  the member is a contained Patient (`Task.for` = `#id`, profile cdex-patient-demographics) with
  its member identifier, and the provider a contained PractitionerRole.
- Both: `intent` = order; `status` bound to HRex Task Status (requested | accepted | rejected |
  in-progress | on-hold | failed | completed: `received` is not in it); `requester` = the payer,
  `owner` = the provider, `reasonReference` the claim or prior authorization (by identifier),
  `reasonCode` (http://hl7.org/fhir/claim-use: claim | preauthorization).

Records always files a new request as `requested` with businessStatus `awaiting-review`, whatever
the payer sent, and tags it with the payer's client id (records.policy.TASK_CLIENT_TAG).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mindchart_core import errors
from records.policy import TASK_CLIENT_TAG

CDEX_TEMP = "http://hl7.org/fhir/us/davinci-cdex/CodeSystem/cdex-temp"
HREX_TEMP = "http://hl7.org/fhir/us/davinci-hrex/CodeSystem/hrex-temp"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
REVIEW_STAGE = "https://mindchart.dev/fhir/CodeSystem/cdex-review-stage"
DATA_REQUEST_CODES = ("data-request-code", "data-request-query")
ATTACHMENT_REQUEST_CODES = ("attachment-request-code",)
OPEN_STATUSES = ("requested", "accepted", "in-progress", "on-hold")
# Purposes a payer may state (v3-ActReason); payment-related ones only (45 CFR 164.506(c)).
PURPOSES = ("CLMATTCH", "COVAUTH", "HPAYMT", "PMTDS", "HOPERAT")
DEFAULT_PURPOSE = "HPAYMT"


@dataclass(frozen=True)
class Request:
    """The parts of a CDex Task records acts on."""

    kind: str  # "data" | "attachment"
    codes: list[tuple[str, str]]  # (system, code) of the data-code inputs
    queries: list[str]  # data-query inputs
    purpose: str
    signature: bool
    member: dict[str, Any]  # {"reference": ...} or a contained Patient
    payer_url: str | None = None
    tracking_id: dict[str, Any] | None = None
    attach_to: str = "claim"
    service_date: str | None = None
    due: datetime | None = None
    line_items: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def _codings(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, dict):
        return []
    return [c for c in value.get("coding", []) if isinstance(c, dict)]


def _input_code(entry: dict[str, Any]) -> str | None:
    for coding in _codings(entry.get("type")):
        if coding.get("system") in (CDEX_TEMP, HREX_TEMP, None):
            return str(coding.get("code"))
    return None


def task_code(task: dict[str, Any]) -> str | None:
    for coding in _codings(task.get("code")):
        if coding.get("system") == CDEX_TEMP:
            return str(coding.get("code"))
    return None


def _due(task: dict[str, Any]) -> datetime | None:
    end = ((task.get("restriction") or {}).get("period") or {}).get("end")
    if not isinstance(end, str):
        return None
    try:
        moment = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        raise errors.Invalid("Task.restriction.period.end is not a date") from None
    if len(end) == 10:  # a date: due at the end of that day
        moment = moment.replace(hour=23, minute=59, second=59)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse(task: dict[str, Any]) -> Request:
    """The request a Task carries; 400/422 OperationOutcome when it is not one records serves."""
    code = task_code(task)
    if code in DATA_REQUEST_CODES:
        kind = "data"
    elif code in ATTACHMENT_REQUEST_CODES:
        kind = "attachment"
    else:
        raise errors.Unprocessable(
            "Task.code must be cdex-temp data-request-code, data-request-query or "
            "attachment-request-code", expression=["Task.code"])
    if task.get("intent") != "order":
        raise errors.Unprocessable("A CDex request Task has intent 'order'", expression=["Task.intent"])
    member = task.get("for")
    if not isinstance(member, dict) or not (member.get("reference") or member.get("identifier")):
        raise errors.Unprocessable("Task.for must name the member", expression=["Task.for"])
    if isinstance(member.get("reference"), str) and member["reference"].startswith("#"):
        contained = next((r for r in task.get("contained", []) if isinstance(r, dict)
                          and r.get("resourceType") == "Patient"
                          and f"#{r.get('id')}" == member["reference"]), None)
        if contained is None:
            raise errors.Unprocessable("Task.for points at no contained Patient", expression=["Task.for"])
        member = contained
    codes: list[tuple[str, str]] = []
    queries: list[str] = []
    line_items: dict[tuple[str, str], list[str]] = {}
    purpose, signature, payer_url, service_date = DEFAULT_PURPOSE, False, None, None
    for entry in task.get("input", []):
        if not isinstance(entry, dict):
            continue
        name = _input_code(entry)
        if name == "data-code":
            for coding in _codings(entry.get("valueCodeableConcept")):
                if coding.get("system") and coding.get("code"):
                    pair = (str(coding["system"]), str(coding["code"]))
                    codes.append(pair)
                    line_items[pair] = [str(x.get(k)) for x in entry.get("extension", [])
                                        if isinstance(x, dict) for k in x
                                        if k.startswith("value")]
        elif name == "data-query" and isinstance(entry.get("valueString"), str):
            queries.append(entry["valueString"])
        elif name == "purpose-of-use":
            found = [c.get("code") for c in _codings(entry.get("valueCodeableConcept"))
                     if c.get("system") == ACT_REASON]
            if not found or found[0] not in PURPOSES:
                raise errors.Unprocessable(
                    f"purpose-of-use must be a v3-ActReason code among {', '.join(PURPOSES)}",
                    expression=["Task.input"])
            purpose = str(found[0])
        elif name == "signature-flag":
            signature = entry.get("valueBoolean") is True
        elif name == "payer-url":
            payer_url = entry.get("valueUrl") if isinstance(entry.get("valueUrl"), str) else None
        elif name == "service-date":
            service_date = entry.get("valueDate")
    if code == "data-request-query" and not queries:
        raise errors.Unprocessable("data-request-query needs at least one data-query input",
                                   expression=["Task.input"])
    if code != "data-request-query" and not codes:
        raise errors.Unprocessable("The request needs at least one data-code input (a LOINC code)",
                                   expression=["Task.input"])
    tracking = None
    attach_to = "claim"
    if kind == "attachment":
        tracking = next((i for i in task.get("identifier", []) if isinstance(i, dict) and any(
            c.get("code") == "tracking-id" for c in _codings(i.get("type")))), None)
        if tracking is None or not tracking.get("value"):
            raise errors.Unprocessable("An attachment request needs a tracking-id identifier",
                                       expression=["Task.identifier"])
        if not payer_url:
            raise errors.Unprocessable("An attachment request needs a payer-url input",
                                       expression=["Task.input"])
        uses = [c.get("code") for c in _codings(task.get("reasonCode"))]
        attach_to = "preauthorization" if "preauthorization" in uses else "claim"
    return Request(kind=kind, codes=codes, queries=queries, purpose=purpose, signature=signature,
                   member=member, payer_url=payer_url, tracking_id=tracking, attach_to=attach_to,
                   service_date=service_date if isinstance(service_date, str) else None,
                   due=_due(task), line_items=line_items)


def stage(code: str, text: str) -> dict[str, Any]:
    """A Task.businessStatus: where the request is in records' review."""
    return {"coding": [{"system": REVIEW_STAGE, "code": code}], "text": text}


def as_filed(task: dict[str, Any], client_id: str, moment: str) -> dict[str, Any]:
    """The Task as records stores it: requested, awaiting review, tagged with its payer client."""
    meta = dict(task.get("meta") or {})
    tags = [t for t in meta.get("tag", []) if isinstance(t, dict) and t.get("system") != TASK_CLIENT_TAG]
    meta["tag"] = [*tags, {"system": TASK_CLIENT_TAG, "code": client_id}]
    filed = {k: v for k, v in task.items() if k not in ("output", "statusReason", "id")}
    filed.update(meta=meta, status="requested", lastModified=moment,
                 businessStatus=stage("awaiting-review", "Waiting for review by the provider"))
    filed.setdefault("authoredOn", moment)
    return filed


def is_open(task: dict[str, Any]) -> bool:
    return task.get("status") in OPEN_STATUSES
