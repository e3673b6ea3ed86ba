"""Topic-based Subscriptions (HL7 Subscriptions R5 Backport IG STU 1.1) for records.

- topics.py: the topics offered and the write transitions that trigger them.
- outbox.py: the event a triggering write records in its own transaction (called by store.py).
- profile.py: validation of `backport-subscription` resources.
- endpoints.py: where notifications may go (HTTPS, registered, never a private address).
- grants.py: the subscriber's current grant, asked of the gateway.
- store.py: subscriptions, their numbered notifications, leases.
- notifications.py: notification Bundles and the status Parameters.
- delivery.py: fan-out of events to subscriptions and the delivery workers.
- routes.py: Subscription REST, `$status`, `$events`, topics as `Basic`.

Wiring from records/app.py, like records/export: `install(app)` in create_app, `await start(app)`
and `await stop(app)` in the lifespan, `declare(statement)` for the CapabilityStatement. Imports
are inside the functions because store.py imports `outbox` from this package.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def install(app: FastAPI) -> None:
    from records.subscriptions import routes
    from records.subscriptions.settings import SubscriptionSettings

    app.state.subscription_settings = SubscriptionSettings()
    app.include_router(routes.router)


async def start(app: FastAPI) -> None:
    from records.subscriptions import delivery

    app.state.subscription_workers = await delivery.start(app)


async def stop(app: FastAPI) -> None:
    workers = getattr(app.state, "subscription_workers", None)
    if workers is not None:
        await workers.stop()


def declare(statement: dict[str, Any]) -> dict[str, Any]:
    from records.subscriptions import routes

    return routes.declare(statement)


__all__ = ["declare", "install", "start", "stop"]
