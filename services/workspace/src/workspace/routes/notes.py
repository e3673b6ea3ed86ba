"""Writing a progress note: templates, load-last-note, session times and CPT, the interventions
pick-list with the therapist's pins, saved phrases, PHQ-9/GAD-7 scoring, autosaved drafts with
If-Match, signing, addenda and corrections; and, kept apart, the private psychotherapy note.

Everything in the note form is one form, so every button (pin, insert a phrase, score) also
saves what was typed: nothing is lost without JavaScript. `static/app.js`, when it runs, saves
in the background, inserts phrases at the cursor and shows the session length as times change.
The private note is its own form and its own request to psychnotes (never sent with the note).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from workspace import notes, pages, screening, store
from workspace.gateway_api import ApiError, FhirApi
from workspace.routes.patients import CLINICAL_NOTE, note_summary
from workspace.therapist import Therapist, patient_name, signed_in

router = APIRouter()
LOINC = screening.LOINC
CPT = "http://www.ama-assn.org/go/cpt"
PROGRESS_NOTE = {"system": LOINC, "code": "11506-3", "display": "Progress note"}
CATEGORY = {"system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
            "code": "clinical-note", "display": "Clinical Note"}
CONFLICT = ("This note was changed somewhere else (another tab or window) after you opened it, so "
            "your changes were not saved over it. Your text is still below: copy what you need, "
            "then open the note again to see the newer version.")
MAX_PHRASES = 50
MAX_PHRASE_CHARS = 500


# -- reading the form ---------------------------------------------------------------------------

def _instant(day: str, clock: str) -> datetime | None:
    try:
        return datetime.fromisoformat(f"{day}T{clock}").replace(tzinfo=UTC)
    except ValueError:
        return None


def _iso(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


class SessionTimes:
    def __init__(self, day: str, start: str, end: str, kind: str) -> None:
        self.day, self.start_text, self.end_text = day, start, end
        self.kind = kind if kind in notes.SESSION_KINDS else "psychotherapy"
        self.start = _instant(day, start) if day and start else None
        self.end = _instant(day, end) if day and end else None
        self.minutes = notes.duration_minutes(self.start, self.end)
        self.cpt = notes.suggest_cpt(self.kind, self.minutes)

    @classmethod
    def from_form(cls, form: dict[str, str]) -> SessionTimes:
        return cls(form.get("session_date", ""), form.get("start", ""), form.get("end", ""),
                   form.get("session_kind", "psychotherapy"))

    @classmethod
    def from_encounter(cls, encounter: dict[str, Any]) -> SessionTimes:
        period = encounter.get("period", {})
        start, end = str(period.get("start", "")), str(period.get("end", ""))
        codes = {c.get("code") for t in encounter.get("type", []) for c in t.get("coding", [])}
        kind = "intake" if "90791" in codes else "crisis" if "90839" in codes else "psychotherapy"
        return cls(start[:10], start[11:16], end[11:16], kind)


def summary_text(times: SessionTimes) -> str:
    parts = [f"Duration: {times.minutes} minutes." if times.minutes is not None
             else "Duration: enter start and end."]
    if times.cpt:
        codes = " + ".join(f"{c} ({notes.CPT_DISPLAY[c]})" for c in times.cpt)
        parts.append(f"Suggested CPT: {codes}.")
    elif times.minutes is not None:
        parts.append("No psychotherapy code under 16 minutes.")
    return " ".join(parts)


def encounter_resource(me: Therapist, patient_id: str, times: SessionTimes,
                       existing: dict[str, Any] | None = None) -> dict[str, Any]:
    encounter: dict[str, Any] = dict(existing or {})
    encounter.update({
        "resourceType": "Encounter", "status": "finished" if times.end else "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB",
                  "display": "ambulatory"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "participant": [{"individual": {"reference": me.practitioner}}],
    })
    for name in ("period", "length", "type"):
        encounter.pop(name, None)
    if times.start:
        encounter["period"] = {"start": _iso(times.start)} | ({"end": _iso(times.end)} if times.end else {})
    elif _instant(times.day, "00:00"):
        encounter["period"] = {"start": times.day}  # the day alone until the times are in
    if times.minutes is not None:
        encounter["length"] = {"value": times.minutes, "unit": "min", "system": "http://unitsofmeasure.org",
                               "code": "min"}
    if times.cpt:
        encounter["type"] = [{"coding": [{"system": CPT, "code": code, "display": notes.CPT_DISPLAY[code]}]}
                             for code in times.cpt]
    encounter.pop("meta", None)
    return encounter


def note_resource(me: Therapist, patient_id: str, draft: notes.NoteDraft, encounter_id: str,
                  times: SessionTimes, note_id: str | None, relates: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    text = draft.markdown()
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference", "status": "current", "docStatus": "preliminary",
        "meta": {"security": screening.RESTRICTED_BH},
        "type": {"coding": [PROGRESS_NOTE]}, "category": [{"coding": [CATEGORY]}],
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": _iso(datetime.now(UTC)), "author": [{"reference": me.practitioner}],
        "content": [{"attachment": {"contentType": "text/markdown",
                                    "data": base64.b64encode(text.encode()).decode(),
                                    "title": f"{draft.template} progress note"}}],
        "context": {"encounter": [{"reference": f"Encounter/{encounter_id}"}]},
    }
    if times.start and times.end:
        doc["context"]["period"] = {"start": _iso(times.start), "end": _iso(times.end)}
    if relates:
        doc["relatesTo"] = [relates]
    if note_id:
        doc["id"] = note_id
    return doc


def note_text(doc: dict[str, Any]) -> str:
    for content in doc.get("content", []):
        data = content.get("attachment", {}).get("data")
        if data:
            return base64.b64decode(data).decode(errors="replace")
    return ""


def encounter_id_of(doc: dict[str, Any]) -> str:
    refs = doc.get("context", {}).get("encounter", [])
    return str(refs[0]["reference"]).removeprefix("Encounter/") if refs else ""


# -- preferences: pins and phrases --------------------------------------------------------------

def ordered_interventions(pins: list[str]) -> list[dict[str, Any]]:
    pinned = [p for p in pins if p in notes.INTERVENTIONS]
    rest = sorted((k for k in notes.INTERVENTIONS if k not in pinned), key=notes.INTERVENTIONS.__getitem__)
    return ([{"id": k, "label": notes.INTERVENTIONS[k], "pinned": True, "first": i == 0,
              "last": i == len(pinned) - 1} for i, k in enumerate(pinned)]
            + [{"id": k, "label": notes.INTERVENTIONS[k], "pinned": False} for k in rest])


async def apply_preference_action(me: Therapist, action: str, form: dict[str, str],
                                  draft: notes.NoteDraft) -> str | None:
    """Pin, unpin, reorder, add or delete a phrase, or insert one. Returns a status message."""
    prefs = await me.preferences()
    pins: list[str] = [p for p in prefs.get("pins", []) if p in notes.INTERVENTIONS]
    phrases: list[str] = list(prefs.get("phrases", []))
    verb, _, arg = action.partition(":")
    if verb in ("pin", "unpin", "up", "down") and arg in notes.INTERVENTIONS:
        label = notes.INTERVENTIONS[arg]
        if verb == "pin" and arg not in pins:
            pins.append(arg)
        elif verb == "unpin" and arg in pins:
            pins.remove(arg)
        elif verb in ("up", "down") and arg in pins:
            i = pins.index(arg)
            j = i - 1 if verb == "up" else i + 1
            if 0 <= j < len(pins):
                pins[i], pins[j] = pins[j], pins[i]
        await store.set_preference(me.db, me.practitioner, "pins", pins)
        return {"pin": f"Pinned {label}.", "unpin": f"Unpinned {label}.",
                "up": f"Moved {label} up.", "down": f"Moved {label} down."}[verb]
    if verb == "add-phrase":
        phrase = form.get("new_phrase", "").strip()[:MAX_PHRASE_CHARS]
        if phrase and phrase not in phrases and len(phrases) < MAX_PHRASES:
            phrases.append(phrase)
            await store.set_preference(me.db, me.practitioner, "phrases", phrases)
            return "Phrase saved."
        return None
    if verb in ("phrase", "delete-phrase") and arg.isdigit() and int(arg) < len(phrases):
        if verb == "delete-phrase":
            phrases.pop(int(arg))
            await store.set_preference(me.db, me.practitioner, "phrases", phrases)
            return "Phrase deleted."
        section = form.get("phrase_section", "")
        if section not in draft.sections:
            section = list(draft.sections)[-1]
        current = draft.sections[section]
        draft.sections[section] = f"{current} {phrases[int(arg)]}".strip() if current else phrases[int(arg)]
        return f"Phrase inserted into {section}."
    return None


# -- screening ------------------------------------------------------------------------------------

async def encounter_scores(records: FhirApi, encounter_id: str) -> dict[str, Any]:
    found = await records.search("Observation", [("encounter", f"Encounter/{encounter_id}"),
                                                 ("_count", "200")]) if encounter_id else []
    totals: dict[str, dict[str, Any]] = {}
    self_harm = False
    for obs in found:
        codes = {c.get("code") for c in obs.get("code", {}).get("coding", [])}
        for instrument in screening.INSTRUMENTS.values():
            if instrument.total in codes and "valueQuantity" in obs:
                value = int(obs["valueQuantity"]["value"])
                totals[instrument.key] = {"total": value, "severity": instrument.severity(value),
                                          "name": instrument.name, "max": instrument.maximum}
        if screening.SELF_HARM_ITEM in codes:
            answer = {c.get("code") for c in obs.get("valueCodeableConcept", {}).get("coding", [])}
            self_harm = self_harm or bool(answer - {screening.ANSWERS[0][0]})
    return {"totals": totals, "self_harm": self_harm}


# -- the private note pane ------------------------------------------------------------------------

async def private_pane(me: Therapist, patient_id: str) -> dict[str, Any]:
    """Earlier private notes for this patient, read under the originator-treatment exception
    (45 CFR 164.508(a)(2)(i)(A): the originator's own use for treatment), with a consent token
    psychnotes mints for this therapist's own notes only; each read is audited there."""
    vault = await me.psychnotes()
    if vault is None:
        return {"open": False, "notes": []}
    try:
        minted = await vault.operation("$consent-token", {"resourceType": "Parameters", "parameter": [
            {"name": "basis", "valueCode": "originator-treatment"},
            {"name": "patient", "valueReference": {"reference": f"Patient/{patient_id}"}},
            {"name": "purpose", "valueCode": "TREAT"}]})
    except ApiError:
        return {"open": True, "notes": []}  # not the author of any private note for this patient yet
    token = next(str(p["valueString"]) for p in minted["parameter"] if p["name"] == "token")
    found = await vault.search("DocumentReference", [("patient", f"Patient/{patient_id}"), ("_count", "50")],
                               headers={"Consent-Token": token})
    earlier = sorted(({"date": str(d.get("date", ""))[:16].replace("T", " "), "text": note_text(d),
                       "state": private_state(d)}
                      for d in found), key=lambda n: n["date"], reverse=True)
    return {"open": True, "notes": earlier}


AWAITING_COSIGNATURE = "https://mindchart.dev/fhir/CodeSystem/awaiting-cosignature"


def private_state(doc: dict[str, Any]) -> str:
    """Where a private note stands in psychnotes' lifecycle, said as the notes list says it of
    progress notes: an addendum or correction, signed, replaced (superseded by a signed
    correction) or awaiting its author's supervisor. A note without docStatus (outside the
    lifecycle, as the workspace writes them) is just a private note."""
    codes = {r.get("code") for r in doc.get("relatesTo", [])}
    kind = "Addendum" if "appends" in codes else "Correction" if "replaces" in codes else "Private note"
    if any(t.get("system") == AWAITING_COSIGNATURE for t in doc.get("meta", {}).get("tag", [])):
        status = "Awaiting co-signature"
    else:
        status = str(note_summary(doc)["status"])
    return f"{kind} · {status}" if status else kind


# -- pages ----------------------------------------------------------------------------------------

async def render_note(me: Therapist, patient_id: str, patient: dict[str, Any], *, note_id: str | None,
                      version: str | None, draft: notes.NoteDraft, times: SessionTimes,
                      encounter_id: str, status: str | None = None, error: str | None = None,
                      http_status: int = 200, private_message: str | None = None,
                      private_error: str | None = None, private_text: str = "") -> Response:
    prefs = await me.preferences()
    scores = await encounter_scores(me.records, encounter_id)
    return pages.render(
        me.request, "note.html", status=http_status, user=me.practitioner, csrf=me.csrf,
        patient=patient, name=patient_name(patient), note_id=note_id, version=version, draft=draft,
        templates=notes.TEMPLATES, template_names=notes.TEMPLATE_NAMES, field=notes.section_field,
        times=times, kinds=notes.SESSION_KINDS, summary=summary_text(times),
        interventions=ordered_interventions(prefs.get("pins", [])), phrases=prefs.get("phrases", []),
        instruments=list(screening.INSTRUMENTS.values()), answers=screening.ANSWERS, scores=scores,
        encounter_id=encounter_id, status_message=status, error=error,
        private=await private_pane(me, patient_id) if note_id else {"open": False, "notes": []},
        private_message=private_message, private_error=private_error, private_text=private_text,
        action=f"/patients/{patient_id}/notes/{note_id}" if note_id else f"/patients/{patient_id}/notes")


async def last_note(me: Therapist, patient_id: str) -> dict[str, Any] | None:
    found = await me.records.search("DocumentReference", [
        ("patient", patient_id), ("category", CLINICAL_NOTE), ("author", me.practitioner),
        ("_sort", "-date"), ("_count", "20")])
    return next((d for d in found if not d.get("relatesTo") and d.get("status") == "current"), None)


@router.get("/patients/{patient_id}/notes/new")
async def new_note(patient_id: str, request: Request, template: str = "", last: str = "") -> Response:
    me = await signed_in(request)
    patient = await me.patient(patient_id)
    prefs = await me.preferences()
    chosen = template if template in notes.TEMPLATES else prefs.get("template", "DAP")
    if template in notes.TEMPLATES and template != prefs.get("template"):
        await store.set_preference(me.db, me.practitioner, "template", template)
    draft, status = notes.NoteDraft.empty(chosen), None
    if last:
        previous = await last_note(me, patient_id)
        if previous is None:
            status = "There is no earlier note of yours for this patient to start from."
        else:
            draft = notes.parse_markdown(note_text(previous))
            draft.safety = ""
            status = f"Started from your note of {str(previous.get('date', ''))[:10]}."
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    return await render_note(me, patient_id, patient, note_id=None, version=None, draft=draft,
                             times=SessionTimes(today, "", "", "psychotherapy"), encounter_id="",
                             status=status)


@router.get("/patients/{patient_id}/notes/{note_id}")
async def open_note(patient_id: str, note_id: str, request: Request) -> Response:
    me = await signed_in(request)
    patient = await me.patient(patient_id)
    doc = await _own_note(me, patient_id, note_id)
    encounter_id = encounter_id_of(doc)
    encounter = await me.records.read("Encounter", encounter_id) if encounter_id else {}
    times = SessionTimes.from_encounter(encounter)
    if doc.get("docStatus") != "preliminary" or doc.get("relatesTo"):
        return await render_signed(me, patient_id, patient, doc, times)
    return await render_note(me, patient_id, patient, note_id=note_id, version=doc["meta"]["versionId"],
                             draft=notes.parse_markdown(note_text(doc)), times=times,
                             encounter_id=encounter_id)


async def _own_note(me: Therapist, patient_id: str, note_id: str) -> dict[str, Any]:
    try:
        doc = await me.records.read("DocumentReference", note_id)
    except ApiError:
        raise pages.NotFoundPage from None
    if doc.get("subject", {}).get("reference") != f"Patient/{patient_id}":
        raise pages.NotFoundPage
    return doc


async def render_signed(me: Therapist, patient_id: str, patient: dict[str, Any], doc: dict[str, Any],
                        times: SessionTimes, status: str | None = None, error: str | None = None,
                        http_status: int = 200) -> Response:
    related = await me.records.search("DocumentReference", [
        ("patient", patient_id), ("category", CLINICAL_NOTE), ("_sort", "date"), ("_count", "100")])
    attached = [{"summary": note_summary(d), "text": note_text(d)} for d in related
                if any(str(r.get("target", {}).get("reference")) == f"DocumentReference/{doc['id']}"
                       for r in d.get("relatesTo", []))]
    return pages.render(
        me.request, "note_signed.html", status=http_status, user=me.practitioner, csrf=me.csrf,
        patient=patient, name=patient_name(patient), doc=doc, summary=note_summary(doc),
        text=note_text(doc), times=times, attached=attached, status_message=status, error=error,
        private=await private_pane(me, patient_id), private_message=None, private_error=None,
        private_text="", note_id=doc["id"], cpt_display=notes.CPT_DISPLAY)


@router.post("/patients/{patient_id}/notes")
async def create_note(patient_id: str, request: Request) -> Response:
    return await save_note(patient_id, None, request)


@router.post("/patients/{patient_id}/notes/{note_id}")
async def update_note(patient_id: str, note_id: str, request: Request) -> Response:
    return await save_note(patient_id, note_id, request)


async def save_note(patient_id: str, note_id: str | None, request: Request) -> Response:
    me = await signed_in(request)
    patient = await me.patient(patient_id)
    form, lists = await me.form_lists()
    autosave = request.headers.get("x-autosave") == "1"
    action = form.get("action", "save")
    draft = notes.NoteDraft.from_form(form, lists.get("intervention", []))
    times = SessionTimes.from_form(form)
    status = await apply_preference_action(me, action, form, draft)
    version = form.get("version") or None
    encounter_id = form.get("encounter", "")
    if note_id is not None:
        current = await _own_note(me, patient_id, note_id)
        if current.get("docStatus") != "preliminary":
            return pages.message(request, "This note is signed",
                                 "A signed note cannot be changed: add an addendum or a correction.",
                                 status=409, user=me.practitioner, csrf=me.csrf)
        encounter_id = encounter_id_of(current)
    score_error = None
    if action == "sign":
        scores = await encounter_scores(me.records, encounter_id)
        if scores["self_harm"] and form.get("safety_ack") != "yes":
            return await render_note(
                me, patient_id, patient, note_id=note_id, version=version, draft=draft, times=times,
                encounter_id=encounter_id, http_status=422,
                error="PHQ-9 question 9 was answered above 0. Confirm the safety assessment below "
                      "before signing.")
        if scores["self_harm"]:
            stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            draft.safety = (f"PHQ-9 item 9 answered above 0; risk assessed and safety addressed "
                            f"(acknowledged by the clinician {stamp}). {draft.safety}").strip()
    try:
        if note_id is None:
            encounter = await me.records.create(encounter_resource(me, patient_id, times))
            encounter_id = encounter["id"]
            saved = await me.records.create(note_resource(me, patient_id, draft, encounter_id, times, None))
            note_id = str(saved["id"])
        else:
            saved = await me.records.update(
                note_resource(me, patient_id, draft, encounter_id, times, note_id), version or "0")
            await _update_encounter(me, patient_id, encounter_id, times)
    except ApiError as exc:
        if exc.status in (409, 412):
            if autosave:
                return JSONResponse({"error": CONFLICT}, status_code=409)
            return await render_note(me, patient_id, patient, note_id=note_id, version=version,
                                     draft=draft, times=times, encounter_id=encounter_id, error=CONFLICT,
                                     http_status=409)
        raise
    version = str(saved["meta"]["versionId"])
    if action.startswith("score:"):
        instrument = screening.INSTRUMENTS.get(action.partition(":")[2])
        if instrument is not None:
            try:
                answers = screening.read_answers(instrument, form)
            except screening.ScoreError as exc:
                score_error = str(exc)
            else:
                await me.records.transaction(screening.observations(
                    instrument, answers, patient=f"Patient/{patient_id}",
                    encounter=f"Encounter/{encounter_id}", performer=me.practitioner,
                    effective=_iso(times.start) or _iso(datetime.now(UTC)) or ""))
                total = sum(answers)
                status = f"{instrument.name} saved: total {total} ({instrument.severity(total)})."
    if action == "sign":
        return await sign(me, patient_id, patient, note_id, version, times)
    if autosave:
        return JSONResponse({"id": note_id, "version": version, "encounter": encounter_id,
                             "url": f"/patients/{patient_id}/notes/{note_id}",
                             "summary": summary_text(times),
                             "saved": datetime.now(UTC).strftime("%H:%M:%S UTC")})
    if action == "save" and not score_error:
        return RedirectResponse(f"/patients/{patient_id}/notes/{note_id}?saved=1", status_code=303)
    return await render_note(me, patient_id, patient, note_id=note_id, version=version, draft=draft,
                             times=times, encounter_id=encounter_id, status=status or "Draft saved.",
                             error=score_error, http_status=422 if score_error else 200)


async def _update_encounter(me: Therapist, patient_id: str, encounter_id: str, times: SessionTimes) -> None:
    if not encounter_id:
        return
    current = await me.records.read("Encounter", encounter_id)
    wanted = encounter_resource(me, patient_id, times, current)
    comparable = {k: v for k, v in current.items() if k != "meta"}
    if wanted != comparable:
        await me.records.update(wanted, str(current["meta"]["versionId"]))


async def sign(me: Therapist, patient_id: str, patient: dict[str, Any], note_id: str, version: str,
               times: SessionTimes) -> Response:
    """Sign and lock the note with records' `POST DocumentReference/{id}/$sign` (README
    "Lifecycle"): the note becomes final with the signer as authenticator and a signature
    Provenance; from then on it never changes, and addenda and corrections point at it. The draft
    was saved with If-Match in this same request, so what is signed is what the therapist saw."""
    try:
        await me.records.operation(f"DocumentReference/{note_id}/$sign",
                                   {"resourceType": "Parameters", "parameter": []})
    except ApiError as exc:
        if exc.status in (404, 405, 501):
            return pages.message(me.request, "Signing is not available",
                                 "The records server does not offer signing yet. The note is saved "
                                 "as a draft.", status=501, user=me.practitioner, csrf=me.csrf)
        raise
    return RedirectResponse(f"/patients/{patient_id}/notes/{note_id}?signed=1", status_code=303)


@router.post("/patients/{patient_id}/notes/{note_id}/addendum")
async def add_addendum(patient_id: str, note_id: str, request: Request) -> Response:
    """An addendum (`relatesTo.code = appends`) or a correction (`replaces`) of a signed note
    (FHIR R4 DocumentReference.relatesTo, document-relationship-type)."""
    me = await signed_in(request)
    patient = await me.patient(patient_id)
    form = await me.form()
    target = await _own_note(me, patient_id, note_id)
    code = "replaces" if form.get("kind") == "correction" else "appends"
    text = form.get("text", "").strip()
    encounter_id = encounter_id_of(target)
    times = SessionTimes.from_encounter(await me.records.read("Encounter", encounter_id)) if encounter_id \
        else SessionTimes("", "", "", "psychotherapy")
    if not text:
        return await render_signed(me, patient_id, patient, target, times, http_status=422,
                                   error="Write the text of the addendum or correction first.")
    title = "Correction" if code == "replaces" else "Addendum"
    body = f"# {title}\n\n{text}\n"
    doc = note_resource(me, patient_id, notes.NoteDraft("DAP", {}, []), encounter_id, times, None,
                        relates={"code": code, "target": {"reference": f"DocumentReference/{note_id}"}})
    doc["content"][0]["attachment"].update({"data": base64.b64encode(body.encode()).decode(),
                                            "title": title})
    # README "Lifecycle": an addendum or correction is a draft of its own, then signed.
    created = await me.records.create(doc)
    await me.records.operation(f"DocumentReference/{created['id']}/$sign",
                               {"resourceType": "Parameters", "parameter": []})
    return RedirectResponse(f"/patients/{patient_id}/notes/{note_id}?added={code}", status_code=303)


@router.post("/patients/{patient_id}/notes/{note_id}/private")
async def save_private(patient_id: str, note_id: str, request: Request) -> Response:
    """The private psychotherapy note: its own request, to psychnotes only. 45 CFR 164.501 keeps
    session times, diagnosis, medication and the like out of it: psychnotes refuses them (422),
    and the therapist is told to put them in the progress note."""
    me = await signed_in(request)
    patient = await me.patient(patient_id)
    form = await me.form()
    target = await _own_note(me, patient_id, note_id)
    vault = await me.psychnotes()
    if vault is None:
        return RedirectResponse(f"/login?vault=1&return_to=/patients/{patient_id}/notes/{note_id}",
                                status_code=303)
    text = form.get("private_text", "").strip()
    encounter_id = encounter_id_of(target)
    private: dict[str, Any] = {
        "resourceType": "DocumentReference", "status": "current",
        "type": {"text": "Psychotherapy note"}, "subject": {"reference": f"Patient/{patient_id}"},
        "date": _iso(datetime.now(UTC)),
        "content": [{"attachment": {"contentType": "text/plain",
                                    "data": base64.b64encode(text.encode()).decode()}}],
    }
    if encounter_id:
        private["context"] = {"encounter": [{"reference": f"Encounter/{encounter_id}"}]}
    message, error = None, None
    if not text:
        error = "Write the private note first."
    else:
        try:
            await vault.create(private)
            message = "Private note saved to the psychotherapy-notes vault."
            text = ""
        except ApiError as exc:
            if exc.status != 422:
                raise
            error = (f"The vault refused this private note: {exc.message}. Session times, diagnoses, "
                     "medication and test results belong in the progress note, not here.")
    if target.get("docStatus") != "preliminary" or target.get("relatesTo"):
        encounter = await me.records.read("Encounter", encounter_id) if encounter_id else {}
        return await render_signed(me, patient_id, patient, target, SessionTimes.from_encounter(encounter),
                                   status=message, error=error, http_status=422 if error else 200)
    encounter = await me.records.read("Encounter", encounter_id) if encounter_id else {}
    return await render_note(me, patient_id, patient, note_id=note_id, version=target["meta"]["versionId"],
                             draft=notes.parse_markdown(note_text(target)),
                             times=SessionTimes.from_encounter(encounter), encounter_id=encounter_id,
                             private_message=message, private_error=error, private_text=text,
                             http_status=422 if error else 200)
