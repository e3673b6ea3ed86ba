"""Subscription REST (create, read, search, update, delete), `$status`, `$events`, and the topics
as read-only `Basic` resources. Backport IG STU 1.1 CapabilityStatement
backport-subscription-server-r4: Subscription read SHALL, create/update/delete/search SHOULD,
`$status` SHALL (OperationDefinition backport-subscription-status: instance and type level,
returns a `searchset` Bundle of status resources), `$events` MAY (backport-subscription-events:
instance level, `eventsSinceNumber` / `eventsUntilNumber` inclusive, `content` a hint; returns a
notification Bundle of type `history`).

A Subscription belongs to the client that created it (and, for a user's, to that user): anyone
else gets 404, as for any resource they cannot see. Creating one needs a scope covering
`Subscription` create and a scope covering read of the topic's resource type.
"""

from __future__ import annotations

import uuid
from datetime import UTC
from email.utils import format_datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from mindchart_core import errors, fhirjson, tokens, validation
from records import service
from records.policy import AccessPolicy
from records.resources import RESOURCES
from records.settings import RecordsSettings
from records.store import ResourceStore, instant
from records.subscriptions import channel_headers, endpoints, grants, notifications, profile, store, topics
from records.subscriptions.settings import SubscriptionSettings

router = APIRouter(prefix="/fhir")
RESERVED_HEADERS = frozenset({"host", "content-type", "content-length", "transfer-encoding", "connection"})
MAX_EVENTS = 100  # per $events answer
IG_OPS = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition"


class Caller:
    def __init__(self, request: Request, token: tokens.AccessToken) -> None:
        self.request, self.token = request, token
        self.settings: RecordsSettings = request.app.state.settings
        self.subscriptions: SubscriptionSettings = request.app.state.subscription_settings
        self.db = request.app.state.db
        self.base = self.settings.public_base_url

    def need(self, interaction: str) -> None:
        if not self.token.scope.allows("Subscription", interaction):
            raise errors.Forbidden(f"The granted scopes do not permit {interaction} on Subscription")

    async def own(self, sub_id: str) -> dict[str, Any]:
        sub = await store.get(self.db, sub_id)
        if sub is None or not grants.same_owner(sub["owner"], self.token):
            raise errors.NotFound(f"Subscription/{sub_id[:64]} is not known")
        return sub

    def reader(self) -> ResourceStore:
        return ResourceStore(
            self.request.app.state.mongo, self.db, AccessPolicy(token=self.token, base_url=self.base)
        )


async def get_caller(request: Request) -> Caller:
    fhirjson.negotiate(request)
    token = await request.app.state.verifier.verify(tokens.bearer_token(request))
    return Caller(request, token)


CallerDep = Annotated[Caller, Depends(get_caller)]


def render(sub: dict[str, Any], base_url: str) -> bytes:
    """The Subscription as read: the client's resource, the server's status, headers redacted."""
    body: dict[str, Any] = orjson.loads(sub["body"])
    meta = {**body.get("meta", {}), "versionId": str(sub["vid"]), "lastUpdated": instant(sub["ts"])}
    out = {
        "resourceType": "Subscription",
        "id": sub["_id"],
        **{k: v for k, v in body.items() if k not in ("resourceType", "id", "meta", "status", "error")},
        "meta": meta,
        "status": sub["status"],
    }
    if sub.get("error"):
        out["error"] = sub["error"]
    if sub.get("header_names"):
        out["channel"] = {**out["channel"], "header": channel_headers.redacted(tuple(sub["header_names"]))}
    return orjson.dumps(out)


def _headers(sub: dict[str, Any], base_url: str, location: bool = False) -> dict[str, str]:
    headers = {
        "ETag": f'W/"{sub["vid"]}"',
        "Last-Modified": format_datetime(sub["ts"].replace(tzinfo=UTC), usegmt=True),
    }
    if location:
        headers["Location"] = f"{base_url}/Subscription/{sub['_id']}/_history/{sub['vid']}"
    return headers


async def _admit(caller: Caller, spec: profile.Spec) -> dict[str, Any]:
    """Everything checked before a Subscription is stored; returns its owner."""
    if not caller.subscriptions.enabled:
        raise errors.Unavailable("Subscriptions are not configured on this server (README, Configuration)")
    resource = spec.topic.resource
    if not caller.token.scope.allows(resource, "read"):
        raise errors.Forbidden(
            f"The granted scopes do not permit reading {resource}, which this topic is about"
        )
    if spec.heartbeat is not None and spec.heartbeat < caller.subscriptions.min_heartbeat_seconds:
        raise errors.Unprocessable(
            "backport-heartbeat-period must be at least "
            f"{caller.subscriptions.min_heartbeat_seconds} seconds",
            expression=["Subscription.channel.extension"],
        )
    if any(h.split(":", 1)[0].strip().lower() in RESERVED_HEADERS for h in spec.headers):
        raise errors.Unprocessable(
            "channel.header may not set Host, Content-Type, Content-Length, Transfer-Encoding or Connection",
            expression=["Subscription.channel.header"],
        )
    owner = grants.owner_of(caller.token)
    workers = caller.request.app.state.subscription_workers
    try:
        grant = await workers.grants.current(owner)
    except grants.GatewayUnavailable:
        raise errors.Unavailable("The authorization server could not be asked; try again") from None
    if not grant.active:
        raise errors.Forbidden("The client's grant is no longer active")
    try:
        endpoints.check_url(spec.endpoint, development=workers.development)
        if not endpoints.registered(spec.endpoint, list(grant.endpoints)):
            raise endpoints.Refused(
                "channel.endpoint is not registered for this client "
                "(mindchart client create ... --subscription-endpoint URL)"
            )
        await endpoints.resolve(spec.endpoint, development=workers.development, allowed=workers.allowed)
    except endpoints.Refused as refused:
        raise errors.Unprocessable(str(refused), expression=["Subscription.channel.endpoint"]) from None
    return owner


def _spec_fields(caller: Caller, sub_id: str, resource: dict[str, Any], spec: profile.Spec) -> dict[str, Any]:
    stored = dict(resource)
    channel = {k: v for k, v in stored.get("channel", {}).items() if k != "header"}
    stored["channel"] = channel
    return {
        "body": orjson.dumps(stored),
        "topic": spec.topic.url,
        "filters": list(spec.filters),
        "content": spec.content,
        "endpoint": spec.endpoint,
        "heartbeat": spec.heartbeat,
        "timeout": spec.timeout,
        "header_names": [h.split(":", 1)[0].strip() for h in spec.headers],
        "headers": channel_headers.seal(caller.subscriptions.header_key_bytes(), sub_id, spec.headers),
    }


async def _incoming(caller: Caller) -> tuple[dict[str, Any], profile.Spec]:
    body = await fhirjson.read_json_body(caller.request, caller.settings.max_body_bytes)
    resource = validation.validate_resource(body, "Subscription")
    return resource, profile.parse(resource, caller.base)


@router.post("/Subscription")
async def create(caller: CallerDep) -> Response:
    caller.need("create")
    resource, spec = await _incoming(caller)
    owner = await _admit(caller, spec)
    sub_id = str(uuid.uuid4())
    moment = store.now()
    doc = {
        "_id": sub_id,
        "vid": 1,
        "ts": moment,
        "created": moment,
        "owner": owner,
        "status": "requested",
        "error": None,
        "events": 0,
        "delivered": 0,
        "failures": 0,
        "due": moment,
        "lease_until": store.EPOCH,
        "lease_owner": None,
        "last_sent": None,
        **_spec_fields(caller, sub_id, resource, spec),
    }
    await store.insert(caller.db, doc)
    caller.request.app.state.subscription_workers.nudge()
    return fhirjson.FhirResponse(
        render(doc, caller.base), status_code=201, headers=_headers(doc, caller.base, location=True)
    )


@router.get("/Subscription")
async def search(caller: CallerDep) -> Response:
    caller.need("search-type")
    wanted = dict(caller.request.query_params)
    subs = [
        s
        for s in await store.owned_by(caller.db, caller.token.client_id)
        if grants.same_owner(s["owner"], caller.token)
        and wanted.get("status") in (None, s["status"])
        and wanted.get("url") in (None, s["endpoint"])
    ]
    subs.sort(key=lambda s: s["_id"])
    entries = [
        service.entry_bytes(
            f"{caller.base}/Subscription/{s['_id']}", render(s, caller.base), search=b'{"mode":"match"}'
        )
        for s in subs
    ]
    head = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(subs),
        "link": [{"relation": "self", "url": f"{caller.base}/Subscription"}],
    }
    return fhirjson.FhirResponse(service.bundle_bytes(head, entries))


def _status_bundle(caller: Caller, subs: list[dict[str, Any]]) -> bytes:
    entries = []
    for sub in subs:
        parameters = notifications.status_parameters(caller.base, sub, "query-status")
        entries.append(
            service.entry_bytes(
                f"urn:uuid:{parameters['id']}", fhirjson.dumps(parameters), search=b'{"mode":"match"}'
            )
        )
    head = {"resourceType": "Bundle", "type": "searchset", "total": len(subs)}
    return service.bundle_bytes(head, entries)


async def _params(caller: Caller) -> list[tuple[str, str]]:
    """Operation inputs from the query string, or from a posted Parameters resource."""
    items = list(caller.request.query_params.multi_items())
    if caller.request.method == "POST":
        body = await fhirjson.read_json_body(caller.request, caller.settings.max_body_bytes)
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise errors.Invalid("POST takes a Parameters resource")
        for p in body.get("parameter", []):
            value = (
                next((v for k, v in p.items() if k.startswith("value")), None)
                if isinstance(p, dict)
                else None
            )
            if isinstance(p.get("name"), str) and isinstance(value, str):
                items.append((p["name"], value))
    return items


@router.get("/Subscription/$status")
@router.post("/Subscription/$status")
async def status_type(caller: CallerDep) -> Response:
    caller.need("search-type")
    items = await _params(caller)
    ids = {v for k, v in items if k == "id"}
    statuses = {v for k, v in items if k == "status"}
    subs = [
        s
        for s in await store.owned_by(caller.db, caller.token.client_id)
        if grants.same_owner(s["owner"], caller.token)
        and (not ids or s["_id"] in ids)
        and (not statuses or s["status"] in statuses)
    ]
    return fhirjson.FhirResponse(_status_bundle(caller, sorted(subs, key=lambda s: s["_id"])))


@router.get("/Subscription/{sub_id}/$status")
@router.post("/Subscription/{sub_id}/$status")
async def status_instance(sub_id: str, caller: CallerDep) -> Response:
    caller.need("read")
    return fhirjson.FhirResponse(_status_bundle(caller, [await caller.own(sub_id)]))


def _number(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or len(value) > 12:
        raise errors.Invalid(f"{name} must be an event number")
    return int(value)


@router.get("/Subscription/{sub_id}/$events")
@router.post("/Subscription/{sub_id}/$events")
async def events(sub_id: str, caller: CallerDep) -> Response:
    """Missed events by number, each read now as the caller (what it may not read is left out)."""
    caller.need("read")
    sub = await caller.own(sub_id)
    items = dict(await _params(caller))
    since = _number(items.get("eventsSinceNumber"), "eventsSinceNumber") or 1
    until = _number(items.get("eventsUntilNumber"), "eventsUntilNumber")
    content = items.get("content") or sub["content"]
    if content not in profile.CONTENTS:
        raise errors.Invalid("content must be empty, id-only or full-resource")
    reader = caller.reader()
    found: list[tuple[dict[str, Any], bytes | None]] = []
    for event in await store.notifications(caller.db, sub_id, since, until, MAX_EVENTS):
        try:
            stored = await reader.vread(RESOURCES[event["type"]], event["id"], int(event["vid"]))
        except (errors.NotFound, errors.Forbidden, errors.Gone):
            continue
        found.append((event, stored.raw))
    return fhirjson.FhirResponse(
        notifications.bundle(caller.base, sub, "query-event", found, content=content)
    )


@router.get("/Subscription/{sub_id}")
async def read(sub_id: str, caller: CallerDep) -> Response:
    caller.need("read")
    sub = await caller.own(sub_id)
    return fhirjson.FhirResponse(render(sub, caller.base), headers=_headers(sub, caller.base))


@router.put("/Subscription/{sub_id}")
async def update(sub_id: str, caller: CallerDep) -> Response:
    """A changed channel, topic or filter, or status `requested`, starts over with a handshake
    (this is how an `error` subscription is resumed); status `off` stops it. Event numbers and
    what was delivered carry on."""
    caller.need("update")
    sub = await caller.own(sub_id)
    resource, spec = await _incoming(caller)
    if resource.get("id") != sub_id:
        raise errors.Invalid("The body's id must match the id in the URL")
    await _admit(caller, spec)
    fields = _spec_fields(caller, sub_id, resource, spec)
    changed = (
        any(
            sub.get(k) != fields[k]
            for k in ("topic", "filters", "content", "endpoint", "heartbeat", "timeout", "header_names")
        )
        or sub["headers"] != fields["headers"]
    )
    changes: dict[str, Any] = {**fields, "vid": int(sub["vid"]) + 1, "ts": store.now()}
    if spec.status == "off":
        changes.update(status="off", due=None)
    elif spec.status == "requested" or changed or sub["status"] == "off":
        changes.update(status="requested", due=store.now(), failures=0, error=None)
    if not await store.replace_spec(caller.db, sub_id, int(sub["vid"]), changes):
        raise errors.Conflict("The Subscription changed meanwhile; read it and retry")
    caller.request.app.state.subscription_workers.nudge()
    updated = await caller.own(sub_id)
    return fhirjson.FhirResponse(render(updated, caller.base), headers=_headers(updated, caller.base))


@router.delete("/Subscription/{sub_id}")
async def delete(sub_id: str, caller: CallerDep) -> Response:
    caller.need("delete")
    await caller.own(sub_id)
    await store.delete(caller.db, sub_id)
    return Response(status_code=204)


@router.get("/Basic/{topic_id}")
async def read_topic(topic_id: str, caller: CallerDep) -> Response:
    topic = topics.TOPICS.get(topic_id)
    if topic is None:
        raise errors.NotFound(f"Basic/{topic_id[:64]} is not known")
    return fhirjson.FhirResponse(topics.as_basic(topic))


@router.get("/Basic")
async def search_topics(caller: CallerDep) -> Response:
    """The topics (`Basic?code=SubscriptionTopic`, or `url=` a topic's canonical)."""
    code = caller.request.query_params.get("code")
    url = caller.request.query_params.get("url")
    shown = [
        t
        for t in topics.TOPICS.values()
        if code in (None, "SubscriptionTopic", "http://hl7.org/fhir/fhir-types|SubscriptionTopic")
        and url in (None, t.url)
    ]
    entries = [
        service.entry_bytes(
            f"{caller.base}/Basic/{t.id}", fhirjson.dumps(topics.as_basic(t)), search=b'{"mode":"match"}'
        )
        for t in shown
    ]
    head = {"resourceType": "Bundle", "type": "searchset", "total": len(shown)}
    return fhirjson.FhirResponse(service.bundle_bytes(head, entries))


def declare(statement: dict[str, Any]) -> dict[str, Any]:
    """Subscription (backport profile, $status, $events, topic canonicals) and the topic Basics."""
    for rest in statement.get("rest", []):
        rest.setdefault("resource", []).extend(
            [
                {
                    "type": "Subscription",
                    "extension": [
                        {"url": topics.CAPABILITY_EXTENSION, "valueCanonical": t.url}
                        for t in topics.TOPICS.values()
                    ],
                    "supportedProfile": [profile.PROFILE],
                    "interaction": [
                        {"code": c} for c in ("read", "create", "update", "delete", "search-type")
                    ],
                    "searchParam": [
                        {
                            "name": "status",
                            "type": "token",
                            "definition": "http://hl7.org/fhir/SearchParameter/Subscription-status",
                        },
                        {
                            "name": "url",
                            "type": "uri",
                            "definition": "http://hl7.org/fhir/SearchParameter/Subscription-url",
                        },
                    ],
                    "operation": [
                        {"name": "status", "definition": f"{IG_OPS}/backport-subscription-status"},
                        {"name": "events", "definition": f"{IG_OPS}/backport-subscription-events"},
                    ],
                },
                {
                    "type": "Basic",
                    "supportedProfile": [
                        "http://hl7.org/fhir/5.0/StructureDefinition/profile-SubscriptionTopic"
                    ],
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": [
                        {
                            "name": "code",
                            "type": "token",
                            "definition": "http://hl7.org/fhir/SearchParameter/Basic-code",
                        }
                    ],
                },
            ]
        )
    return statement
