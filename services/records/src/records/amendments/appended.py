"""The material 45 CFR 164.526(d)(4) appends to a note after a denied amendment, and how it
travels with every later disclosure of the note (164.526(d)(5)).

(d)(4): identify the record that is the subject of the disputed amendment and append or link the
request, the denial, the statement of disagreement and the rebuttal. Records appends them as
`DocumentReference`s with `relatesTo: [{code: appends, target: the note}]` (R4
document-relationship-type), `context.related` the Task, category US Core `clinical-note` plus
`https://mindchart.dev/fhir/CodeSystem/amendment#statement-of-disagreement` (type LOINC 51855-5
Patient Note, author the patient) or `#rebuttal` (type LOINC 34109-9 Note, author the note's
author). The statement's text carries the request and the denial too, so whoever receives it has
all of the (d)(4) material even without access to the Task. It copies the note's security labels,
so it is withheld or released exactly where the note is.

(d)(5)(i) "must include the material appended ... with any subsequent disclosure". Records does:

- read and vread of the note: an RFC 8288 `Link` header per appended document,
  `<[base]/DocumentReference/{id}>; rel="related"; title="statement-of-disagreement"`;
- a search that matches the note: the appended documents as `search.mode: include` entries
  (whatever `_include`/`_revinclude` asked for; `_revinclude=DocumentReference:relatesto` too);
- `Patient/$everything` and bulk `$export`: they are DocumentReferences of the patient, in the
  same NDJSON file as the note;
- CDex: an approved release of the note carries them in the answer Bundle.

Each is read through the caller's policy-bound store, so no one sees more than they may.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import orjson

from records.amendments import requests
from records.resources import RESOURCES
from records.store import ResourceStore, StoredResource

NOTE = RESOURCES["DocumentReference"]
US_CORE_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
STATEMENT = "statement-of-disagreement"
REBUTTAL = "rebuttal"
KINDS = frozenset({STATEMENT, REBUTTAL})
CATEGORY_TOKENS = sorted(f"{requests.SYSTEM}|{kind}" for kind in KINDS)  # sp.category values
TYPES = {STATEMENT: {"system": "http://loinc.org", "code": "51855-5", "display": "Patient Note"},
         REBUTTAL: {"system": "http://loinc.org", "code": "34109-9", "display": "Note"}}
TITLES = {STATEMENT: "Statement of disagreement (45 CFR 164.526(d)(2))",
          REBUTTAL: "Rebuttal of the statement of disagreement (45 CFR 164.526(d)(3))"}


def kind_of(document: dict[str, Any]) -> str | None:
    """`statement-of-disagreement` or `rebuttal` for an appended amendment document, else None."""
    for category in document.get("category") or []:
        for c in (category or {}).get("coding") or [] if isinstance(category, dict) else []:
            if isinstance(c, dict) and c.get("system") == requests.SYSTEM and c.get("code") in KINDS:
                return str(c["code"])
    return None


def document(kind: str, task: dict[str, Any], note: dict[str, Any], author: str, body: str,
             moment: datetime) -> dict[str, Any]:
    """The appended DocumentReference; for a statement, `body` is preceded by the request and
    the denial it answers, so the statement alone carries the (d)(4) material."""
    if kind == STATEMENT:
        denial = next((o.get("valueString") for o in requests.outputs(task, "denial")), "")
        body = (f"Request for amendment, filed {str(task.get('authoredOn', ''))[:10]}:\n"
                f"{task.get('description', '')}\n\nDenial:\n{denial}\n\n"
                f"Statement of disagreement, filed {requests.instant(moment)[:10]}:\n{body}")
    security = (note.get("meta") or {}).get("security")
    return {
        "resourceType": "DocumentReference",
        **({"meta": {"security": security}} if security else {}),
        "status": "current",
        "docStatus": "final",
        "type": {"coding": [TYPES[kind]], "text": TITLES[kind]},
        "category": [{"coding": [{"system": US_CORE_CATEGORY, "code": "clinical-note",
                                  "display": "Clinical Note"}]},
                     {"coding": [requests.coding(kind, TITLES[kind])]}],
        "subject": note.get("subject"),
        "date": requests.instant(moment),
        "author": [{"reference": author}],
        "description": f"{TITLES[kind]} about DocumentReference/{note.get('id')}, amendment "
                       f"request Task/{task.get('id')}",
        "relatesTo": [{"code": "appends", "target": {"reference": f"DocumentReference/{note.get('id')}"}}],
        "content": [{"attachment": {"contentType": "text/plain; charset=utf-8",
                                    "data": base64.b64encode(body.encode()).decode(),
                                    "title": TITLES[kind], "creation": requests.instant(moment)}}],
        "context": {"related": [{"reference": f"Task/{task.get('id')}"}]},
    }


async def material(store: ResourceStore, notes: list[StoredResource]) -> list[StoredResource]:
    """The appended amendment documents of `notes` that the caller may see, in id order.

    Each note's marker (StoredResource.appended, written by store.py with every statement and
    rebuttal) says which to read: notes marked empty cost no query, the ids of the others are
    read in one (the caller's policy applied, deleted left out, as a search would); a note stored
    before the marker and not yet backfilled is asked about by reference, as it always was."""
    notes = [n for n in notes if n.resource_type == "DocumentReference"]
    refs = {f"DocumentReference/{n.id}" for n in notes}
    ids = sorted({i for n in notes for i in n.appended or ()})
    unknown = [f"DocumentReference/{n.id}" for n in notes if n.appended is None]
    found = await store.read_many(NOTE, ids, "search-type") if ids else []
    if unknown:
        found += await store.referring(NOTE, "relatesto", unknown)
    unique = {d.id: d for d in found if refs.intersection((d.sp or {}).get("relatesto") or [])}
    return sorted((d for d in unique.values() if d.raw is not None and kind_of(orjson.loads(d.raw))),
                  key=lambda d: d.id)


async def link_header(store: ResourceStore, note: StoredResource, base_url: str) -> dict[str, str]:
    """RFC 8288 `Link` to each appended document of a note (empty for any other resource)."""
    if note.resource_type != "DocumentReference":
        return {}
    links = []
    for d in await material(store, [note]):
        kind = kind_of(orjson.loads(d.raw or b"{}"))
        links.append(f'<{base_url}/DocumentReference/{d.id}>; rel="related"; title="{kind}"')
    return {"Link": ", ".join(links)} if links else {}


__all__ = ["CATEGORY_TOKENS", "KINDS", "REBUTTAL", "STATEMENT", "document", "kind_of", "link_header",
           "material"]
