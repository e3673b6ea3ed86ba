"""Consent tokens: minted from an authorization or for a 45 CFR 164.508(a)(2) exception, and
exception grants ended early. The rules are in policy.py; the token format in consent_token.py.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response

from mindchart_core import errors, fhirjson, validation
from psychnotes import consent_token, gate_cache, policy, service, store
from psychnotes.consent import Authorization, parse_instant


def _parameters(body: Any) -> dict[str, list[Any]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.Invalid("Send a Parameters resource")
    validation.validate_resource(body, "Parameters")
    out: dict[str, list[Any]] = {}
    for parameter in body.get("parameter", []):
        value = next((v for k, v in parameter.items() if k.startswith("value")), None)
        if value is not None:
            out.setdefault(parameter["name"], []).append(value)
    return out


def _one_code(params: dict[str, list[Any]], name: str) -> str | None:
    values = params.get(name, [])
    if len(values) > 1:
        raise errors.Invalid(f"Give {name} once")
    if not values:
        return None
    value = values[0]
    if isinstance(value, dict):
        value = value.get("code") or value.get("reference")
    return str(value) if value else None


def _note_request(params: dict[str, list[Any]]) -> policy.NoteRequest:
    ids: set[str] = set()
    for value in params.get("note", []):
        ref = value.get("reference", "") if isinstance(value, dict) else str(value)
        note_id = ref.removeprefix("DocumentReference/")
        if not service.ID.match(note_id):
            raise errors.Invalid("note: give DocumentReference/<id> references")
        ids.add(note_id)
    try:
        start = parse_instant(str(params["start"][0])) if "start" in params else None
        end = parse_instant(str(params["end"][0]), end=True) if "end" in params else None
    except ValueError:
        raise errors.Invalid("start/end must be dates or instants") from None
    return policy.NoteRequest(ids=frozenset(ids) if ids else None, start=start, end=end)


def _token_response(raw: str, token: consent_token.ConsentToken) -> Response:
    parameters = {"resourceType": "Parameters", "parameter": [
        {"name": "token", "valueString": raw},
        {"name": "expires", "valueInstant": service.instant(datetime.fromtimestamp(token.expires_at, UTC))},
        {"name": "patient", "valueReference": {"reference": token.patient}},
        {"name": "basis", "valueString": token.basis},
    ] + [{"name": "purpose", "valueCode": p} for p in token.purpose_of_use]}
    return fhirjson.FhirResponse(parameters, headers=service.NO_STORE)


def _require_reader(ctx: service.Context) -> None:
    if not policy.may_read_notes(ctx.token):
        raise errors.InsufficientScope("The granted scopes do not permit reading psychotherapy notes")


async def mint_from_consent(ctx: service.Context, consent_id: str, body: Any) -> Response:
    _require_reader(ctx)
    params = _parameters(body)
    purpose = _one_code(params, "purpose")
    if not purpose:
        raise errors.Invalid("purpose (a v3-ActReason code) is required")
    wanted = _note_request(params)
    basis = f"Consent/{consent_id[:64]}"
    doc = await store.get_consent(ctx.db, consent_id) if service.ID.match(consent_id) else None
    now = datetime.now(UTC)
    try:
        if doc is None:
            raise policy.Refusal("This authorization does not name the caller as a recipient")
        auth = Authorization.from_index(doc)
        policy.check_consent_mint(auth, ctx.token, purpose, now)
        scope = policy.scope_from_consent(auth, wanted)
    except policy.Refusal as exc:
        await service.record_decision(ctx, permit=False, action="mint", reason=exc.diagnostics,
                                      basis=basis, purposes=[purpose],
                                      patient=doc["patient"] if doc else None)
        raise
    expires = min(int(time.time()) + ctx.settings.consent_token_minutes * 60,
                  int(auth.end.timestamp()))
    raw, token = consent_token.mint(
        ctx.signing_key, base_url=ctx.base, patient=auth.patient, basis=basis,
        client_id=ctx.token.client_id, fhir_user=ctx.user, purpose_of_use=[purpose],
        notes=scope, expires_at=expires)
    await service.record_decision(ctx, permit=True, action="mint", reason="consent token minted",
                                  patient=auth.patient, basis=basis, purposes=[purpose], jti=token.jti)
    return _token_response(raw, token)


async def mint_for_exception(ctx: service.Context, body: Any) -> Response:
    """45 CFR 164.508(a)(2): a token without an authorization, on one of the listed grounds."""
    _require_reader(ctx)
    params = _parameters(body)
    basis = _one_code(params, "basis") or ""
    patient = _one_code(params, "patient") or ""
    patient = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    if not service.ID.match(patient.removeprefix("Patient/")):
        raise errors.Invalid("patient (Patient/<id>) is required")
    justification = str((params.get("justification") or [""])[0])
    purpose = _one_code(params, "purpose")
    wanted = _note_request(params)
    try:
        purpose = policy.check_exception_mint(basis, ctx.token, purpose, justification,
                                              ctx.settings.min_justification_chars)
        if basis == policy.ORIGINATOR and not await store.authored_for(
                ctx.db, str(ctx.user), patient):
            raise policy.Refusal("The originator-treatment exception is only for the author of "
                                 "this patient's notes")
    except policy.Refusal as exc:
        await service.record_decision(ctx, permit=False, action="mint", reason=exc.diagnostics,
                                      patient=patient, basis=f"exception:{basis}",
                                      purposes=[purpose] if purpose else [])
        raise
    author = ctx.user if basis == policy.ORIGINATOR else None
    scope = consent_token.NoteScope(ids=wanted.ids, start=wanted.start, end=wanted.end,
                                    author=author)
    expires = int(time.time()) + ctx.settings.exception_token_minutes * 60
    raw, token = consent_token.mint(
        ctx.signing_key, base_url=ctx.base, patient=patient, basis=f"exception:{basis}",
        client_id=ctx.token.client_id, fhir_user=ctx.user, purpose_of_use=[purpose],
        notes=scope, expires_at=expires)
    await store.insert_exception_grant(ctx.db, {
        "_id": token.jti, "basis": basis, "patient": patient, "purpose": purpose,
        "client_id": ctx.token.client_id, "fhir_user": ctx.user, "roles": list(ctx.token.roles),
        "justification": justification.strip() or None, "notes": scope.claims(),
        "issued": store.now(), "expires": datetime.fromtimestamp(expires, UTC),
        "request_id": ctx.request_id, "revoked": False})
    await service.record_decision(ctx, permit=True, action="mint", patient=patient,
                                  basis=f"exception:{basis}", purposes=[purpose], jti=token.jti,
                                  reason=f"consent token minted under the {basis} exception")
    return _token_response(raw, token)


async def revoke_exception(ctx: service.Context, body: Any) -> Response:
    """End a 45 CFR 164.508(a)(2) exception grant now: every later use of its consent token is
    refused (policy.check_token_in_force reads the grant on every request).

    Parameters: `jti` (the grant: the consent token's `jti`) or `token` (the consent token
    itself, still unexpired). Who may revoke (policy.may_revoke_exception): the grantee (same
    client and user as at minting) or a caller with the compliance role (oversight of
    exception use). Revoking twice answers the same. Each decision is audited (AuthZconsent,
    action `exception-revoke`), permit or deny.
    """
    params = _parameters(body)
    jti, raw = _one_code(params, "jti"), _one_code(params, "token")
    if bool(jti) == bool(raw):
        raise errors.Invalid("Give the grant to revoke: jti, or token (the consent token), once")
    if raw:
        try:
            jti = consent_token.verify(raw, ctx.signing_key, base_url=ctx.base).jti
        except consent_token.InvalidConsentToken as exc:
            raise errors.Invalid(f"token: {exc}; an expired consent token needs no revoking") from None
    assert jti is not None
    grant = await store.get_exception_grant(ctx.db, jti) if service.ID.match(jti) else None
    if grant is None:
        raise errors.NotFound("No exception grant with this jti")
    basis = f"exception:{grant['basis']}"
    try:
        role = policy.may_revoke_exception(grant, ctx.token)
    except policy.Refusal as exc:
        await service.record_decision(ctx, permit=False, action="exception-revoke", reason=exc.diagnostics,
                                      patient=grant["patient"], basis=basis, jti=jti)
        raise
    if not grant.get("revoked"):
        by = ctx.user or ctx.token.client_id
        revoked = await store.revoke_exception_grant(ctx.db, jti, by=by, at=store.now())
        ctx.bases.forget(gate_cache.grant_key(jti))  # the next read of its token is refused
        if revoked:
            grant = await store.get_exception_grant(ctx.db, jti) or grant
    await service.record_decision(ctx, permit=True, action="exception-revoke", patient=grant["patient"],
                                  basis=basis, purposes=[grant["purpose"]], jti=jti,
                                  reason=f"exception grant revoked by the {role}")
    parameters = {"resourceType": "Parameters", "parameter": [
        {"name": "jti", "valueString": jti},
        {"name": "basis", "valueString": basis},
        {"name": "patient", "valueReference": {"reference": grant["patient"]}},
        {"name": "revoked", "valueBoolean": True},
        {"name": "revokedBy", "valueString": str(grant.get("revoked_by") or "")},
        {"name": "revokedAt", "valueInstant": service.instant(grant["revoked_at"])},
    ]}
    return fhirjson.FhirResponse(parameters, headers=service.NO_STORE)

