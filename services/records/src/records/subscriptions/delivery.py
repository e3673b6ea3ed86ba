"""Fan-out and delivery: every records replica runs both; leases keep them from colliding.

Fan-out (one replica at a time, the holder of the `fan-out` lease) takes outbox events in order,
finds the live subscriptions whose topic and filter criteria match and whose subscriber may see
the resource (its stored scopes and patient context, AccessPolicy), gives each of them its next
event number (one transaction per subscription: counter and notification together; a re-run
after a crash never numbers an event twice, store.fan_out), then removes the event from the
outbox. Numbers are therefore consecutive per subscription and say nothing about anything the
subscriber was not told about.

Delivery workers (`workers` per replica) claim one due subscription at a time with a lease
(store.claim; like export jobs, records/export/worker.py), then:
1. ask the gateway for the subscriber's current grant (grants.py): revoked or expired → `off`;
   scopes no longer covering the topic, or the endpoint no longer registered → `error`. Nothing
   is sent in either case. The gateway not answering → try again later (fail closed).
2. `requested` → send the handshake; a 2xx makes it `active`, anything else `error`
   (backport IG channels.md, REST-Hook: "Any errors in the initial handshake SHALL result in the
   status being changed to error").
3. `active` → send its undelivered notifications in event-number order, one event per Bundle.
   Before each, the event's resource is read as the subscriber (ResourceStore.vread under its
   current policy): if that read would fail, the event is skipped, not sent; a `full-resource`
   payload is exactly what that read returns. A 2xx advances `delivered`; a failure keeps it, so
   the same event number is sent again after a pause that doubles from `retry_base_seconds` (up
   to `retry_max_seconds`); after `max_failures` consecutive failures the subscription becomes
   `error` (the client resumes it by updating it to `requested`: handshake, then delivery goes
   on from the first undelivered number). At least once: a worker killed between the POST and
   recording it leaves the number undelivered, and whoever claims next sends it again.
4. Nothing pending and a heartbeat period set → a `heartbeat` once the period has passed since
   the last notification.

Every POST goes to the address endpoints.resolve just checked (never a private range unless
configured); channel headers are decrypted only to be sent and are never logged.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from fastapi import FastAPI
from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure, PyMongoError

from mindchart_core import errors, matcher, scopes
from records import background
from records.resources import RESOURCES
from records.store import ResourceStore
from records.subscriptions import channel_headers, endpoints, grants, notifications, profile, store, topics
from records.subscriptions.settings import SubscriptionSettings

log = structlog.get_logger(__name__)


class Workers(background.Workers):
    def __init__(
        self,
        client: AsyncMongoClient[dict[str, Any]],
        db: store.Db,
        settings: SubscriptionSettings,
        base_url: str,
        grant_source: grants.Grants,
    ) -> None:
        super().__init__()
        self.client, self.db, self.settings, self.base_url = client, db, settings, base_url
        self.grants = grant_source
        self.development = not settings.is_production
        self.allowed = endpoints.networks(settings.allow_networks)
        self.key = settings.header_key_bytes() if settings.enabled else b""
        self.http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self._filters: dict[tuple[str, int], dict[str, Any]] = {}

    def start(self) -> None:
        if self.settings.workers <= 0 or not self.settings.enabled:
            return
        self.spawn("subscription-fan-out", self._fan_out_loop())
        for index in range(self.settings.workers):
            self.spawn(f"subscription-worker-{index}", self._loop(index))

    async def stop(self) -> None:
        await super().stop()
        await self.http.aclose()
        await self.grants.close()

    # -- fan-out --------------------------------------------------------------------------

    async def _fan_out_loop(self) -> None:
        while not self._stopping:
            done = 0
            try:
                if await store.hold_fan_out(self.db, self.owner, self.settings.lease_seconds):
                    done = await self.fan_out_once()
            except (ConnectionFailure, PyMongoError) as exc:
                log.warning("subscription_fan_out_failed", error_type=type(exc).__name__)
            if done:
                self.nudge()
                continue
            await asyncio.sleep(min(self.settings.poll_seconds, 0.25))

    def _criteria(self, sub: dict[str, Any]) -> dict[str, Any]:
        key = (sub["_id"], int(sub["vid"]))
        if key not in self._filters:
            topic = topics.BY_URL[sub["topic"]]
            self._filters[key] = profile.compile_filters(topic, list(sub.get("filters", [])), self.base_url)
        return self._filters[key]

    def _may_see(self, sub: dict[str, Any], event: dict[str, Any]) -> bool:
        owner = sub["owner"]
        policy = grants.policy_for(owner, scopes.parse(owner["scope"]), self.base_url)
        try:
            allowed = policy.filter_for(RESOURCES[event["type"]], "read")
        except errors.Forbidden:
            return False
        return matcher.matches(allowed, {"c": event.get("c", []), "sp": event.get("sp", {})})

    async def fan_out_once(self) -> int:
        events = await store.pending_events(self.db, 200)
        if not events:
            return 0
        subs = await store.live(self.db)
        for event in events:
            document = {"c": event.get("c", []), "sp": event.get("sp", {})}
            targets = [
                (sub["_id"], sub["topic"])
                for sub in subs
                if sub["topic"] in event["topics"]
                and event["ts"] >= sub.get("created", sub["ts"])  # nothing from before it existed
                and matcher.matches(self._criteria(sub), document)
                and self._may_see(sub, event)
            ]
            await store.fan_out(self.client, self.db, event, targets)
        return len(events)

    # -- delivery -------------------------------------------------------------------------

    async def _loop(self, index: int) -> None:
        name = f"{self.owner}/{index}"
        while not self._stopping:
            try:
                sub = await store.claim(self.db, name, self.settings.lease_seconds)
            except PyMongoError:
                sub = None
            if sub is not None:
                try:
                    await self.serve(sub, name)
                except (ConnectionFailure, PyMongoError) as exc:
                    log.warning(
                        "subscription_delivery_datastore",
                        subscription=sub["_id"],
                        error_type=type(exc).__name__,
                    )
                except Exception as exc:  # never let one subscription stop the worker
                    log.error(
                        "subscription_delivery_crashed",
                        subscription=sub["_id"],
                        error_type=type(exc).__name__, where=_where(exc),
                    )
                continue
            await self.idle(self.settings.poll_seconds)

    def _pause(self, failures: int) -> float:
        return float(
            min(self.settings.retry_max_seconds, self.settings.retry_base_seconds * 2 ** (failures - 1))
        )

    async def serve(self, sub: dict[str, Any], worker: str) -> None:
        sub_id = sub["_id"]
        topic = topics.BY_URL[sub["topic"]]
        try:
            grant = await self.grants.current(sub["owner"])
        except grants.GatewayUnavailable:
            await store.release(
                self.db,
                sub_id,
                worker,
                int(sub["events"]),
                store.now() + timedelta(seconds=self.settings.retry_base_seconds),
            )
            return
        if not grant.active:
            log.info("subscription_stopped", subscription=sub_id, reason="grant")
            await store.set_status(self.db, sub_id, worker, "off", grant.reason)
            return
        if not grant.scope.allows(topic.resource, "read"):
            log.info("subscription_stopped", subscription=sub_id, reason="scope")
            await store.set_status(
                self.db,
                sub_id,
                worker,
                "error",
                f"the subscriber's scopes no longer permit reading {topic.resource}",
            )
            return
        if not endpoints.registered(sub["endpoint"], list(grant.endpoints)):
            await store.set_status(
                self.db, sub_id, worker, "error", "channel.endpoint is no longer registered for the client"
            )
            return
        if sub["status"] == "requested":
            problem = await self._post(
                sub, notifications.bundle(self.base_url, sub, "handshake", status="requested")
            )
            log.info("subscription_handshake", subscription=sub_id, ok=problem is None)
            if problem is None:
                await store.set_status(self.db, sub_id, worker, "active", None, due=store.now())
            else:
                await store.set_status(self.db, sub_id, worker, "error", f"handshake failed: {problem}")
            return
        if sub["status"] != "active":
            await store.release(self.db, sub_id, worker, int(sub["events"]), None)
            return
        renewed = time.monotonic()  # the claim took the lease just now
        reader = ResourceStore(
            self.client, self.db, grants.policy_for(sub["owner"], grant.scope, self.base_url)
        )
        last_sent: datetime | None = sub.get("last_sent")
        batch = await store.pending(self.db, sub_id, int(sub.get("delivered", 0)), self.settings.batch)
        for event in batch:
            visible, payload = await self._read_as_subscriber(reader, event)
            if not visible:
                log.info("subscription_event_withheld", subscription=sub_id, number=event["n"])
                await store.delivered(self.db, sub_id, worker, int(event["n"]), sent=False)
                continue
            body = notifications.bundle(self.base_url, sub, "event-notification", [(event, payload)])
            problem = await self._post(sub, body)
            if problem is not None:
                await self._failed(sub, worker, problem)
                return
            log.info("subscription_event_delivered", subscription=sub_id, number=event["n"])
            await store.delivered(self.db, sub_id, worker, int(event["n"]), sent=True)
            last_sent = store.now()
            if time.monotonic() - renewed > self.settings.lease_seconds / 3:
                if not await store.renew(self.db, sub_id, worker, self.settings.lease_seconds):
                    return  # the lease was lost (or the subscription deleted): stop here
                renewed = time.monotonic()
        heartbeat = sub.get("heartbeat")
        if not batch and heartbeat:
            if last_sent is None or last_sent + timedelta(seconds=heartbeat) <= store.now():
                fresh = await store.get(self.db, sub_id) or sub
                problem = await self._post(fresh, notifications.bundle(self.base_url, fresh, "heartbeat"))
                if problem is not None:
                    await self._failed(sub, worker, problem)
                    return
                await store.heartbeat_sent(self.db, sub_id, worker)
                last_sent = store.now()
        due = None
        if len(batch) == self.settings.batch:
            due = store.now()
        elif heartbeat:
            due = (last_sent or store.now()) + timedelta(seconds=heartbeat)
        await store.release(self.db, sub_id, worker, int(sub["events"]), due)

    async def _failed(self, sub: dict[str, Any], worker: str, problem: str) -> None:
        failures = int(sub.get("failures", 0)) + 1
        log.info("subscription_delivery_failed", subscription=sub["_id"], failures=failures)
        if failures >= self.settings.max_failures:
            await store.failed(
                self.db,
                sub["_id"],
                worker,
                failures,
                f"delivery failed {failures} times in a row: {problem}",
                None,
                "error",
            )
            return
        due = store.now() + timedelta(seconds=self._pause(failures))
        await store.failed(self.db, sub["_id"], worker, failures, problem, due, "active")

    async def _read_as_subscriber(
        self, reader: ResourceStore, event: dict[str, Any]
    ) -> tuple[bool, bytes | None]:
        try:
            stored = await reader.vread(RESOURCES[event["type"]], event["id"], int(event["vid"]))
        except (errors.NotFound, errors.Forbidden, errors.Gone):
            return False, None
        return True, stored.raw

    async def _post(self, sub: dict[str, Any], body: bytes) -> str | None:
        """POST one notification; None when the endpoint answered 2xx, else why not."""
        try:
            target = await endpoints.resolve(
                sub["endpoint"], development=self.development, allowed=self.allowed
            )
        except endpoints.Refused as refused:
            return str(refused)
        parts = urlsplit(target.url)
        host = f"[{target.address}]" if target.address.version == 6 else str(target.address)
        pinned = parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        for name, value in channel_headers.unseal(self.key, sub["_id"], sub.get("headers")):
            headers[name] = value
        headers["Host"] = parts.netloc
        timeout = min(
            float(sub.get("timeout") or self.settings.timeout_seconds), self.settings.timeout_seconds
        )
        try:
            response = await self.http.post(
                pinned,
                content=body,
                headers=headers,
                timeout=timeout,
                extensions={"sni_hostname": target.host},
            )
        except httpx.HTTPError as exc:
            return f"the endpoint could not be reached ({type(exc).__name__})"
        if 200 <= response.status_code < 300:
            return None
        return f"the endpoint answered HTTP {response.status_code}"


async def start(app: FastAPI) -> Workers:
    settings: SubscriptionSettings = app.state.subscription_settings
    records_settings = app.state.settings
    await store.ensure_indexes(app.state.db)
    from records.subscriptions import outbox

    await outbox.ensure_indexes(app.state.db)
    source = grants.Grants(
        records_settings.issuer, settings.gateway_secret_value(), settings.grant_cache_seconds
    )
    workers = Workers(app.state.mongo, app.state.db, settings, records_settings.public_base_url, source)
    workers.start()
    return workers


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame (for the log; no values, so no data)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"
