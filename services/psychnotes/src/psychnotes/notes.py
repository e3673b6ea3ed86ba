"""What a psychotherapy note may hold, checked on every create and update.

45 CFR 164.501 defines psychotherapy notes as the professional's notes "documenting or analyzing
the contents of conversation" and *excludes* from them "medication prescription and monitoring,
counseling session start and stop times, the modalities and frequencies of treatment furnished,
results of clinical tests, and any summary of the following items: diagnosis, functional status,
the treatment plan, symptoms, prognosis, and progress to date". Those belong in the progress note
(the records service, `/fhir`). So a psychotherapy-note DocumentReference is refused with 422 and
an OperationOutcome saying so when it carries any of these structured elements:

- `context.period`: the session's start and stop times (record them on the records Encounter).
- `context.event`: the acts/modalities documented (modalities and frequencies of treatment).
- `context.related` pointing at a Condition, Medication*, Observation, DiagnosticReport, CarePlan,
  Goal, Procedure, ServiceRequest, ClinicalImpression, RiskAssessment or Immunization
  (diagnosis, medication, test results, treatment plan).
- `contained` resources of any kind (a note is narrative; structured data goes to records).
- a `type` or `category` coding that names excluded content (LOINC plan of care, medication,
  diagnosis, problem list, lab/test results, assessment-and-plan: `EXCLUDED_LOINC`).
- an attachment whose content type is structured FHIR/JSON/XML data rather than a document, or
  that points elsewhere (`attachment.url`): the note's words live only here, encrypted.
- `context.encounter` other than `Encounter/<id>` (the session Encounter in records).

Free text is not scanned: the professional's words are the note, and guessing at them would both
miss and misfire. The server sets, whatever the client sent: `meta.security` and `securityLabel`
(V + PSYTHPN + NOAUTH), `author` (the practitioner in the access token) and `id`.
"""

from __future__ import annotations

import re
from typing import Any

from mindchart_core import errors

PROGRESS_NOTE_HINT = (
    "belongs in the progress note (records service, /fhir), not in a psychotherapy note "
    "(45 CFR 164.501 excludes it)"
)
EXCLUDED_RELATED = frozenset({
    "Condition", "MedicationRequest", "MedicationStatement", "MedicationAdministration",
    "MedicationDispense", "Medication", "Observation", "DiagnosticReport", "CarePlan", "Goal",
    "Procedure", "ServiceRequest", "ClinicalImpression", "RiskAssessment", "Immunization",
})
# LOINC document/section codes whose subject is what 164.501 excludes.
EXCLUDED_LOINC = {
    "18776-5": "plan of care note (treatment plan)",
    "10160-0": "history of medication use (medication)",
    "29549-3": "medication administered (medication)",
    "11450-4": "problem list (diagnosis)",
    "29548-5": "diagnosis narrative (diagnosis)",
    "30954-2": "relevant diagnostic tests/laboratory data (test results)",
    "11502-2": "laboratory report (test results)",
    "51847-2": "assessment and plan (diagnosis, treatment plan)",
    "18782-3": "study observation (test results)",
}
LOINC = "http://loinc.org"
_STRUCTURED_TYPES = re.compile(r"^application/(fhir\+|json|xml|.*\+json|.*\+xml)", re.IGNORECASE)
_ENCOUNTER = re.compile(r"^Encounter/[A-Za-z0-9\-.]{1,64}$")
_PATIENT = re.compile(r"^Patient/[A-Za-z0-9\-.]{1,64}$")


def _refuse(what: str, where: str) -> errors.FhirError:
    return errors.Unprocessable(f"{what} {PROGRESS_NOTE_HINT}", expression=[where])


def _codings(element: Any) -> list[dict[str, Any]]:
    concepts = element if isinstance(element, list) else [element]
    return [c for concept in concepts if isinstance(concept, dict)
            for c in concept.get("coding", []) if isinstance(c, dict)]


def check_psychotherapy_note(resource: dict[str, Any]) -> str:
    """Refuse progress-note content (422); return the subject reference (Patient/id)."""
    subject = resource.get("subject", {}).get("reference", "")
    if not _PATIENT.match(subject):
        raise errors.Unprocessable("subject must reference the Patient (Patient/id)",
                                   expression=["DocumentReference.subject"])
    if "contained" in resource:
        raise _refuse("Contained (structured) resources", "DocumentReference.contained")
    for element in ("type", "category"):
        for coding in _codings(resource.get(element, [])):
            label = EXCLUDED_LOINC.get(str(coding.get("code")))
            if coding.get("system") == LOINC and label:
                raise _refuse(f"A document of type LOINC {coding['code']} ({label})",
                              f"DocumentReference.{element}")
    context = resource.get("context", {})
    if "period" in context:
        raise _refuse("The session start and stop times (context.period)",
                      "DocumentReference.context.period")
    if "event" in context:
        raise _refuse("The treatment modality (context.event)", "DocumentReference.context.event")
    for i, related in enumerate(context.get("related", [])):
        kind = str(related.get("reference", "")).split("/")[0]
        if kind in EXCLUDED_RELATED or related.get("type") in EXCLUDED_RELATED:
            raise _refuse(f"A link to a {kind or related.get('type')} (diagnosis, medication, "
                          "test results or treatment plan)",
                          f"DocumentReference.context.related[{i}]")
    for i, encounter in enumerate(context.get("encounter", [])):
        if not _ENCOUNTER.match(str(encounter.get("reference", ""))):
            raise errors.Unprocessable(
                "context.encounter must reference the session Encounter in records (Encounter/id)",
                expression=[f"DocumentReference.context.encounter[{i}]"])
    for i, content in enumerate(resource.get("content", [])):
        attachment = content.get("attachment", {})
        where = f"DocumentReference.content[{i}].attachment"
        if "url" in attachment:
            raise errors.Unprocessable(
                "A psychotherapy note keeps its text inline (attachment.data), encrypted in this "
                "vault; a link to content stored elsewhere is refused", expression=[f"{where}.url"])
        if _STRUCTURED_TYPES.match(str(attachment.get("contentType", ""))):
            raise _refuse("Structured data (a FHIR/JSON/XML attachment)", f"{where}.contentType")
    return str(subject)
