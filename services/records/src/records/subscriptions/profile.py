"""Validation of `backport-subscription` resources (Subscriptions R5 Backport IG STU 1.1,
StructureDefinition backport-subscription, BackportSubscription.fsh):

- `criteria` 1..1: the topic's canonical URL; here one of records/subscriptions/topics.py.
- `criteria.extension` `backport-filter-criteria` 0..* (valueString): search-style filters
  `Type?param=value`, all of which must hold (logical AND); only the topic's resource type and
  the parameters its `canFilterBy` lists.
- `channel.type` `rest-hook` (the only channel records offers); `channel.endpoint` required here.
- `channel.payload` 1..1, a MIME type (we send `application/fhir+json`), with the
  `backport-payload-content` extension 1..1: `empty` | `id-only` | `full-resource`.
- `channel.extension` `backport-heartbeat-period` and `backport-timeout` (valueUnsignedInt, seconds).
- `channel.header` (R4: "name: value" strings) sent with every notification; stored encrypted.

Bad input is a 422 naming the element; nothing is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from mindchart_core import errors
from records.resources import RESOURCES
from records.search import query
from records.subscriptions import topics

IG = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
PROFILE = f"{IG}/backport-subscription"
FILTER_CRITERIA = f"{IG}/backport-filter-criteria"
PAYLOAD_CONTENT = f"{IG}/backport-payload-content"
HEARTBEAT_PERIOD = f"{IG}/backport-heartbeat-period"
TIMEOUT = f"{IG}/backport-timeout"
STATUS_PROFILE = f"{IG}/backport-subscription-status-r4"
CONTENTS = ("empty", "id-only", "full-resource")
STATUSES = ("requested", "active", "error", "off")  # R4 subscription-status (required binding)
PAYLOAD_TYPES = ("application/fhir+json", "application/json")


@dataclass(frozen=True)
class Spec:
    topic: topics.Topic
    filters: tuple[str, ...]
    filter: dict[str, Any]  # MongoDB filter over an event's `sp`/`c`
    content: str
    endpoint: str
    headers: tuple[str, ...]
    heartbeat: int | None
    timeout: int | None
    status: str | None


def _extensions(element: dict[str, Any], url: str) -> list[dict[str, Any]]:
    return [e for e in element.get("extension", []) if isinstance(e, dict) and e.get("url") == url]


def _bad(diagnostics: str, expression: str) -> errors.FhirError:
    return errors.Unprocessable(diagnostics, expression=[expression])


def _unsigned(channel: dict[str, Any], url: str, name: str) -> int | None:
    found = _extensions(channel, url)
    if not found:
        return None
    value = found[0].get("valueUnsignedInt")
    if len(found) > 1 or not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(
            f"{name} must be one valueUnsignedInt (seconds)", f"Subscription.channel.extension({name})"
        )
    return value


def compile_filters(topic: topics.Topic, filters: list[str], base_url: str) -> dict[str, Any]:
    """The filter criteria as one MongoDB filter on an event's search values (AND of all)."""
    definition = RESOURCES[topic.resource]
    allowed = {name for name, _ in topic.filters}
    items: list[tuple[str, str]] = []
    for text in filters:
        kind, _, params = text.partition("?")
        if kind != topic.resource or not params:
            raise _bad(
                f"filter criteria must look like {topic.resource}?param=value",
                "Subscription.criteria.extension",
            )
        for name, value in parse_qsl(params, keep_blank_values=True):
            if name.partition(":")[0] not in allowed or not value:
                raise _bad(
                    f"this topic filters {topic.resource} by {', '.join(sorted(allowed))} only",
                    "Subscription.criteria.extension",
                )
            items.append((name, value))
    if not items:
        return {}
    try:
        request = query.parse(definition, items, base_url=base_url, strict=True, resources=RESOURCES)
    except errors.FhirError as problem:
        raise _bad(
            f"invalid filter criteria: {problem.diagnostics}", "Subscription.criteria.extension"
        ) from None
    return request.filter


def parse(body: dict[str, Any], base_url: str) -> Spec:
    status = body.get("status")
    if status is not None and status not in STATUSES:
        raise _bad(f"status must be one of {', '.join(STATUSES)}", "Subscription.status")
    criteria = body.get("criteria")
    topic = topics.BY_URL.get(criteria) if isinstance(criteria, str) else None
    if topic is None:
        raise _bad(
            "criteria must be the canonical URL of a topic this server offers "
            "(see the CapabilityStatement or GET [base]/Basic?code=SubscriptionTopic)",
            "Subscription.criteria",
        )
    filters = [e.get("valueString") for e in _extensions(body.get("_criteria") or {}, FILTER_CRITERIA)]
    if not all(isinstance(f, str) for f in filters):
        raise _bad("backport-filter-criteria takes a valueString", "Subscription.criteria.extension")
    compiled = compile_filters(topic, filters, base_url)  # type: ignore[arg-type]
    channel = body.get("channel") or {}
    if channel.get("type") != "rest-hook":
        raise _bad("channel.type must be rest-hook", "Subscription.channel.type")
    endpoint = channel.get("endpoint")
    if not isinstance(endpoint, str):
        raise _bad("channel.endpoint is required", "Subscription.channel.endpoint")
    if channel.get("payload") not in PAYLOAD_TYPES:
        raise _bad("channel.payload must be application/fhir+json", "Subscription.channel.payload")
    contents = _extensions(channel.get("_payload") or {}, PAYLOAD_CONTENT)
    content = contents[0].get("valueCode") if len(contents) == 1 else None
    if content not in CONTENTS:
        raise _bad(
            "channel.payload needs one backport-payload-content extension: empty, id-only or full-resource",
            "Subscription.channel.payload.extension",
        )
    headers = channel.get("header", [])
    if not all(
        isinstance(h, str) and ":" in h and h.split(":", 1)[0].strip() and "\n" not in h and "\r" not in h
        for h in headers
    ):
        raise _bad("channel.header values must look like 'Name: value'", "Subscription.channel.header")
    return Spec(
        topic=topic,
        filters=tuple(str(f) for f in filters),
        filter=compiled,
        content=str(content),
        endpoint=endpoint,
        headers=tuple(headers),
        heartbeat=_unsigned(channel, HEARTBEAT_PERIOD, "backport-heartbeat-period"),
        timeout=_unsigned(channel, TIMEOUT, "backport-timeout"),
        status=status,
    )
