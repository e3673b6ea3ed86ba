"""The patient's authorizations (45 CFR 164.508(c)): record, attest, read, list, revoke.

Who may do what (policy.py holds each rule):
- record: the patient (their own: patient context or their fhirUser), a member of the patient's
  active care team (careteam.py) or the compliance role. Recorded by anyone but the patient, it
  is stored `proposed` whatever the body says, and releases nothing until attested;
- attest (`$attest`): a second person with the compliance role, neither its recorder nor a
  recipient it names (policy.check_attestation); the authorization becomes `active`;
- read and list: its patient, recorder, attester, named recipients and the compliance role
  (policy.consent_reader); to anyone else it does not exist (404);
- revoke (`$revoke`, 164.508(b)(5)): the patient, the recorder, the attester or compliance.

The Consent is sealed like a note (it names what the patient wants kept private); its gate summary
(consent.Authorization) is stored in clear beside it.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.responses import Response

from mindchart_core import errors, fhirjson, validation
from psychnotes import gate_cache, policy, service, store, vault
from psychnotes.consent import Authorization, check_authorization, with_defaults

SEARCH_PARAMS = frozenset({"patient", "subject", "_format"})  # `Consent?patient=` (one patient)


def _consent_document(ctx: service.Context, consent_id: str, version: int, resource: dict[str, Any],
                      auth: Authorization, moment: datetime) -> dict[str, Any]:
    body = {"resourceType": "Consent", "id": consent_id,
            **{k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")},
            "meta": {**resource.get("meta", {}), "versionId": str(version),
                     "lastUpdated": service.instant(moment)}}
    sealed = vault.seal(ctx.keyring, body, vault.Binding("Consent", consent_id, version, auth.patient))
    return {"_id": consent_id, "vid": version, "ts": moment, "created_by": auth.recorded_by,
            **auth.index(), "sealed": sealed}


def _authorization(doc: dict[str, Any]) -> Authorization:
    return Authorization.from_index(doc)


async def _recorder_role(ctx: service.Context, patient: str) -> str | None:
    """Who may record this patient's authorization: 'patient', 'care-team member', 'compliance
    officer', or None."""
    if policy.is_own_patient(patient, ctx.token):
        return "patient"
    if policy.is_patient_context(ctx.token):
        return None  # a patient acts only for themselves
    user = ctx.user or ""
    if user.startswith("Practitioner/") and await ctx.care_teams.is_member(patient, user):
        return "care-team member"
    if policy.COMPLIANCE_ROLE in ctx.token.roles:
        return "compliance officer"
    return None


async def create_consent(ctx: service.Context, body: Any) -> Response:
    if not ctx.token.scope.allows("Consent", "create"):
        raise errors.InsufficientScope("The granted scopes do not permit recording an authorization")
    resource = validation.validate_resource(body, "Consent")
    now = datetime.now(UTC)
    auth = check_authorization(resource, now)
    role = await _recorder_role(ctx, auth.patient)
    if role is None:
        await service.record_decision(ctx, permit=False, action="consent-create", patient=auth.patient,
                                      reason="only the patient or their care team may record it")
        raise errors.Forbidden("Only the patient, a member of their care team or the compliance "
                               "role may record this patient's authorization")
    resource = with_defaults(resource)
    if role != "patient" and auth.status == "active":
        # The two-person rule: in force only once a second person attests it ($attest).
        resource["status"] = "proposed"
    auth = replace(auth, status=str(resource["status"]), recorded_by=policy.caller_key(ctx.token))
    consent_id, moment = str(uuid.uuid4()), store.now()
    doc = _consent_document(ctx, consent_id, 1, resource, auth, moment)
    await store.insert_consent(ctx.db, doc, service.decision_record(
        ctx, permit=True, action="consent-create", patient=auth.patient,
        basis=f"Consent/{consent_id}", purposes=sorted(auth.purposes),
        reason=f"authorization recorded ({auth.status}) by the {role}"))
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
    role = policy.consent_reader(_authorization(doc), ctx.token) if doc is not None else None
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
    """`GET Consent?patient=X`: the patient's authorizations this caller may read
    (policy.consent_reader); 403 when that is none of them."""
    if not ctx.token.scope.allows("Consent", "search-type"):
        raise errors.InsufficientScope("The granted scopes do not permit searching authorizations")
    wanted = [v for k, v in items if k in ("patient", "subject")]
    unknown = [k for k, _ in items if k not in SEARCH_PARAMS]
    if unknown or len(wanted) != 1:
        raise errors.Invalid("Search authorizations by exactly one patient (patient=<id>)")
    patient = wanted[0] if wanted[0].startswith("Patient/") else f"Patient/{wanted[0]}"
    if not service.ID.match(patient.removeprefix("Patient/")):
        raise errors.Invalid("patient is not a FHIR id")
    readable = [doc for doc in await store.consents_of(ctx.db, patient)
                if policy.consent_reader(_authorization(doc), ctx.token) is not None]
    if not readable and not policy.is_own_patient(patient, ctx.token) and (
            policy.COMPLIANCE_ROLE not in ctx.token.roles):
        raise errors.Forbidden("Only the patient, the compliance role and the parties an "
                               "authorization names may list it")
    entries = [b'{"fullUrl":' + orjson.dumps(f"{ctx.base}/Consent/{doc['_id']}") + b',"resource":'
               + _open_consent(ctx, doc) + b',"search":{"mode":"match"}}' for doc in readable]
    head = {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
            "link": [{"relation": "self", "url": f"{ctx.base}/Consent?{urlencode({'patient': patient})}"}]}
    return fhirjson.FhirResponse(service.bundle(head, entries), headers=service.NO_STORE)


async def _new_status(ctx: service.Context, doc: dict[str, Any], status: str, decision: dict[str, Any],
                      **changes: Any) -> dict[str, Any]:
    """The next version of an authorization with another status (history kept), stored in one
    transaction with the `decision` that audits it."""
    resource = orjson.loads(_open_consent(ctx, doc))
    resource["status"] = status
    auth = replace(_authorization(doc), status=status,
                   **{k: v for k, v in changes.items() if k == "attested_by"})
    moment = store.now()
    new = _consent_document(ctx, doc["_id"], int(doc["vid"]) + 1, resource, auth, moment)
    new.update({k: v for k, v in changes.items() if k != "attested_by"})
    for kept in ("attested_at", "revoked_by", "revoked_at"):
        if kept in doc and kept not in new:
            new[kept] = doc[kept]
    await store.replace_consent(ctx.db, new, expected=int(doc["vid"]), decision=decision)
    ctx.bases.forget(gate_cache.consent_key(str(doc["_id"])))  # the next read checks this version
    return new


async def revoke_consent(ctx: service.Context, consent_id: str) -> Response:
    """45 CFR 164.508(b)(5): status becomes inactive; every token minted from it fails at once."""
    if not ctx.token.scope.allows("Consent", "update"):
        raise errors.InsufficientScope("The granted scopes do not permit revoking authorizations")
    doc, _ = await _visible_consent(ctx, consent_id)
    role = policy.may_revoke(_authorization(doc), ctx.token)
    if role is None:
        raise errors.Forbidden("Only the patient, the recorder or the compliance role may revoke it")
    decision = service.decision_record(ctx, permit=True, action="consent-revoke", patient=doc["patient"],
                                       basis=f"Consent/{consent_id}",
                                       reason=f"authorization revoked by the {role}")
    if doc["status"] != "inactive":
        doc = await _new_status(ctx, doc, "inactive", decision, revoked_by=policy.caller_key(ctx.token),
                                revoked_at=store.now())
    else:  # already revoked: nothing written, the request still audited
        await ctx.audit_log.insert(("decisions", decision))
    return fhirjson.FhirResponse(_open_consent(ctx, doc),
                                 headers={**service.NO_STORE, **service.resource_headers(doc)})


async def attest_consent(ctx: service.Context, consent_id: str) -> Response:
    """`POST Consent/{id}/$attest`: the second person's check puts a proposed authorization in
    force (policy.check_attestation). Audited permit or deny (AuthZconsent, `consent-attest`)."""
    if not ctx.token.scope.allows("Consent", "update"):
        raise errors.InsufficientScope("The granted scopes do not permit attesting authorizations")
    doc, _ = await _visible_consent(ctx, consent_id)
    auth = _authorization(doc)
    try:
        policy.check_attestation(auth, ctx.token, datetime.now(UTC))
    except policy.Refusal as exc:
        await service.record_decision(ctx, permit=False, action="consent-attest",
                                      patient=auth.patient, basis=f"Consent/{consent_id}",
                                      reason=exc.diagnostics)
        raise
    doc = await _new_status(ctx, doc, "active", service.decision_record(
        ctx, permit=True, action="consent-attest", patient=auth.patient, basis=f"Consent/{consent_id}",
        purposes=sorted(auth.purposes), reason="authorization attested by a compliance officer"),
        attested_by=policy.caller_key(ctx.token), attested_at=store.now())
    return fhirjson.FhirResponse(_open_consent(ctx, doc),
                                 headers={**service.NO_STORE, **service.resource_headers(doc)})
