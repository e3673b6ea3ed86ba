"""The patient's authorizations (45 CFR 164.508(c)): record, read, list, revoke.

The Consent is sealed like a note (it names what the patient wants kept private); its gate summary
(consent.Authorization) is stored in clear beside it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.responses import Response

from mindchart_core import errors, fhirjson, validation
from psychnotes import policy, service, store, vault
from psychnotes.consent import Authorization, check_authorization, with_defaults


def _consent_document(ctx: service.Context, consent_id: str, version: int, resource: dict[str, Any],
                      auth: Authorization, moment: datetime, created_by: str) -> dict[str, Any]:
    body = {"resourceType": "Consent", "id": consent_id,
            **{k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")},
            "meta": {**resource.get("meta", {}), "versionId": str(version),
                     "lastUpdated": service.instant(moment)}}
    sealed = vault.seal(ctx.keyring, body, vault.Binding("Consent", consent_id, version, auth.patient))
    return {"_id": consent_id, "vid": version, "ts": moment, "created_by": created_by,
            **auth.index(), "sealed": sealed}


async def _may_manage(ctx: service.Context, patient: str) -> str | None:
    """Who the caller is to this patient's authorizations: 'patient', 'practitioner' or None."""
    if ctx.token.patient and f"Patient/{ctx.token.patient}" == patient:
        return "patient"
    if ctx.user == patient:
        return "patient"
    if ctx.user and ctx.user.startswith("Practitioner/") and await store.authored_for(
            ctx.db, ctx.user, patient):
        return "practitioner"
    return None


async def create_consent(ctx: service.Context, body: Any) -> Response:
    if not ctx.token.scope.allows("Consent", "create"):
        raise errors.InsufficientScope("The granted scopes do not permit recording an authorization")
    resource = validation.validate_resource(body, "Consent")
    now = datetime.now(UTC)
    auth = check_authorization(resource, now)
    role = await _may_manage(ctx, auth.patient)
    if role is None:
        await service.record_decision(ctx, permit=False, action="consent-create", patient=auth.patient,
                                      reason="only the patient or a treating practitioner may record it")
        raise errors.Forbidden("Only the patient (patient context) or the treating practitioner "
                               "may record this patient's authorization")
    consent_id, moment = str(uuid.uuid4()), store.now()
    doc = _consent_document(ctx, consent_id, 1, with_defaults(resource), auth, moment,
                            created_by=ctx.user or ctx.token.client_id)
    await store.insert_consent(ctx.db, doc)
    await service.record_decision(ctx, permit=True, action="consent-create", patient=auth.patient,
                                  basis=f"Consent/{consent_id}", purposes=sorted(auth.purposes),
                                  reason=f"authorization recorded by the {role}")
    raw = _open_consent(ctx, doc)
    return fhirjson.FhirResponse(raw, status_code=201, headers={
        **service.NO_STORE, "Location": f"{ctx.base}/Consent/{consent_id}/_history/1",
        "ETag": 'W/"1"', "Last-Modified": format_datetime(moment, usegmt=True)})


def _open_consent(ctx: service.Context, doc: dict[str, Any]) -> bytes:
    try:
        return vault.open_sealed(ctx.keyring, doc["sealed"], vault.Binding(
            "Consent", doc["_id"], int(doc["vid"]), doc["patient"]))
    except vault.VaultError:
        raise errors.FhirError("The authorization cannot be decrypted", status=500,
                               code="exception") from None


async def _visible_consent(ctx: service.Context, consent_id: str) -> tuple[dict[str, Any], str]:
    doc = await store.get_consent(ctx.db, consent_id) if service.ID.match(consent_id) else None
    role = None
    if doc is not None:
        role = await _may_manage(ctx, doc["patient"])
        if role is None and policy.is_recipient(Authorization.from_index(doc), ctx.token):
            role = "recipient"
    if doc is None or role is None:
        raise errors.NotFound(f"Consent/{consent_id[:64]} is not known")
    return doc, role


async def read_consent(ctx: service.Context, consent_id: str) -> Response:
    if not ctx.token.scope.allows("Consent", "read"):
        raise errors.InsufficientScope("The granted scopes do not permit reading authorizations")
    doc, _ = await _visible_consent(ctx, consent_id)
    return fhirjson.FhirResponse(_open_consent(ctx, doc),
                                 headers={**service.NO_STORE, **service.resource_headers(doc)})


async def search_consents(ctx: service.Context, items: list[tuple[str, str]]) -> Response:
    """`GET Consent?patient=X`: a patient's authorizations, for the patient or a treating clinician."""
    if not ctx.token.scope.allows("Consent", "search-type"):
        raise errors.InsufficientScope("The granted scopes do not permit searching authorizations")
    wanted = [v for k, v in items if k in ("patient", "subject")]
    unknown = [k for k, _ in items if k not in ("patient", "subject", "_format")]
    if unknown or len(wanted) != 1:
        raise errors.Invalid("Search authorizations by exactly one patient (patient=<id>)")
    patient = wanted[0] if wanted[0].startswith("Patient/") else f"Patient/{wanted[0]}"
    if not service.ID.match(patient.removeprefix("Patient/")) or await _may_manage(ctx, patient) is None:
        raise errors.Forbidden("Only the patient or a treating practitioner may list authorizations")
    entries = [b'{"fullUrl":' + orjson.dumps(f"{ctx.base}/Consent/{doc['_id']}") + b',"resource":'
               + _open_consent(ctx, doc) + b',"search":{"mode":"match"}}'
               for doc in await store.consents_of(ctx.db, patient)]
    head = {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
            "link": [{"relation": "self", "url": f"{ctx.base}/Consent?{urlencode({'patient': patient})}"}]}
    return fhirjson.FhirResponse(service.bundle(head, entries), headers=service.NO_STORE)


async def revoke_consent(ctx: service.Context, consent_id: str) -> Response:
    """45 CFR 164.508(b)(5): status becomes inactive; every token minted from it fails at once."""
    if not ctx.token.scope.allows("Consent", "update"):
        raise errors.InsufficientScope("The granted scopes do not permit revoking authorizations")
    doc, role = await _visible_consent(ctx, consent_id)
    if role == "recipient":
        raise errors.Forbidden("Only the patient or a treating practitioner may revoke it")
    if doc["status"] != "inactive":
        resource = orjson.loads(_open_consent(ctx, doc))
        resource["status"] = "inactive"
        auth = Authorization.from_index({**doc, "status": "inactive"})
        moment = store.now()
        new = _consent_document(ctx, consent_id, int(doc["vid"]) + 1, resource, auth, moment,
                                created_by=doc.get("created_by", ""))
        new["revoked_by"], new["revoked_at"] = ctx.user or ctx.token.client_id, moment
        await store.replace_consent(ctx.db, new, expected=int(doc["vid"]))
        doc = new
    await service.record_decision(ctx, permit=True, action="consent-revoke", patient=doc["patient"],
                                  basis=f"Consent/{consent_id}",
                                  reason=f"authorization revoked by the {role}")
    return fhirjson.FhirResponse(_open_consent(ctx, doc),
                                 headers={**service.NO_STORE, **service.resource_headers(doc)})

