"""HTTP handlers of amendment requests, and their OperationDefinitions.

- `POST [base]/Task` with the amendment code: reaches `file_request` from records/cdex/routes.py,
  which owns that URL (a CDex request and an amendment request are both Tasks).
- `POST [base]/Task/{id}/$deny` (`basis` code, `reason` string), `$extend` (`reason`), `$rebut`
  (`rebuttal`): the owner. `$disagree` (`statement`): the patient. Each takes a `Parameters`
  resource and answers with the Task (or, for `$disagree`/`$rebut`, 201 with the appended
  DocumentReference and its Location).
- Acceptance is a correction signed with `$sign` (records/lifecycle), not a route here.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from mindchart_core import errors, fhirjson, tokens, validation
from records import service as fhir_service
from records.amendments import service
from records.policy import AccessPolicy
from records.store import ResourceStore

router = APIRouter(prefix="/fhir")


def _base_url(request: Request) -> str:
    return str(request.app.state.settings.public_base_url).rstrip("/")


async def _store(request: Request) -> ResourceStore:
    fhirjson.negotiate(request)
    token = await request.app.state.verifier.verify(tokens.bearer_token(request))
    return ResourceStore(request.app.state.mongo, request.app.state.db,
                         AccessPolicy(token=token, base_url=_base_url(request)))


async def _parameters(request: Request, *names: str) -> dict[str, Any]:
    body = await fhirjson.read_json_body(request, request.app.state.settings.max_body_bytes)
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.Invalid(f"This operation takes a Parameters resource with {', '.join(names)}")
    found: dict[str, Any] = {}
    for p in body.get("parameter") or []:
        if isinstance(p, dict) and p.get("name") in names:
            value = p.get("valueString", p.get("valueCode"))
            if not isinstance(value, str):
                raise errors.Invalid(f"Parameter '{p['name']}' takes a valueString or valueCode")
            found[str(p["name"])] = value
    missing = [n for n in names if n not in found]
    if missing:
        raise errors.Invalid(f"Missing parameter(s): {', '.join(missing)}")
    return found


async def file_request(request: Request, body: dict[str, Any]) -> Response:
    """`POST [base]/Task` of an amendment request (called by records/cdex/routes.py)."""
    store = await _store(request)
    for element, value in (("status", "requested"), ("intent", "order")):
        body.setdefault(element, value)  # records sets both anyway (requests.as_filed)
    task = validation.validate_resource(body, "Task")
    stored = await service.file(store, task, _base_url(request))
    return fhir_service.resource_response(stored, _base_url(request), status=201, location=True,
                                          prefer=request.headers.get("prefer"))


@router.post("/Task/{task_id}/$deny")
async def deny(task_id: str, request: Request) -> Response:
    store = await _store(request)
    given = await _parameters(request, "basis", "reason")
    stored = await service.deny(store, task_id, given["basis"], given["reason"])
    return fhir_service.resource_response(stored, _base_url(request))


@router.post("/Task/{task_id}/$extend")
async def extend(task_id: str, request: Request) -> Response:
    store = await _store(request)
    given = await _parameters(request, "reason")
    return fhir_service.resource_response(await service.extend(store, task_id, given["reason"]),
                                          _base_url(request))


@router.post("/Task/{task_id}/$disagree")
async def disagree(task_id: str, request: Request) -> Response:
    store = await _store(request)
    given = await _parameters(request, "statement")
    created = await service.disagree(store, task_id, given["statement"])
    return fhir_service.resource_response(created, _base_url(request), status=201, location=True)


@router.post("/Task/{task_id}/$rebut")
async def rebut(task_id: str, request: Request) -> Response:
    store = await _store(request)
    given = await _parameters(request, "rebuttal")
    created = await service.rebut(store, task_id, given["rebuttal"])
    return fhir_service.resource_response(created, _base_url(request), status=201, location=True)


def _operation(code: str, title: str, description: str, base_url: str,
               parameters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "OperationDefinition", "id": f"Task-{code}",
        "url": f"{base_url}/OperationDefinition/Task-{code}",
        "name": title.replace(" ", "").replace("-", ""), "title": title,
        "status": "active", "kind": "operation", "description": description, "code": code,
        "resource": ["Task"], "system": False, "type": False, "instance": True,
        "parameter": parameters,
    }


def operation_definitions(base_url: str) -> dict[str, dict[str, Any]]:
    task_out = {"name": "return", "use": "out", "min": 1, "max": "1", "type": "Task",
                "documentation": "The amendment request after this step"}
    document_out = {"name": "return", "use": "out", "min": 1, "max": "1", "type": "DocumentReference",
                    "documentation": "The document appended to the note (relatesTo appends)"}

    def text(name: str, documentation: str) -> dict[str, Any]:
        return {"name": name, "use": "in", "min": 1, "max": "1", "type": "string",
                "documentation": documentation}

    definitions = [
        _operation("deny", "Deny an amendment request",
                   "The request's owner (the note's author) denies it in writing (45 CFR "
                   "164.526(d)(1)): status rejected, statusReason the basis and reason, and an "
                   "output 'denial' with the whole written denial.", base_url,
                   [{"name": "basis", "use": "in", "min": 1, "max": "1", "type": "code",
                     "documentation": "not-created-by-covered-entity | not-in-designated-record-set "
                                      "| not-available-for-inspection | accurate-and-complete "
                                      "(45 CFR 164.526(a)(2))"},
                    text("reason", "The explanation given to the patient"), task_out]),
        _operation("extend", "Extend an amendment request by 30 days",
                   "Once, before the 60 days end, with the reason for the delay (45 CFR "
                   "164.526(b)(2)(ii)); restriction.period.end moves by 30 days.", base_url,
                   [text("reason", "Why the request cannot be acted on in time"), task_out]),
        _operation("disagree", "File a statement of disagreement",
                   "The patient, after a denial, files a statement disagreeing with it (45 CFR "
                   "164.526(d)(2)); records appends it to the note (DocumentReference relatesTo "
                   "appends) and includes it with every later disclosure of the note.", base_url,
                   [text("statement", "The statement (at most 4000 characters)"), document_out]),
        _operation("rebut", "Rebut a statement of disagreement",
                   "The owner may answer the patient's statement (45 CFR 164.526(d)(3)); the "
                   "rebuttal is appended to the note and the patient can read it.", base_url,
                   [text("rebuttal", "The rebuttal"), document_out]),
    ]
    return {d["id"]: d for d in definitions}


def declare(statement: dict[str, Any], base_url: str) -> dict[str, Any]:
    """The operations and the local search parameter on Task in the CapabilityStatement."""
    for rest in statement.get("rest", []):
        for resource in rest.get("resource", []):
            if resource.get("type") == "Task":
                resource.setdefault("operation", []).extend(
                    {"name": d["code"], "definition": d["url"]}
                    for d in operation_definitions(base_url).values())
                resource["documentation"] = (
                    f"{resource.get('documentation', '')} Amendment requests (45 CFR 164.526): a "
                    "patient POSTs a Task with code https://mindchart.dev/fhir/CodeSystem/"
                    "amendment#amendment-request, focus their progress note and description the "
                    "change; records sets owner, authoredOn and restriction.period.end (60 days). "
                    "The owner accepts by signing a correction whose context.related is the Task, "
                    "or uses $deny; $extend once; the patient may $disagree after a denial; the "
                    "owner may $rebut. Overdue: Task?code=https://mindchart.dev/fhir/CodeSystem/"
                    "amendment|amendment-request&status=requested&restriction-period=eb<now>."
                ).strip()
    return statement


__all__ = ["declare", "file_request", "operation_definitions", "router"]
