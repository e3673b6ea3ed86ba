"""The review queue: what a request would release, and a person's decision on it.

45 CFR 164.502(b) (minimum necessary) is why a person decides: CDex 2.1's task-based approach
exists for answers that "need to be reviewed or filtered" before they leave. Rules:

- Candidates are the member's DocumentReferences and Observations matching the request's
  `data-code`s (DocumentReference.type / Observation.code) or `data-query`s (only those two types,
  always confined to the member), read through the *reviewer's* policy-bound store.
- Psychotherapy notes are never candidates (they live in psychnotes; anything labelled PSYTHPN
  that reached records is dropped all the same). Notes must be signed (`docStatus` final, the
  legal record's signing; `amended` for a signed correction) and `current` (not superseded or
  entered-in-error) to be candidates at all.
- Resources labelled R or V (v3-Confidentiality) are candidates marked `restricted`: an approval
  may release them only with `includeRestricted` = true.
- An approval releases a subset of the candidates as a `searchset` Bundle contained in the Task
  (`Task.output` type hrex-temp `data-value` → `#answer`, as CDex 2.1's completed-Task examples
  do), records the release as a disclosure per patient (purpose from the request) and the decision
  itself, all in one transaction with the Task's new version. A refusal sets `status` rejected
  with `statusReason` (CDex 2.1 "When the Task cannot be completed"); nothing is released.
- A request past its due date (`restriction.period.end`) that nobody has reviewed is marked
  (businessStatus `overdue`), never released automatically.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson

from mindchart_core import errors, signatures
from records.cdex import requests, store
from records.resources import RESOURCES
from records.search import query
from records.store import ResourceStore, StoredResource

CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CANDIDATE_TYPES = ("DocumentReference", "Observation")
CODE_PARAM = {"DocumentReference": "type", "Observation": "code"}
MAX_CANDIDATES = 200
ANSWER_ID = "answer"
# Signed by records/lifecycle's $sign: final, or amended (a signed correction); R4 composition-status.
SIGNED = ("final", "amended")


@dataclass(frozen=True)
class Candidate:
    stored: StoredResource
    restricted: bool

    @property
    def reference(self) -> str:
        return f"{self.stored.resource_type}/{self.stored.id}"


def _labels(resource: dict[str, Any]) -> set[tuple[str, str]]:
    labels = list((resource.get("meta") or {}).get("security", []))
    labels += [c for concept in resource.get("securityLabel", []) if isinstance(concept, dict)
               for c in concept.get("coding", [])]
    return {(str(x.get("system")), str(x.get("code"))) for x in labels if isinstance(x, dict)}


def _releasable(resource: dict[str, Any]) -> tuple[bool, bool]:
    """(may be a candidate, is restricted)."""
    labels = _labels(resource)
    if (ACT_CODE, "PSYTHPN") in labels:
        return False, True
    if resource.get("resourceType") == "DocumentReference" and (
            resource.get("docStatus") not in SIGNED or resource.get("status") != "current"):
        return False, False  # unsigned, superseded or entered-in-error notes are not released
    return True, bool({(CONFIDENTIALITY, "R"), (CONFIDENTIALITY, "V")} & labels)


async def member_of(reviewer: ResourceStore, request: requests.Request, base_url: str) -> str | None:
    """Our Patient id for the request's member: a reference to one of our Patients, or the one
    Patient sharing an identifier with the contained member (None when not exactly one)."""
    member = request.member
    reference = member.get("reference") if member.get("resourceType") != "Patient" else None
    if isinstance(reference, str):
        local = reference.removeprefix(base_url.rstrip("/") + "/")
        kind, _, ident = local.partition("/")
        return ident if kind == "Patient" and ident and "/" not in ident else None
    identifiers = member.get("identifier", [])
    if isinstance(identifiers, dict):
        identifiers = [identifiers]
    found: set[str] = set()
    definition = RESOURCES["Patient"]
    for identifier in identifiers:
        if not isinstance(identifier, dict) or not isinstance(identifier.get("value"), str):
            continue
        token = f"{identifier.get('system', '')}|{identifier['value']}"
        search = query.parse(definition, [("identifier", token)], base_url=base_url, strict=True)
        search.count = 2
        found.update(s.id for s in (await reviewer.search(definition, search)).resources)
    return found.pop() if len(found) == 1 else None


def _query_items(text: str, patient: str) -> tuple[str, list[tuple[str, str]]]:
    path, _, params = text.strip().lstrip("/").partition("?")
    kind = path.rsplit("/", 1)[-1]
    if kind not in CANDIDATE_TYPES:
        raise errors.Unprocessable(f"data-query may ask for {' or '.join(CANDIDATE_TYPES)} only")
    items = [(k, v) for k, v in parse_qsl(params, keep_blank_values=True)
             if k.split(":")[0] not in ("patient", "subject", "_include", "_revinclude", "_count",
                                         "_cursor", "_summary", "_elements")]
    return kind, [*items, ("patient", patient)]


async def candidates(reviewer: ResourceStore, task: dict[str, Any], base_url: str) -> list[Candidate]:
    request = requests.parse(task)
    patient = await member_of(reviewer, request, base_url)
    if patient is None:
        return []
    searches: list[tuple[str, list[tuple[str, str]]]] = []
    for system, code in request.codes:
        for kind in CANDIDATE_TYPES:
            searches.append((kind, [("patient", patient), (CODE_PARAM[kind], f"{system}|{code}")]))
    for text in request.queries:
        searches.append(_query_items(text, patient))
    found: dict[str, Candidate] = {}
    for kind, items in searches:
        definition = RESOURCES[kind]
        search = query.parse(definition, items, base_url=base_url, strict=True)
        search.count = MAX_CANDIDATES
        for stored in (await reviewer.search(definition, search)).resources:
            resource = orjson.loads(stored.raw or b"{}")
            allowed, restricted = _releasable(resource)
            if allowed:
                found[f"{kind}/{stored.id}"] = Candidate(stored, restricted)
    return sorted(found.values(), key=lambda c: c.reference)


def candidates_parameters(found: list[Candidate]) -> dict[str, Any]:
    """`$candidates`: each candidate with its reference, whether it is restricted, and itself."""
    parameter = [{"name": "candidate", "part": [
        {"name": "reference", "valueReference": {"reference": c.reference}},
        {"name": "restricted", "valueBoolean": c.restricted},
        {"name": "resource", "resource": orjson.loads(c.stored.raw or b"{}")},
    ]} for c in found]
    return {"resourceType": "Parameters", **({"parameter": parameter} if parameter else {})}


def approval_choice(body: Any) -> tuple[list[str], bool]:
    """`$approve` Parameters: `release` (valueReference, repeated), `includeRestricted`."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.Invalid("$approve takes a Parameters resource")
    chosen: list[str] = []
    include_restricted = False
    for p in body.get("parameter", []):
        if not isinstance(p, dict):
            continue
        if p.get("name") == "release":
            ref = (p.get("valueReference") or {}).get("reference")
            if not isinstance(ref, str):
                raise errors.Invalid("release needs a valueReference")
            chosen.append(ref)
        elif p.get("name") == "includeRestricted":
            include_restricted = p.get("valueBoolean") is True
    if not chosen:
        raise errors.Invalid("Approve at least one candidate (release), or refuse with $refuse")
    return sorted(set(chosen)), include_restricted


def refusal_reason(body: Any) -> str:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.Invalid("$refuse takes a Parameters resource")
    reason = next((p.get("valueString") for p in body.get("parameter", [])
                   if isinstance(p, dict) and p.get("name") == "reason"), None)
    if not isinstance(reason, str) or not reason.strip():
        raise errors.Invalid("$refuse needs a 'reason' (valueString)")
    if len(reason) > 2000:
        raise errors.Invalid("The reason is limited to 2000 characters")
    return reason.strip()


def select(found: list[Candidate], chosen: list[str], include_restricted: bool) -> list[Candidate]:
    """The approved subset; 422 (nothing released) if a choice is not a releasable candidate."""
    by_ref = {c.reference: c for c in found}
    released = []
    for ref in chosen:
        candidate = by_ref.get(ref)
        if candidate is None:
            raise errors.Unprocessable(f"{ref[:100]} is not a candidate of this request")
        if candidate.restricted and not include_restricted:
            raise errors.Unprocessable(
                f"{ref[:100]} is labelled restricted (R or V): set includeRestricted to release it")
        released.append(candidate)
    return released


def answer_bundle(released: list[Candidate], base_url: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle", "id": ANSWER_ID, "type": "searchset", "total": len(released),
        "entry": [{"fullUrl": f"{base_url}/{c.reference}",
                   "resource": orjson.loads(c.stored.raw or b"{}"),
                   "search": {"mode": "match"}} for c in released],
    }


VERIFICATION_SIGNATURE = {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5",
                          "display": "Verification Signature"}


def signed(bundle: dict[str, Any], key: Any, jwks_url: str, when: str, base_url: str) -> dict[str, Any]:
    """The answer with `Bundle.signature`: records' system signature (CDex 2.1 signatures.html:
    JWS, detached payload, over the canonical JSON of the Bundle without its `signature`;
    sigFormat application/jose; type Verification Signature; FHIR R4 datatypes.html#JSON). The
    JWS is records' document-signing key's (records/lifecycle), `jku` its published JWK Set; a
    verifier removes `Bundle.signature`, canonicalizes (RFC 8785) and checks the detached JWS."""
    unsigned = {k: v for k, v in bundle.items() if k != "signature"}
    jws = signatures.sign_detached(signatures.canonical(unsigned), key, header={"jku": jwks_url})
    return {**unsigned, "signature": {
        "type": [VERIFICATION_SIGNATURE], "when": when,
        "who": {"identifier": {"system": "urn:ietf:rfc:3986", "value": base_url},
                "display": "Mindchart records (system signature)"},
        "targetFormat": signatures.TARGET_FORMAT, "sigFormat": signatures.SIG_FORMAT,
        "data": base64.b64encode(jws.encode()).decode()}}


def per_patient(released: list[Candidate]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for c in released:
        resource = orjson.loads(c.stored.raw or b"{}")
        ref = (resource.get("subject") or {}).get("reference", "")
        patient = ref.rsplit("/", 1)[-1] if "Patient/" in ref else None
        if patient:
            kinds = counts.setdefault(patient, {})
            kinds[c.stored.resource_type] = kinds.get(c.stored.resource_type, 0) + 1
    return counts


def completed(task: dict[str, Any], answer: dict[str, Any], moment: str, *, status: str,
              business: dict[str, Any]) -> dict[str, Any]:
    output = {"type": {"coding": [{"system": requests.HREX_TEMP, "code": "data-value"}]},
              "valueReference": {"reference": f"#{ANSWER_ID}"}}
    contained = [r for r in task.get("contained", []) if r.get("id") != ANSWER_ID]
    return {**task, "contained": [*contained, answer], "output": [output], "status": status,
            "businessStatus": business, "lastModified": moment}


def refused(task: dict[str, Any], reason: str, moment: str) -> dict[str, Any]:
    return {**task, "status": "rejected", "statusReason": {"text": reason},
            "businessStatus": requests.stage("refused", "Refused by the provider's reviewer"),
            "lastModified": moment}


__all__ = [
    "Candidate",
    "answer_bundle",
    "approval_choice",
    "candidates",
    "candidates_parameters",
    "completed",
    "member_of",
    "per_patient",
    "refusal_reason",
    "refused",
    "select",
    "signed",
    "store",
]
