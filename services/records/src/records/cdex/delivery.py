"""Delivery of approved attachment requests: records calls the payer's `$submit-attachment`.

Da Vinci CDex 2.1 "Sending Attachments" (OperationDefinition submit-attachment, the
attachments-to-requests mapping table): the Parameters carry `TrackingId` (the Task's tracking-id
identifier), `AttachTo` (claim | preauthorization, from Task.reasonCode), `PayerId`
(Task.requester.identifier), `ProviderId` / `OrganizationId` (Task.owner, or the contained
PractitionerRole's practitioner / organization identifiers), `MemberId` (the contained Patient's
identifier), `ServiceDate` (the `service-date` input; sent as valueDateTime as the 2.1 example
does), one `Attachment` per released resource with `LineItem`s (the data-code input's line-number
extensions), `Code` (the requested LOINC code it answers) and `Content` (the resource), and
`Final` (true: nothing more follows).

How the call is made (DESIGN.md "outbound calls"): the approval stores a `cdex_outbox` document
in its own transaction; a worker on any replica claims it with a lease, builds the Parameters from
the Task as stored, authenticates to the payer's token endpoint with SMART Backend Services
(`client_credentials`, `private_key_jwt` signed with records' CDex client key, the client id the
payer gave records: both from the payer's gateway registration) and POSTs to the registered
endpoint saved when the request was filed. No redirect is followed. 2xx: the Task is `completed`;
a 4xx other than 408/429: `failed` with the payer's status in `statusReason`; anything else
(network error, 5xx, 408, 429) is retried with doubling pauses up to `max_attempts`, then `failed`.
The Task's final status and the outbox's are written in one transaction, by the lease holder only.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import orjson
import structlog
from joserfc.jwk import ECKey
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import ConnectionFailure

from mindchart_core import errors
from records import background
from records.cdex import keys, requests, store
from records.cdex.settings import CdexSettings
from records.resources import RESOURCES
from records.store import ResourceStore, instant, now

log = structlog.get_logger(__name__)
TASK = RESOURCES["Task"]
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class PermanentFailure(Exception):
    """The payer refused the submission for good; the Task fails."""


def _identifier(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        return {k: value[k] for k in ("system", "value") if k in value}
    return None


def _contained(task: dict[str, Any], reference: Any) -> dict[str, Any] | None:
    if not isinstance(reference, str) or not reference.startswith("#"):
        return None
    return next((r for r in task.get("contained", []) if f"#{r.get('id')}" == reference), None)


def submission(task: dict[str, Any]) -> dict[str, Any]:
    """The `$submit-attachment` Parameters for an approved attachment request."""
    request = requests.parse(task)
    answer = next(r for r in task.get("contained", []) if r.get("resourceType") == "Bundle")
    parameter: list[dict[str, Any]] = [
        {"name": "TrackingId", "valueIdentifier": _identifier(request.tracking_id)},
        {"name": "AttachTo", "valueCode": request.attach_to},
    ]
    if payer := _identifier((task.get("requester") or {}).get("identifier")):
        parameter.append({"name": "PayerId", "valueIdentifier": payer})
    owner = task.get("owner") or {}
    role = _contained(task, owner.get("reference"))
    if role is not None:
        for part, name in (("practitioner", "ProviderId"), ("organization", "OrganizationId")):
            if found := _identifier((role.get(part) or {}).get("identifier")):
                parameter.append({"name": name, "valueIdentifier": found})
    elif provider := _identifier(owner.get("identifier")):
        parameter.append({"name": "ProviderId", "valueIdentifier": provider})
    member = next((i for i in (request.member.get("identifier") or []) if _identifier(i)), None)
    if member is not None:
        parameter.append({"name": "MemberId", "valueIdentifier": _identifier(member)})
    if request.service_date:
        parameter.append({"name": "ServiceDate", "valueDateTime": request.service_date})
    for entry in answer.get("entry", []):
        resource = entry["resource"]
        codes = {(c.get("system"), c.get("code"))
                 for c in ((resource.get("type") or resource.get("code") or {}).get("coding") or [])}
        asked = next((pair for pair in request.codes if pair in codes), None)
        parts: list[dict[str, Any]] = [{"name": "LineItem", "valueString": line}
                                       for line in request.line_items.get(asked, []) if asked]
        if asked:
            parts.append({"name": "Code", "valueCodeableConcept": {
                "coding": [{"system": asked[0], "code": asked[1]}]}})
        parts.append({"name": "Content", "resource": resource})
        parameter.append({"name": "Attachment", "part": parts})
    parameter.append({"name": "Final", "valueBoolean": True})
    return {"resourceType": "Parameters", "parameter": parameter}


async def _access_token(http: httpx.AsyncClient, key: ECKey, target: dict[str, Any],
                        scope: str) -> str:
    form = {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": JWT_BEARER,
            "client_assertion": keys.client_assertion(key, target["client_id"], target["token_url"])}
    response = await http.post(target["token_url"], data=form)
    if response.status_code in (400, 401, 403):
        raise PermanentFailure(f"the payer's token endpoint refused records ({response.status_code})")
    response.raise_for_status()
    token = response.json().get("access_token")
    if not isinstance(token, str):
        raise PermanentFailure("the payer's token endpoint answered no access_token")
    return token


async def deliver(http: httpx.AsyncClient, key: ECKey, target: dict[str, Any],
                  body: dict[str, Any], scope: str) -> int:
    """One attempt; returns the payer's HTTP status (2xx), raises PermanentFailure or
    httpx.HTTPError (retried)."""
    token = await _access_token(http, key, target, scope)
    response = await http.post(target["url"], content=orjson.dumps(body), headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json",
        "Accept": "application/fhir+json"})
    if 200 <= response.status_code < 300:
        return response.status_code
    if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
        raise PermanentFailure(f"the payer answered HTTP {response.status_code}")
    raise httpx.HTTPStatusError(f"payer answered {response.status_code}", request=response.request,
                                response=response)


class Workers(background.Workers):
    """The delivery worker and the overdue sweeper of one records replica."""

    def __init__(self, app: Any, settings: CdexSettings, key: ECKey, internal: ResourceStore) -> None:
        super().__init__()
        self.app, self.settings, self.key, self.internal = app, settings, key, internal
        self.db = app.state.db

    def start(self) -> None:
        self.spawn("cdex-delivery", self._deliveries())
        self.spawn("cdex-overdue", self._sweeper())

    async def _deliveries(self) -> None:
        async with httpx.AsyncClient(timeout=self.settings.request_timeout_seconds,
                                     follow_redirects=False) as http:
            while True:
                try:
                    job = await store.claim_delivery(self.db, self.owner, self.settings.lease_seconds)
                except ConnectionFailure:
                    job = None
                if job is None:
                    await asyncio.sleep(self.settings.poll_seconds)
                    continue
                try:
                    await self._run(http, job)
                except Exception:
                    log.exception("cdex_delivery_crashed", task=job.get("task"))

    async def _run(self, http: httpx.AsyncClient, job: dict[str, Any]) -> None:
        task_id = job["task"]
        target = await store.target_of(self.db, task_id)
        stored = await self.internal.read(TASK, task_id)
        task = orjson.loads(stored.raw or b"{}")
        if target is None:
            await self._finish(job, "failed", "no registered payer endpoint for this request")
            return
        try:
            status = await deliver(http, self.key, target, submission(task), self.settings.submit_scope)
        except PermanentFailure as refused:
            await self._finish(job, "failed", str(refused))
            return
        except (httpx.HTTPError, ValueError) as problem:
            error = type(problem).__name__
            if int(job["attempts"]) >= self.settings.max_attempts:
                await self._finish(job, "failed", f"the payer could not be reached ({error})")
            else:
                delay = self.settings.retry_seconds * 2 ** (int(job["attempts"]) - 1)
                log.info("cdex_delivery_retry", task=task_id, attempt=job["attempts"], error=error)
                await store.retry_later(self.db, job["_id"], self.owner, delay, error)
            return
        await self._finish(job, "done", f"delivered (HTTP {status})")

    async def _finish(self, job: dict[str, Any], state: str, detail: str) -> None:
        """The Task's final status and the outbox's, in one transaction, by the lease holder."""
        task_id = job["task"]

        async def once(session: AsyncClientSession) -> None:
            stored = await self.internal.read(TASK, task_id, session=session)
            task = orjson.loads(stored.raw or b"{}")
            if not await store.finish_delivery(self.db, job["_id"], self.owner, state, detail, session):
                raise errors.Conflict("lease lost")
            moment = instant(now())
            if state == "done":
                task.update(status="completed", lastModified=moment, businessStatus=requests.stage(
                    "delivered", "Approved and sent to the payer with $submit-attachment"))
            else:
                task.update(status="failed", lastModified=moment, statusReason={"text": detail},
                            businessStatus=requests.stage("delivery-failed",
                                                          "Approved, but sending it to the payer failed"))
            await self.internal.update(TASK, task_id, task, stored.version, session=session)

        try:
            await self.internal.atomically(once)
            log.info("cdex_delivery_finished", task=task_id, state=state)
        except errors.Conflict:
            log.info("cdex_delivery_lease_lost", task=task_id)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_seconds)
            try:
                await self.mark_overdue()
            except Exception:
                log.exception("cdex_overdue_sweep_failed")

    async def mark_overdue(self) -> int:
        """Open requests past their due date that nobody reviewed: marked, never released."""
        marked = 0
        moment = now()
        async for doc in self.db[TASK.type].find({"sp.status": "requested", "deleted": False}):
            task = orjson.loads(bytes(doc["raw"]))
            stage = ((task.get("businessStatus") or {}).get("coding") or [{}])[0].get("code")
            try:
                due = requests.parse(task).due
            except errors.FhirError:
                continue
            if stage != "awaiting-review" or due is None or due > moment:
                continue
            task.update(lastModified=instant(moment), businessStatus=requests.stage(
                "overdue", "Past its due date and not yet reviewed: nothing has been released"))

            async def once(session: AsyncClientSession, task: dict[str, Any] = task,
                           doc: dict[str, Any] = doc) -> None:
                await self.internal.update(TASK, doc["_id"], task, int(doc["vid"]), session=session)
                await store.record_decision(self.db, {"task": doc["_id"], "decision": "overdue",
                                                      "reviewer": None}, session)

            with contextlib.suppress(errors.PreconditionFailed, errors.Conflict):
                await self.internal.atomically(once)
                marked += 1
        return marked
