"""What records serves, declared once: resource types, their search parameters, compartments.

Adding a resource type or a search parameter is a line here; extraction at write time, indexes,
search parsing and the CapabilityStatement all follow from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ParamType = Literal["token", "reference", "date", "string", "quantity"]

US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition"
SEARCH_PARAM_BASE = "http://hl7.org/fhir/SearchParameter"
MINDCHART_SEARCH_PARAM_BASE = "https://mindchart.dev/fhir/SearchParameter"


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: ParamType
    paths: tuple[str, ...]
    target: str | None = None  # default resource type for bare-id references
    definition: str = ""


@dataclass(frozen=True)
class ResourceDef:
    type: str
    params: tuple[SearchParam, ...]
    # Paths of references that put a resource in a Patient's compartment (R4 compartmentdefinition).
    patient_compartment: tuple[str, ...]
    profiles: tuple[str, ...] = ()
    # Composite searches US Core requires to be fast: each becomes a compound index.
    compound_indexes: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    # References whose targets' patient compartments this resource joins, resolved at write time
    # (a Provenance about a note belongs to the note's patient, so patient scopes can see it).
    compartment_from_targets: tuple[str, ...] = ()
    # Type-level operations beyond $validate: (name, OperationDefinition canonical).
    operations: tuple[tuple[str, str], ...] = ()

    def param(self, name: str) -> SearchParam | None:
        return next((p for p in self.params if p.name == name), None)


def _p(name: str, kind: ParamType, *paths: str, target: str | None = None, base: str = "") -> SearchParam:
    return SearchParam(name, kind, paths, target, f"{SEARCH_PARAM_BASE}/{base or name}")


PATIENT_REF = ("subject", "patient")

RESOURCES: dict[str, ResourceDef] = {
    d.type: d
    for d in (
        ResourceDef(
            "Patient",
            (
                _p("identifier", "token", "identifier", base="Patient-identifier"),
                _p("name", "string", "name", base="Patient-name"),
                _p("family", "string", "name.family", base="individual-family"),
                _p("given", "string", "name.given", base="individual-given"),
                _p("birthdate", "date", "birthDate", base="individual-birthdate"),
                _p("gender", "token", "gender", base="individual-gender"),
                _p("general-practitioner", "reference", "generalPractitioner",
                   target="Practitioner", base="Patient-general-practitioner"),
            ),
            patient_compartment=("id",),
            profiles=(f"{US_CORE}/us-core-patient",),
        ),
        ResourceDef(
            "Practitioner",
            (
                _p("identifier", "token", "identifier", base="Practitioner-identifier"),
                _p("name", "string", "name", base="Practitioner-name"),
                _p("family", "string", "name.family", base="individual-family"),
                _p("given", "string", "name.given", base="individual-given"),
            ),
            patient_compartment=(),
            profiles=(f"{US_CORE}/us-core-practitioner",),
        ),
        ResourceDef(
            "Encounter",
            (
                _p("patient", "reference", "subject", target="Patient", base="clinical-patient"),
                _p("subject", "reference", "subject", target="Patient", base="Encounter-subject"),
                _p("date", "date", "period", base="clinical-date"),
                _p("status", "token", "status", base="Encounter-status"),
                _p("type", "token", "type", base="clinical-type"),
                _p("practitioner", "reference", "participant.individual", target="Practitioner",
                   base="Encounter-practitioner"),
                _p("identifier", "token", "identifier", base="clinical-identifier"),
            ),
            patient_compartment=("subject",),
            profiles=(f"{US_CORE}/us-core-encounter",),
            compound_indexes=(("patient", "date"),),
        ),
        ResourceDef(
            "DocumentReference",
            (
                _p("patient", "reference", "subject", target="Patient", base="clinical-patient"),
                _p("subject", "reference", "subject", target="Patient", base="DocumentReference-subject"),
                _p("category", "token", "category", base="DocumentReference-category"),
                _p("type", "token", "type", base="clinical-type"),
                _p("date", "date", "date", base="DocumentReference-date"),
                _p("period", "date", "context.period", base="DocumentReference-period"),
                _p("status", "token", "status", base="DocumentReference-status"),
                _p("identifier", "token", "identifier", base="clinical-identifier"),
                _p("author", "reference", "author", target="Practitioner", base="DocumentReference-author"),
                _p("encounter", "reference", "context.encounter", target="Encounter",
                   base="clinical-encounter"),
                # The note lifecycle (records/lifecycle): addenda and corrections point at the
                # note they amend; `docstatus` is not an R4 base parameter (R5 adds doc-status).
                _p("relatesto", "reference", "relatesTo.target", target="DocumentReference",
                   base="DocumentReference-relatesto"),
                _p("relation", "token", "relatesTo.code", base="DocumentReference-relation"),
                _p("authenticator", "reference", "authenticator", target="Practitioner",
                   base="DocumentReference-authenticator"),
                _p("docstatus", "token", "docStatus", base="DocumentReference-docstatus"),
            ),
            patient_compartment=("subject",),
            profiles=(f"{US_CORE}/us-core-documentreference",),
            compound_indexes=(("patient", "category", "date"), ("patient", "type")),
            operations=(("docref", "http://hl7.org/fhir/us/core/OperationDefinition/docref"),),
        ),
        ResourceDef(
            "Observation",
            (
                _p("patient", "reference", "subject", target="Patient", base="clinical-patient"),
                _p("subject", "reference", "subject", target="Patient", base="Observation-subject"),
                _p("category", "token", "category", base="Observation-category"),
                _p("code", "token", "code", base="clinical-code"),
                _p("date", "date", "effectiveDateTime", "effectivePeriod", "effectiveInstant",
                   base="clinical-date"),
                _p("status", "token", "status", base="Observation-status"),
                _p("value-quantity", "quantity", "valueQuantity", base="Observation-value-quantity"),
                _p("encounter", "reference", "encounter", target="Encounter", base="clinical-encounter"),
                _p("derived-from", "reference", "derivedFrom", base="Observation-derived-from"),
                _p("has-member", "reference", "hasMember", base="Observation-has-member"),
            ),
            patient_compartment=("subject",),
            profiles=(f"{US_CORE}/us-core-observation-screening-assessment",),
            compound_indexes=(("patient", "category", "date"), ("patient", "code", "date")),
        ),
        ResourceDef(
            "Condition",
            (
                _p("patient", "reference", "subject", target="Patient", base="clinical-patient"),
                _p("subject", "reference", "subject", target="Patient", base="Condition-subject"),
                _p("code", "token", "code", base="clinical-code"),
                _p("category", "token", "category", base="Condition-category"),
                _p("clinical-status", "token", "clinicalStatus", base="Condition-clinical-status"),
                _p("onset-date", "date", "onsetDateTime", "onsetPeriod", base="Condition-onset-date"),
            ),
            patient_compartment=("subject",),
            profiles=(f"{US_CORE}/us-core-condition-problems-health-concerns",),
        ),
        ResourceDef(
            "Provenance",
            (
                _p("target", "reference", "target", base="Provenance-target"),
                _p("patient", "reference", "target", target="Patient", base="Provenance-patient"),
                _p("recorded", "date", "recorded", base="Provenance-recorded"),
                _p("agent", "reference", "agent.who", base="Provenance-agent"),
            ),
            patient_compartment=("target",),
            profiles=(f"{US_CORE}/us-core-provenance",),
            compartment_from_targets=("target",),
        ),
        # Who treats whom: psychnotes lets only a member of a patient's active care team write
        # their psychotherapy notes (asked over HTTP through the gateway). R4 CareTeam search
        # parameters patient, subject, participant, status, category, date; Patient compartment
        # `patient | participant` (R4 compartmentdefinition-patient).
        ResourceDef(
            "CareTeam",
            (
                _p("patient", "reference", "subject", target="Patient", base="clinical-patient"),
                _p("subject", "reference", "subject", target="Patient", base="CareTeam-subject"),
                _p("participant", "reference", "participant.member", target="Practitioner",
                   base="CareTeam-participant"),
                _p("status", "token", "status", base="CareTeam-status"),
                _p("category", "token", "category", base="CareTeam-category"),
                _p("date", "date", "period", base="clinical-date"),
            ),
            patient_compartment=("subject", "participant.member"),
            profiles=(f"{US_CORE}/us-core-careteam",),
        ),
        # Insurer member lists for Bulk Data group export. A Group is in the Patient compartment
        # of each member (R4 compartmentdefinition-patient: `member`).
        ResourceDef(
            "Group",
            (
                _p("identifier", "token", "identifier", base="Group-identifier"),
                _p("type", "token", "type", base="Group-type"),
                _p("code", "token", "code", base="Group-code"),
                _p("actual", "token", "actual", base="Group-actual"),
                _p("member", "reference", "member.entity", target="Patient", base="Group-member"),
                _p("managing-entity", "reference", "managingEntity", base="Group-managing-entity"),
            ),
            patient_compartment=("member.entity",),
        ),
        # Da Vinci CDex 2.1 data and attachment requests from payers (records/cdex), and patients'
        # amendment requests (records/amendments). Outside every Patient compartment, as in R4
        # (task.html: "not linked to any defined compartments"; the CDex member is usually a
        # contained Patient): who sees a Task is decided by records.policy (its payer, reviewers,
        # the patient who filed an amendment request), never by patient scopes.
        ResourceDef(
            "Task",
            (
                _p("identifier", "token", "identifier", base="Task-identifier"),
                _p("status", "token", "status", base="Task-status"),
                _p("business-status", "token", "businessStatus", base="Task-business-status"),
                _p("code", "token", "code", base="Task-code"),
                _p("requester", "reference", "requester", base="Task-requester"),
                _p("owner", "reference", "owner", base="Task-owner"),
                _p("authored-on", "date", "authoredOn", base="Task-authored-on"),
                _p("modified", "date", "lastModified", base="Task-modified"),
                # Amendment requests (records/amendments): R4 Task-patient/-subject/-focus, and
                # `restriction-period`, Mindchart's own (R4's `period` is Task.executionPeriod;
                # nothing in R4 searches Task.restriction.period, the 45 CFR 164.526 deadline).
                _p("patient", "reference", "for", target="Patient", base="Task-patient"),
                _p("subject", "reference", "for", base="Task-subject"),
                _p("focus", "reference", "focus", base="Task-focus"),
                _p("period", "date", "executionPeriod", base="Task-period"),
                SearchParam("restriction-period", "date", ("restriction.period",), None,
                            f"{MINDCHART_SEARCH_PARAM_BASE}/Task-restriction-period"),
            ),
            patient_compartment=(),
            profiles=("http://hl7.org/fhir/us/davinci-cdex/StructureDefinition/cdex-task-data-request",
                      "http://hl7.org/fhir/us/davinci-cdex/StructureDefinition/cdex-task-attachment-request"),
        ),
    )
}
