"""The caseload and one patient's page: their notes (drafts, signed, addenda, corrections) and
their PHQ-9 and GAD-7 totals over time with the severity bands drawn."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from workspace import notes, pages, screening
from workspace.therapist import Therapist, patient_name, signed_in

router = APIRouter()
LOINC = screening.LOINC
CLINICAL_NOTE = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category|clinical-note"


@router.get("/patients")
async def caseload(request: Request) -> Response:
    me = await signed_in(request)
    ids = await me.caseload()
    found = await me.records.search("Patient", [("_id", ",".join(ids)), ("_count", "200")]) if ids else []
    people = sorted(({"id": p["id"], "name": patient_name(p), "birthDate": p.get("birthDate", "")}
                     for p in found), key=lambda p: p["name"])
    return pages.render(request, "patients.html", user=me.practitioner, csrf=me.csrf, patients=people)


def note_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """How a note shows in the list: its kind (draft, signed, addendum, correction) and title."""
    relation = next((r for r in doc.get("relatesTo", []) if r.get("code") in ("appends", "replaces")), None)
    if relation and relation["code"] == "appends":
        kind = "Addendum"
    elif relation:
        kind = "Correction"
    else:
        kind = "Progress note"
    status = ("Entered in error" if doc.get("status") == "entered-in-error" else
              "Replaced" if doc.get("status") == "superseded" else
              "Draft" if doc.get("docStatus") == "preliminary" else
              "Signed" if doc.get("docStatus") in ("final", "amended") else doc.get("docStatus", ""))
    title = kind
    for content in doc.get("content", []):
        attachment = content.get("attachment", {})
        if attachment.get("contentType", "").startswith("text/markdown") and attachment.get("data"):
            first = base64.b64decode(attachment["data"]).decode(errors="replace").splitlines()[:1]
            if first and first[0].startswith("# "):
                heading = first[0][2:]
                title = heading if kind in ("Progress note", heading) else f"{kind}: {heading}"
    return {"id": doc["id"], "date": str(doc.get("date", ""))[:10], "title": title, "status": status,
            "target": str(relation["target"].get("reference", "")).removeprefix("DocumentReference/")
            if relation else None}


async def charts(me: Therapist, patient_id: str) -> list[screening.Chart]:
    result = []
    for instrument in (screening.PHQ9, screening.GAD7):
        found = await me.records.search("Observation", [
            ("patient", patient_id), ("code", f"{LOINC}|{instrument.total}"), ("_sort", "date"),
            ("_count", "100")])
        points = [(str(o.get("effectiveDateTime", ""))[:10], int(o["valueQuantity"]["value"]))
                  for o in found if "valueQuantity" in o and o.get("status") != "entered-in-error"]
        result.append(screening.Chart(instrument, points))
    return result


@router.get("/patients/{patient_id}")
async def patient_page(patient_id: str, request: Request) -> Response:
    me = await signed_in(request)
    patient = await me.patient(patient_id)
    docs = await me.records.search("DocumentReference", [
        ("patient", patient_id), ("category", CLINICAL_NOTE), ("_sort", "-date"), ("_count", "100")])
    prefs = await me.preferences()
    return pages.render(
        request, "patient.html", user=me.practitioner, csrf=me.csrf, patient=patient,
        name=patient_name(patient), notes=[note_summary(d) for d in docs],
        charts=await charts(me, patient_id),
        templates=notes.TEMPLATE_NAMES, default_template=prefs.get("template", "DAP"))
