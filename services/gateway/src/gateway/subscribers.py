"""What records needs to know about a subscriber's grant, asked at subscribe time and before
every notification it delivers (records/subscriptions/grants.py):

`POST /internal/subscriber` with `{"client_id", "username"?, "sid"?}` answers `{"active",
"scope", "subscription_endpoints", "expires"}`: whether the client registration still exists
(not removed or disabled), the scopes it is registered for now (records caps the subscribing
token's scopes by them, so narrowing a registration narrows what its subscriptions deliver),
the notification endpoints registered for it (`mindchart client create --subscription-endpoint`),
and, for a user's grant (the token's `sid`, RFC 7009 revocation acts on it), whether that grant
was revoked and until when its refresh tokens keep it alive.

Only records calls it: the request carries the secret both services share
(MINDCHART_GATEWAY_INTERNAL_SECRET / MINDCHART_RECORDS_SUBSCRIPTION_GATEWAY_SECRET), compared in
constant time. It is not a FHIR or OAuth endpoint and no client token opens it.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from gateway import store
from gateway.settings import GatewaySettings
from mindchart_core import errors

router = APIRouter()
INACTIVE: dict[str, Any] = {"active": False, "scope": "", "subscription_endpoints": [], "expires": None}


async def grant_status(db: store.Db, client_id: str, username: str | None, sid: str | None) -> dict[str, Any]:
    client = await store.get_client(db, client_id)
    if client is None:
        return INACTIVE
    expires: int | None = None
    if username:
        user = await store.get_user(db, username)
        if user is None or user.get("disabled"):
            return INACTIVE
    if sid:
        if await db.revoked_tokens.find_one({"_id": f"family:{sid}"}) is not None:
            return INACTIVE
        refreshes = await db.refresh_tokens.find({"family": sid}, {"revoked": 1, "expires": 1}).to_list()
        if refreshes:
            alive = [r["expires"] for r in refreshes if not r.get("revoked")]
            if not alive:
                return INACTIVE
            latest = max(e if e.tzinfo else e.replace(tzinfo=UTC) for e in alive)
            if latest <= datetime.now(UTC):
                return INACTIVE
            expires = int(latest.timestamp())
    return {
        "active": True,
        "scope": client.get("scope", ""),
        "subscription_endpoints": list(client.get("subscription_endpoints", [])),
        "expires": expires,
    }


@router.post("/internal/subscriber", include_in_schema=False)
async def subscriber(request: Request) -> Response:
    settings: GatewaySettings = request.app.state.settings
    presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    expected = settings.internal_secret_value()
    if not presented or not expected or not hmac.compare_digest(
        presented.encode(), settings.internal_secret_value().encode()
    ):
        raise errors.Unauthorized("This endpoint is for records only")
    try:
        body = orjson.loads(await request.body())
        client_id = body["client_id"]
        username, sid = body.get("username"), body.get("sid")
        if not isinstance(client_id, str) or not all(
            v is None or isinstance(v, str) for v in (username, sid)
        ):
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise errors.Invalid("Expected {client_id, username?, sid?}") from None
    return JSONResponse(
        await grant_status(request.app.state.db, client_id, username, sid),
        headers={"Cache-Control": "no-store"},
    )
