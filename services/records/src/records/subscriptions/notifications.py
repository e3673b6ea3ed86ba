"""Notification Bundles and status resources (Subscriptions R5 Backport IG STU 1.1, R4):

- Every notification is a Bundle of type `history` whose first entry is a Parameters with profile
  `backport-subscription-status-r4` (BackportNotificationR4.fsh, invariant
  backport-notification-bundle-r4-1); its `request` is a GET of the subscription's `$status`
  (notifications.md, "Bundle Type Considerations": history entries need request, bdl-3/bdl-4).
- The Parameters: `subscription` (Reference) 1..1, `topic` (canonical; omitted for `empty`
  payloads, which SHOULD NOT carry it), `status` (code) 1..1, `type` (code) 1..1: handshake |
  heartbeat | event-notification | query-status | query-event, `events-since-subscription-start`
  (string; "not incremented for handshake and heartbeat"), and one `notification-event` per
  event with parts `event-number` (string) 1..1, `timestamp` (instant), `focus` (Reference; not
  for `empty`).
- Payloads (BackportContentCodeSystem): `empty` sends no resource ids; `id-only` names the focus
  (and adds an entry with its fullUrl and request, no resource); `full-resource` includes the
  resource as a read of that version by the subscriber returns it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from mindchart_core import fhirjson
from records import service
from records.store import instant
from records.subscriptions import profile, store

Payload = bytes | None  # the focus resource's JSON for full-resource, else None


def subscription_url(base_url: str, sub_id: str) -> str:
    return f"{base_url}/Subscription/{sub_id}"


def status_parameters(
    base_url: str,
    sub: dict[str, Any],
    kind: str,
    events: Sequence[dict[str, Any]] = (),
    *,
    status: str | None = None,
) -> dict[str, Any]:
    content = sub["content"]
    parameter: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": subscription_url(base_url, sub["_id"])}}
    ]
    if content != "empty":
        parameter.append({"name": "topic", "valueCanonical": sub["topic"]})
    parameter += [
        {"name": "status", "valueCode": status or sub["status"]},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(int(sub.get("events", 0)))},
    ]
    for event in events:
        part: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(event["n"])},
            {"name": "timestamp", "valueInstant": instant(event["ts"])},
        ]
        if content != "empty":
            part.append(
                {
                    "name": "focus",
                    "valueReference": {
                        "reference": f"{base_url}/{event['type']}/{event['id']}/_history/{event['vid']}"
                    },
                }
            )
        parameter.append({"name": "notification-event", "part": part})
    if sub.get("error") and kind in ("query-status", "heartbeat", "event-notification"):
        parameter.append({"name": "error", "valueCodeableConcept": {"text": sub["error"]}})
    return {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [profile.STATUS_PROFILE]},
        "parameter": parameter,
    }


def bundle(
    base_url: str,
    sub: dict[str, Any],
    kind: str,
    events: Sequence[tuple[dict[str, Any], Payload]] = (),
    *,
    status: str | None = None,
    content: str | None = None,
    moment: datetime | None = None,
) -> bytes:
    """A notification Bundle (type history) as bytes, focus resources spliced in unparsed."""
    shown = {**sub, "content": content or sub["content"]}
    parameters = status_parameters(base_url, shown, kind, [e for e, _ in events], status=status)
    entries = [
        service.entry_bytes(
            f"urn:uuid:{parameters['id']}",
            fhirjson.dumps(parameters),
            request=fhirjson.dumps(
                {"method": "GET", "url": f"{subscription_url(base_url, sub['_id'])}/$status"}
            ),
            response=fhirjson.dumps({"status": "200"}),
        )
    ]
    if shown["content"] != "empty":
        for event, payload in events:
            created = bool(event.get("created"))
            request = {
                "method": "POST" if created else "PUT",
                "url": event["type"] if created else f"{event['type']}/{event['id']}",
            }
            entries.append(
                service.entry_bytes(
                    f"{base_url}/{event['type']}/{event['id']}",
                    payload if shown["content"] == "full-resource" else None,
                    request=fhirjson.dumps(request),
                    response=fhirjson.dumps({"status": "201 Created" if created else "200 OK"}),
                )
            )
    head = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "history",
        "timestamp": instant(moment or store.now()),
    }
    return service.bundle_bytes(head, entries)
