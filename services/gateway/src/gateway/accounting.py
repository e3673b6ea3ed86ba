"""The records half of the 45 CFR 164.528 accounting: bulk-export disclosures, read from records'
internal `Patient/{id}/$disclosures` over HTTP (services never import each other).

The gateway authenticates to records with an access token it mints for itself, signed with its
own key, for the records audience, lasting `ACCOUNTING_TOKEN_SECONDS`: client and subject
`audit.ACCOUNTING_CLIENT` (a client id no registration can take) and the single scope
`audit.ACCOUNTING_SCOPE`, which permits that one operation and nothing clinical. The token never
leaves the gateway.

If records cannot give its part (unreachable, timeout, any answer but a searchset Bundle), the
whole accounting fails with 503 + OperationOutcome `transient` and `Retry-After`: an accounting
that silently lacks the bulk exports would misstate who received the patient's data.
"""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import quote

import httpx
import structlog
from fastapi import FastAPI

from gateway.settings import GatewaySettings
from mindchart_core import audit, errors

log = structlog.get_logger(__name__)

ACCOUNTING_TOKEN_SECONDS = 60
RETRY_AFTER_SECONDS = 10


async def accounting_token(app: FastAPI) -> str:
    settings: GatewaySettings = app.state.settings
    now = int(time.time())
    claims = {
        "iss": settings.issuer, "aud": settings.records_base,
        "sub": audit.ACCOUNTING_CLIENT, "client_id": audit.ACCOUNTING_CLIENT,
        "scope": audit.ACCOUNTING_SCOPE, "iat": now, "exp": now + ACCOUNTING_TOKEN_SECONDS,
        "jti": uuid.uuid4().hex,
    }
    token: str = await app.state.keys.sign(claims)
    return token


def _unavailable(reason: str) -> errors.Unavailable:
    log.error("accounting_records_unavailable", reason=reason)
    return errors.Unavailable(
        "The accounting of disclosures is incomplete without records' bulk-export disclosures, "
        f"which could not be read ({reason}); nothing is returned rather than a partial "
        "accounting. Try again later.",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def records_disclosures(
    app: FastAPI, patient_id: str, dates: list[str], cursor: str | None, count: int,
    request_id: str,
) -> tuple[list[dict[str, Any]], bool]:
    """Records' PrivacyDisclosure AuditEvents for the patient: at most `count`, newest first,
    after `cursor`, inside every `date`; and whether records holds more. Raises 503 if records
    does not answer."""
    settings: GatewaySettings = app.state.settings
    params: list[tuple[str, str]] = [("date", d) for d in dates] + [("_count", str(count))]
    if cursor is not None:
        params.append(("_cursor", cursor))
    url = f"{settings.records_url.rstrip('/')}/fhir/Patient/{quote(patient_id, safe='')}/$disclosures"
    headers = {"Authorization": f"Bearer {await accounting_token(app)}",
               "Accept": "application/fhir+json", "X-Request-Id": request_id}
    http: httpx.AsyncClient = app.state.http
    try:
        response = await http.get(url, params=params, headers=headers)
    except httpx.HTTPError as exc:
        raise _unavailable(f"records unreachable: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise _unavailable(f"records answered HTTP {response.status_code}")
    try:
        bundle = response.json()
        events = [entry["resource"] for entry in bundle.get("entry", [])]
        more = any(link.get("relation") == "next" for link in bundle.get("link", []))
        if bundle.get("resourceType") != "Bundle" or any(
                e.get("resourceType") != "AuditEvent" for e in events):
            raise ValueError("not a Bundle of AuditEvents")
        for event in events:
            audit.accounting_key(event)  # each has a readable `recorded` and an id
    except (ValueError, TypeError, KeyError, AttributeError):
        raise _unavailable("records answered something other than a Bundle of AuditEvents") from None
    return events, more
