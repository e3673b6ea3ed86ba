"""What a patient's amendment request is: the FHIR R4 `Task` records stores for it, and the
changes each step makes to it (45 CFR 164.526).

The Task (R4 task.html elements):

- `code`: `https://mindchart.dev/fhir/CodeSystem/amendment#amendment-request` (Mindchart's own:
  no HL7 code system names a HIPAA amendment request), with `http://hl7.org/fhir/CodeSystem/
  task-code#change` ("change the focal resource") beside it for generic Task clients.
- `focus` the progress note (a records `DocumentReference`), `for` and `requester` the patient,
  `description` the change asked for (164.526(b)(1): in writing), `reasonCode.text` the patient's
  reason when they give one; `intent` order (the patient has a right to a decision).
- Filled by records whatever was sent: `owner` = the note's author (the one who decides),
  `authoredOn`, `lastModified`, `status` requested, `restriction.period.end` = authoredOn + 60
  days (164.526(b)(2)(i): act no later than 60 days after receipt).
- `status` (R4 task-status): `requested` while open; `completed` when the author's correction is
  signed (accepted, 164.526(c)); `rejected` when denied (164.526(d)). `businessStatus` (codes of
  the same Mindchart system): received, extended, amended, denied, disagreement-filed, rebutted.
- Denial: `statusReason` = the basis (164.526(a)(2)(i)-(iv), codes below) with the author's
  written reason as its text, and an `output` `denial` holding the whole written denial in plain
  language with the (d)(1)(ii)-(iv) statements.
- Extension (164.526(b)(2)(ii)): once, by 30 days, before the deadline, with a written reason:
  `restriction.period.end` moves and an `output` `extension` states the reason and the new date.
- `output` also references the correction (`correction`), the statement of disagreement
  (`statement-of-disagreement`) and the rebuttal (`rebuttal`) as they are written.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from mindchart_core import errors

SYSTEM = "https://mindchart.dev/fhir/CodeSystem/amendment"
CODE = "amendment-request"
TASK_CODE = {"coding": [
    {"system": SYSTEM, "code": CODE, "display": "Request to amend protected health information "
                                                "(45 CFR 164.526)"},
    {"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "change",
     "display": "Change the focal resource"}]}
ANSWER_DAYS = 60  # 164.526(b)(2)(i)
EXTENSION_DAYS = 30  # 164.526(b)(2)(ii), once
MAX_TEXT = 4000  # 164.526(d)(2): "may reasonably limit the length of a statement of disagreement"
OPEN = frozenset({"requested", "received", "accepted", "in-progress", "ready", "on-hold"})
# 164.526(a)(2): the only grounds on which a covered entity may deny an amendment.
DENIAL_BASES = {
    "not-created-by-covered-entity": "The information was not created by this practice "
                                     "(45 CFR 164.526(a)(2)(i))",
    "not-in-designated-record-set": "The information is not part of the designated record set "
                                    "(45 CFR 164.526(a)(2)(ii))",
    "not-available-for-inspection": "The information would not be available for inspection under "
                                    "45 CFR 164.524 (45 CFR 164.526(a)(2)(iii))",
    "accurate-and-complete": "The information is accurate and complete "
                             "(45 CFR 164.526(a)(2)(iv))",
}


def coding(code: str, display: str | None = None) -> dict[str, Any]:
    return {"system": SYSTEM, "code": code, **({"display": display} if display else {})}


def is_amendment_request(task: dict[str, Any]) -> bool:
    return any(isinstance(c, dict) and c.get("system") == SYSTEM and c.get("code") == CODE
               for c in ((task.get("code") or {}).get("coding") or []))


def text(value: Any, what: str) -> str:
    """A written statement: a non-empty string within MAX_TEXT characters."""
    if not isinstance(value, str) or len(value.strip()) < 5:
        raise errors.Unprocessable(f"{what} must be written out (a string of at least 5 characters)")
    if len(value) > MAX_TEXT:
        raise errors.Unprocessable(f"{what} is limited to {MAX_TEXT} characters")
    return value.strip()


def reference_id(value: Any, kind: str) -> str | None:
    """The id of a relative `kind/id` reference (absolute or versioned forms of records' own
    base are normalised by the caller); None for anything else."""
    ref = (value or {}).get("reference") if isinstance(value, dict) else None
    if not isinstance(ref, str):
        return None
    parts = ref.split("/")
    if len(parts) == 2 and parts[0] == kind and parts[1]:
        return parts[1]
    return None


def instant(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def deadline(task: dict[str, Any]) -> datetime:
    return parse_instant(str(((task.get("restriction") or {}).get("period") or {}).get("end")))


def as_filed(sent: dict[str, Any], note_id: str, patient: str, author: str,
             moment: datetime) -> dict[str, Any]:
    """The Task records stores for what the patient sent: only the parts the patient decides
    (the change asked for, their reason), everything else filled by records."""
    description = text(sent.get("description"), "Task.description (the change you ask for)")
    reason = sent.get("reasonCode")
    task: dict[str, Any] = {
        "resourceType": "Task",
        "status": "requested",
        "businessStatus": {"coding": [coding("received")], "text": "Received; awaiting the author"},
        "intent": "order",
        "code": TASK_CODE,
        "description": description,
        "focus": {"reference": f"DocumentReference/{note_id}"},
        "for": {"reference": f"Patient/{patient}"},
        "authoredOn": instant(moment),
        "lastModified": instant(moment),
        "requester": {"reference": f"Patient/{patient}"},
        "owner": {"reference": author},
        "restriction": {"period": {"end": instant(moment + timedelta(days=ANSWER_DAYS))}},
    }
    if isinstance(reason, dict) and isinstance(reason.get("text"), str):
        task["reasonCode"] = {"text": text(reason["text"], "Task.reasonCode.text")}
    return task


def outputs(task: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [o for o in task.get("output") or []
            if any(c.get("system") == SYSTEM and c.get("code") == kind
                   for c in (o.get("type") or {}).get("coding") or [])]


def with_output(task: dict[str, Any], kind: str, **value: Any) -> list[dict[str, Any]]:
    return [*(task.get("output") or []), {"type": {"coding": [coding(kind)]}, **value}]


def denial_text(task: dict[str, Any], basis: str, reason: str, moment: datetime) -> str:
    """The written denial of 164.526(d)(1), in plain language: (i) the basis, (ii) the right to
    file a statement of disagreement and how, (iii) that without one the patient may ask that the
    request and this denial go with future disclosures, (iv) how to complain."""
    return (
        f"Your request of {task.get('authoredOn', '')[:10]} to amend your progress note "
        f"({task.get('focus', {}).get('reference')}) was denied on {instant(moment)[:10]}.\n"
        f"Basis: {DENIAL_BASES[basis]}.\nExplanation: {reason}\n"
        "You may file a written statement disagreeing with this denial and the reasons for your "
        f"disagreement: POST Task/{task.get('id')}/$disagree with a 'statement' (at most "
        f"{MAX_TEXT} characters). It will be included with every later disclosure of the note.\n"
        "If you do not file a statement of disagreement, you may ask that your request and this "
        "denial be included with any future disclosure of the note.\n"
        "You may complain to this practice's privacy officer under its complaint procedures "
        "(45 CFR 164.530(d)), or to the Secretary of Health and Human Services (45 CFR 160.306)."
    )


def denied(task: dict[str, Any], basis: str, reason: str, moment: datetime) -> dict[str, Any]:
    return {
        **task, "status": "rejected", "lastModified": instant(moment),
        "statusReason": {"coding": [coding(basis)], "text": reason},
        "businessStatus": {"coding": [coding("denied")], "text": "Denied in writing"},
        "output": with_output(task, "denial", valueString=denial_text(task, basis, reason, moment)),
    }


def extended(task: dict[str, Any], reason: str, moment: datetime) -> dict[str, Any]:
    if task.get("status") not in OPEN:
        raise errors.Conflict(f"This request is already {task.get('status')}")
    if outputs(task, "extension"):
        raise errors.Conflict("This request was already extended once; 45 CFR 164.526(b)(2)(ii) "
                              "allows only one extension")
    due = deadline(task)
    if moment >= due:
        raise errors.Unprocessable("The 60 days to act on this request have passed: an extension "
                                   "must be given within them (45 CFR 164.526(b)(2)(ii))")
    new_due = instant(due + timedelta(days=EXTENSION_DAYS))
    statement = (f"The time to act on your request is extended by {EXTENSION_DAYS} days, to "
                 f"{new_due[:10]}. Reason for the delay: {reason}")
    return {
        **task, "lastModified": instant(moment),
        "restriction": {**(task.get("restriction") or {}), "period": {"end": new_due}},
        "businessStatus": {"coding": [coding("extended")], "text": f"Extended to {new_due[:10]}"},
        "output": with_output(task, "extension", valueString=statement),
    }


def completed(task: dict[str, Any], correction_id: str, moment: datetime) -> dict[str, Any]:
    return {
        **task, "status": "completed", "lastModified": instant(moment),
        "businessStatus": {"coding": [coding("amended")], "text": "Amended: the correction is signed"},
        "output": with_output(task, "correction",
                              valueReference={"reference": f"DocumentReference/{correction_id}"}),
    }


def with_document(task: dict[str, Any], kind: str, document_id: str, moment: datetime,
                  business: str) -> dict[str, Any]:
    return {
        **task, "lastModified": instant(moment),
        "businessStatus": {"coding": [coding(business)], "text": business.replace("-", " ")},
        "output": with_output(task, kind, valueReference={"reference": f"DocumentReference/{document_id}"}),
    }


__all__ = [
    "ANSWER_DAYS",
    "CODE",
    "DENIAL_BASES",
    "EXTENSION_DAYS",
    "SYSTEM",
    "as_filed",
    "completed",
    "denied",
    "extended",
    "is_amendment_request",
    "outputs",
    "with_document",
]
