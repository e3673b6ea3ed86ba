"""The subscription topics records offers, and which writes trigger them.

Subscriptions R5 Backport IG STU 1.1 (hl7.fhir.uv.subscriptions-backport 1.1.0): in R4 a
Subscription names its topic by canonical URL in `Subscription.criteria`; a server advertises the
topics it supports with the `capabilitystatement-subscriptiontopic-canonical` extension on
`CapabilityStatement.rest.resource` (Capabilities.fsh, `CapabilityStatementSubscriptionTopic`).
STU 1.1 leaves topic definitions to servers; to make ours readable we serve each as the R4 form
the IG's later builds use, a `Basic` with code `fhir-types#SubscriptionTopic`, `artifact-url`
and the R5 cross-version `extension-SubscriptionTopic.*` extensions (BackportTopics.fsh,
`r4-encounter-complete`).

Triggers are transitions, evaluated on the previous and the new version of a resource in the
write's own transaction (records/subscriptions/outbox.py):
- note-created: a DocumentReference is created.
- note-signed: `docStatus` (R4 composition-status) becomes `final` ($sign, records/lifecycle).
- note-amended: `docStatus` becomes `amended`; or the note is superseded (`status` becomes
  `superseded`: records/lifecycle supersedes a note when a correction replacing it is signed);
  or an addendum or correction (`relatesTo` code `appends` / `replaces`) is signed.
- note-entered-in-error: `status` (document-reference-status) or `docStatus` becomes
  `entered-in-error`.
- screening-recorded: an Observation of category `survey` (US Core Screening Assessment)
  becomes `final`, `amended` or `corrected` (created so, or its status moves there).

A resource labelled as a psychotherapy note (v3-ActCode PSYTHPN, 45 CFR 164.501) never triggers
anything: such notes belong in psychnotes, and one written here by mistake must not announce itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TOPIC_BASE = "https://mindchart.health/fhir/SubscriptionTopic"
CAPABILITY_EXTENSION = ("http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
                        "capabilitystatement-subscriptiontopic-canonical")
XVER = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic"
PSYCHOTHERAPY_NOTE = ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "PSYTHPN")
SURVEY = ("http://terminology.hl7.org/CodeSystem/observation-category", "survey")
RECORDED = frozenset({"final", "amended", "corrected"})

Resource = dict[str, Any]
Trigger = Callable[[Resource | None, Resource], bool]


@dataclass(frozen=True)
class Topic:
    id: str
    title: str
    resource: str
    description: str
    interactions: tuple[str, ...]
    filters: tuple[tuple[str, str], ...]  # (search parameter, what it filters on)
    trigger: Trigger

    @property
    def url(self) -> str:
        return f"{TOPIC_BASE}/{self.id}"


def _became(field: str, value: str) -> Trigger:
    def test(previous: Resource | None, current: Resource) -> bool:
        return current.get(field) == value and (previous is None or previous.get(field) != value)
    return test


def _entered_in_error(previous: Resource | None, current: Resource) -> bool:
    return _became("status", "entered-in-error")(previous, current) or _became(
        "docStatus", "entered-in-error")(previous, current)


AMENDING = frozenset({"appends", "replaces"})


def _amended(previous: Resource | None, current: Resource) -> bool:
    if _became("docStatus", "amended")(previous, current):
        return True
    if _became("status", "superseded")(previous, current):
        return True
    amends = any(isinstance(r, dict) and r.get("code") in AMENDING for r in current.get("relatesTo", []))
    return amends and _became("docStatus", "final")(previous, current)


def _is_survey(resource: Resource) -> bool:
    return any(c.get("system") == SURVEY[0] and c.get("code") == SURVEY[1]
               for cat in resource.get("category", []) if isinstance(cat, dict)
               for c in cat.get("coding", []) if isinstance(c, dict))


def _screening(previous: Resource | None, current: Resource) -> bool:
    if not _is_survey(current) or current.get("status") not in RECORDED:
        return False
    return previous is None or previous.get("status") not in RECORDED


NOTE_FILTERS = (("patient", "the note's subject"), ("type", "the note's LOINC type"),
                ("category", "the note's category, e.g. clinical-note"))
TOPICS: dict[str, Topic] = {t.id: t for t in (
    Topic("note-created", "Progress note created", "DocumentReference",
          "A progress note (DocumentReference) was created.", ("create",), NOTE_FILTERS,
          lambda previous, current: previous is None),
    Topic("note-signed", "Progress note signed", "DocumentReference",
          "A progress note's docStatus became final (signed).", ("create", "update"), NOTE_FILTERS,
          _became("docStatus", "final")),
    Topic("note-amended", "Progress note amended", "DocumentReference",
          "A progress note was amended: its docStatus became amended, it was superseded by a "
          "signed correction, or an addendum or correction to it was signed.", ("create", "update"),
          NOTE_FILTERS, _amended),
    Topic("note-entered-in-error", "Progress note entered in error", "DocumentReference",
          "A progress note's status or docStatus became entered-in-error.", ("update",),
          NOTE_FILTERS, _entered_in_error),
    Topic("screening-recorded", "Screening assessment recorded", "Observation",
          "A screening Observation (category survey, e.g. PHQ-9 or GAD-7) was recorded as "
          "final, amended or corrected.", ("create", "update"),
          (("patient", "the Observation's subject"), ("code", "the instrument's LOINC code"),
           ("category", "the Observation's category")), _screening),
)}
BY_URL = {t.url: t for t in TOPICS.values()}
WATCHED_TYPES = frozenset(t.resource for t in TOPICS.values())


def is_psychotherapy_note(resource: Resource) -> bool:
    labels = [*resource.get("meta", {}).get("security", []), *(
        c for label in resource.get("securityLabel", []) if isinstance(label, dict)
        for c in label.get("coding", []))]
    return any(isinstance(c, dict) and (c.get("system"), c.get("code")) == PSYCHOTHERAPY_NOTE
               for c in labels)


def triggered(resource_type: str, previous: Resource | None, current: Resource) -> list[str]:
    """Canonical URLs of the topics this write triggers (none for a psychotherapy note)."""
    if resource_type not in WATCHED_TYPES or is_psychotherapy_note(current):
        return []
    return [t.url for t in TOPICS.values()
            if t.resource == resource_type and t.trigger(previous, current)]


def as_basic(topic: Topic) -> dict[str, Any]:
    """The topic as an R4 `Basic` carrying R5 SubscriptionTopic cross-version extensions."""
    trigger = [{"url": "description", "valueMarkdown": topic.description},
               {"url": "resource", "valueUri": f"http://hl7.org/fhir/StructureDefinition/{topic.resource}"},
               *({"url": "supportedInteraction", "valueCode": i} for i in topic.interactions)]
    extension: list[dict[str, Any]] = [
        {"url": "http://hl7.org/fhir/StructureDefinition/artifact-url", "valueUri": topic.url},
        {"url": f"{XVER}.title", "valueString": topic.title},
        {"url": f"{XVER}.description", "valueMarkdown": topic.description},
        {"url": f"{XVER}.resourceTrigger", "extension": trigger},
    ]
    for name, what in topic.filters:
        extension.append({"url": f"{XVER}.canFilterBy", "extension": [
            {"url": "description", "valueMarkdown": f"Filter on {what}."},
            {"url": "resource", "valueUri": topic.resource},
            {"url": "filterParameter", "valueString": name}]})
    return {
        "resourceType": "Basic", "id": topic.id,
        "meta": {"profile": ["http://hl7.org/fhir/5.0/StructureDefinition/profile-SubscriptionTopic"]},
        "extension": extension,
        "modifierExtension": [{"url": "http://hl7.org/fhir/StructureDefinition/artifact-status",
                               "valueCode": "active"}],
        "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
    }
