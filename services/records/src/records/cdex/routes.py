"""The CDex HTTP surface of records (Da Vinci CDex 2.1 data source), mounted before the generic
`/{type}/{id}` routes:

- `POST /fhir/Task`: a payer client (role `payer`, scope allowing Task create) files a data or
  attachment request; records stores it `requested`, awaiting review. Attachment requests must
  name in `payer-url` one of the payer's endpoints registered at the gateway (the token's
  `payer_endpoints`); any other URL is refused with 422 and nothing is stored or called.
- `PUT|PATCH|DELETE /fhir/Task/{id}`: 405. A Task changes only through the review below.
- `GET /fhir/Task/{id}/$candidates`, `POST /fhir/Task/{id}/$approve`, `POST
  /fhir/Task/{id}/$refuse`: the review, for practitioner and admin users (user tokens whose
  scopes allow Task update).
- `POST /fhir/Patient/$match`: member resolution (records/cdex/match.py).

Reading and searching Tasks are the ordinary REST interactions, narrowed by records.policy (a
payer sees its own Tasks, reviewers all of them).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from pymongo.asynchronous.client_session import AsyncClientSession
from starlette.responses import Response

from mindchart_core import errors, fhirjson, scopes, tokens, validation
from records import service
from records.amendments import appended
from records.amendments import requests as amendment_requests
from records.amendments import routes as amendment_routes
from records.cdex import keys, match, requests, review, store
from records.lifecycle.operations import JWKS_PATH
from records.policy import CDEX_CLIENT, PAYER_ROLE, AccessPolicy
from records.resources import RESOURCES
from records.store import ResourceStore, instant, now

router = APIRouter(prefix="/fhir")
TASK = RESOURCES["Task"]
INTERNAL_SCOPE = "system/Task.cruds"


def _base_url(request: Request) -> str:
    return str(request.app.state.settings.public_base_url).rstrip("/")


async def _caller(request: Request) -> tokens.AccessToken:
    fhirjson.negotiate(request)
    token: tokens.AccessToken = await request.app.state.verifier.verify(tokens.bearer_token(request))
    return token


def _store(request: Request, token: tokens.AccessToken) -> ResourceStore:
    return ResourceStore(request.app.state.mongo, request.app.state.db,
                         AccessPolicy(token=token, base_url=_base_url(request)))


def internal_token() -> tokens.AccessToken:
    """Records' own CDex code: the only writer of Tasks (records.policy.CDEX_CLIENT)."""
    return tokens.AccessToken(subject=CDEX_CLIENT, client_id=CDEX_CLIENT,
                              scope=scopes.parse(INTERNAL_SCOPE), audience="", jti="cdex",
                              expires_at=0)


def internal_store(app: Any) -> ResourceStore:
    return ResourceStore(app.state.mongo, app.state.db, AccessPolicy(
        token=internal_token(), base_url=str(app.state.settings.public_base_url).rstrip("/")))


def _payer(token: tokens.AccessToken) -> None:
    if PAYER_ROLE not in token.roles or not any(
            s.context == "system" for s in token.scope.matching("Task", "create")):
        raise errors.Forbidden("Only payer clients (role payer, system scope for Task create) "
                               "file CDex requests")


def _reviewer(token: tokens.AccessToken, interaction: str) -> None:
    user = token.fhir_user_ref or ""
    is_reviewer = user.startswith(("Practitioner/", "PractitionerRole/")) or "admin" in token.roles
    if not is_reviewer or not any(s.context == "user" for s in token.scope.matching("Task", interaction)):
        raise errors.Forbidden("Reviewing CDex requests takes a practitioner or admin user token "
                               f"whose scopes allow Task {interaction}")


@router.post("/Task")
async def file_request(request: Request) -> Response:
    """Da Vinci CDex 2.1 task-based request: the payer POSTs the Task to the data source. A Task
    with the amendment-request code is a patient's 45 CFR 164.526 request (records/amendments)."""
    token = await _caller(request)
    settings = request.app.state.settings
    body = await fhirjson.read_json_body(request, settings.max_body_bytes)
    if isinstance(body, dict) and amendment_requests.is_amendment_request(body):
        return await amendment_routes.file_request(request, body)
    _payer(token)
    task = validation.validate_resource(body, "Task")
    parsed = requests.parse(task)
    if parsed.kind == "attachment" and (parsed.payer_url not in token.payer_endpoints
                                        or not token.payer_token_url or not token.payer_client_id):
        raise errors.Unprocessable(
            "payer-url is not an endpoint registered for this payer: nothing was stored and no "
            "request will be sent to it", expression=["Task.input"])
    filed = requests.as_filed(task, token.client_id, instant(now()))
    internal = internal_store(request.app)
    if parsed.kind == "data":
        stored = await internal.create(TASK, filed)
    else:
        target = {"url": parsed.payer_url, "token_url": token.payer_token_url,
                  "client_id": token.payer_client_id, "payer": token.client_id}

        async def once(session: AsyncClientSession) -> Any:
            created = await internal.create(TASK, filed, session=session)
            await store.save_target(request.app.state.db, created.id, target, session)
            return created

        stored = await internal.atomically(once)
    return service.resource_response(stored, _base_url(request), status=201, location=True,
                                     prefer=request.headers.get("prefer"))


@router.put("/Task/{task_id}")
@router.patch("/Task/{task_id}")
@router.delete("/Task/{task_id}")
async def task_changes_through_review(task_id: str, request: Request) -> Response:
    await _caller(request)
    raise errors.MethodNotAllowed("A Task changes only through its operations: a CDex request's "
                                  "review ($approve, $refuse), an amendment request's $deny, "
                                  "$extend, $disagree, $rebut or a signed correction")


@router.get("/.well-known/cdex-client-jwks.json")
async def client_jwks(request: Request) -> Response:
    """Records' public client keys: a payer registers this JWK Set (or its URL) for records."""
    return fhirjson.FhirResponse(keys.public_jwks(request.app.state.cdex_key),
                                 media_type="application/json")


@router.post("/Patient/$match")
async def patient_match(request: Request) -> Response:
    token = await _caller(request)
    body = await fhirjson.read_json_body(request, request.app.state.settings.max_body_bytes)
    bundle = await match.match(_store(request, token), body, _base_url(request))
    return fhirjson.FhirResponse(bundle)


async def _open_task(reviewer: ResourceStore, task_id: str) -> tuple[int, dict[str, Any]]:
    current = await reviewer.read(TASK, task_id)
    task = orjson.loads(current.raw or b"{}")
    return current.version, task


@router.get("/Task/{task_id}/$candidates")
async def task_candidates(task_id: str, request: Request) -> Response:
    """What the request would release (the reviewer chooses among these)."""
    token = await _caller(request)
    _reviewer(token, "read")
    reviewer = _store(request, token)
    _, task = await _open_task(reviewer, task_id)
    found = await review.candidates(reviewer, task, _base_url(request))
    return fhirjson.FhirResponse(review.candidates_parameters(found))


def _closed(task: dict[str, Any]) -> errors.FhirError:
    return errors.Conflict(f"This request is already {task.get('status')}: it was reviewed")


@router.post("/Task/{task_id}/$approve")
async def approve(task_id: str, request: Request) -> Response:
    token = await _caller(request)
    _reviewer(token, "update")
    body = await fhirjson.read_json_body(request, request.app.state.settings.max_body_bytes)
    chosen, include_restricted = review.approval_choice(body)
    reviewer, base_url = _store(request, token), _base_url(request)
    version, task = await _open_task(reviewer, task_id)
    if not requests.is_open(task):
        raise _closed(task)
    parsed = requests.parse(task)
    released = review.select(await review.candidates(reviewer, task, base_url), chosen,
                             include_restricted)
    # 45 CFR 164.526(d)(5): a released note takes its statement of disagreement and rebuttal along.
    chosen_refs = {c.reference for c in released}
    released += [review.Candidate(d, False) for d in await appended.material(
        reviewer, [c.stored for c in released]) if f"DocumentReference/{d.id}" not in chosen_refs]
    moment = instant(now())
    answer = review.signed(review.answer_bundle(released, base_url),
                           request.app.state.signing_keys.current,
                           f"{base_url}{JWKS_PATH}", moment, base_url)
    if parsed.kind == "attachment":
        new = review.completed(task, answer, moment, status="in-progress", business=requests.stage(
            "delivering", "Approved; being sent to the payer with $submit-attachment"))
    else:
        new = review.completed(task, answer, moment, status="completed", business=requests.stage(
            "released", "Reviewed and partly or wholly released"))
    payer = next((t.get("code") for t in (task.get("meta") or {}).get("tag", [])
                  if t.get("system") == requests.TASK_CLIENT_TAG), "")
    internal = internal_store(request.app)
    db = request.app.state.db

    async def once(session: AsyncClientSession) -> Any:
        stored, _ = await internal.update(TASK, task_id, new, version, session=session)
        await store.record_release(db, task_id=task_id, per_patient=review.per_patient(released),
                                   recipient=str(payer), purpose=parsed.purpose, session=session)
        await store.record_decision(db, {
            "task": task_id, "decision": "approve", "reviewer": token.fhir_user_ref,
            "reviewer_client": token.client_id, "released": [c.reference for c in released],
            "restricted_included": include_restricted}, session)
        if parsed.kind == "attachment":
            await store.enqueue_delivery(db, {"task": task_id, "payer": payer}, session)
        return stored

    try:
        stored = await internal.atomically(once)
    except errors.PreconditionFailed:
        raise errors.Conflict("The request changed while it was being reviewed; reload it") from None
    return service.resource_response(stored, base_url)


@router.post("/Task/{task_id}/$refuse")
async def refuse(task_id: str, request: Request) -> Response:
    token = await _caller(request)
    _reviewer(token, "update")
    body = await fhirjson.read_json_body(request, request.app.state.settings.max_body_bytes)
    reason = review.refusal_reason(body)
    reviewer = _store(request, token)
    version, task = await _open_task(reviewer, task_id)
    if not requests.is_open(task):
        raise _closed(task)
    internal, db = internal_store(request.app), request.app.state.db
    new = review.refused(task, reason, instant(now()))

    async def once(session: AsyncClientSession) -> Any:
        stored, _ = await internal.update(TASK, task_id, new, version, session=session)
        await store.record_decision(db, {"task": task_id, "decision": "refuse",
                                         "reviewer": token.fhir_user_ref,
                                         "reviewer_client": token.client_id, "reason": reason}, session)
        return stored

    try:
        stored = await internal.atomically(once)
    except errors.PreconditionFailed:
        raise errors.Conflict("The request changed while it was being reviewed; reload it") from None
    return service.resource_response(stored, _base_url(request))


__all__ = ["internal_store", "internal_token", "router"]
