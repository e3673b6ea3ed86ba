"""What every psychnotes interaction shares: the request Context and the audit of each decision.

The interactions themselves live by concept: notes_service.py (notes: writes, reads through the
consent gate), consents.py (the patient's authorizations), minting.py (consent tokens and
exception grants). Rules are in policy.py, consent.py and notes.py.

Every decision of the consent gate is recorded in `decisions` (AuthZconsent) before the answer
leaves, permit or deny; every release of note content is recorded in `disclosures`
(PrivacyDisclosure) and announced to the gateway in `DISCLOSURE_HEADER` (one Disclosure per
patient) for the 45 CFR 164.528 accounting. If a record cannot be written, nothing is released.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import orjson
from joserfc.jwk import ECKey

from mindchart_core import audit, metrics
from mindchart_core.tokens import AccessToken
from psychnotes import careteam, consent_token, gate_cache, store
from psychnotes.audit_log import AuditLog
from psychnotes.keys import Keyring
from psychnotes.settings import PsychnotesSettings

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass
class Context:
    """One request's view of the vault: its caller and psychnotes' keys and datastore."""

    db: store.Db
    audit_log: AuditLog
    keyring: Keyring
    signing_key: ECKey
    settings: PsychnotesSettings
    token: AccessToken
    request_id: str
    care_teams: careteam.CareTeams
    consent_tokens: gate_cache.VerifiedConsentTokens
    bases: gate_cache.Bases

    @property
    def base(self) -> str:
        return self.settings.base_url

    @property
    def user(self) -> str | None:
        return self.token.fhir_user_ref


def instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc(moment: datetime) -> datetime:
    """BSON dates come back with bson's own UTC tzinfo; email.utils wants datetime.UTC."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


_REASON_CODES = (  # a bounded label set for /metrics; the full reason is in the audit record
    ("no consent token", "no-token"), ("several consent tokens", "several-tokens"),
    ("another caller", "other-caller"), ("revoked", "revoked"), ("expired", "expired"),
    ("signature", "invalid-token"), ("consent token", "invalid-token"), ("scope", "scope"),
    ("recipient", "not-recipient"), ("purpose", "purpose"), ("compliance", "role"),
    ("justification", "justification"), ("author", "not-author"),
)


def reason_code(reason: str) -> str:
    lowered = reason.lower()
    return next((code for words, code in _REASON_CODES if words in lowered), "other")


# -- audit --------------------------------------------------------------------------------------

async def record_decision(ctx: Context, *, permit: bool, reason: str, action: str,
                          patient: str | None = None, basis: str | None = None,
                          purposes: list[str] | None = None, jti: str | None = None,
                          entities: list[str] | None = None) -> None:
    await ctx.audit_log.insert(("decisions", decision_record(
        ctx, permit=permit, reason=reason, action=action, patient=patient, basis=basis,
        purposes=purposes, jti=jti, entities=entities)))


def decision_record(ctx: Context, *, permit: bool, reason: str, action: str,
                    patient: str | None = None, basis: str | None = None,
                    purposes: list[str] | None = None, jti: str | None = None,
                    entities: list[str] | None = None) -> dict[str, Any]:
    decision = audit.ConsentDecision(
        permit=permit, reason=reason, action=action, client_id=ctx.token.client_id,
        fhir_user=ctx.user, patient=patient, basis=basis, purpose_of_use=purposes or [],
        token_jti=jti, entities=entities or [], request_id=ctx.request_id,
        recorded=store.now())
    event = audit.consent_decision_audit_event(decision, observer=ctx.base)
    metrics.CONSENT_DECISIONS.labels("permit" if permit else "deny",
                                     action if permit else reason_code(reason)).inc()
    return {
        "_id": event["id"], "recorded": decision.recorded, "permit": permit, "action": action,
        "reason": reason, "patient": patient, "client_id": ctx.token.client_id,
        "fhir_user": ctx.user, "basis": basis, "jti": jti, "request_id": ctx.request_id,
        "entities": entities or [], "event": event}


async def record_unauthenticated(db: store.Db, settings: PsychnotesSettings, request_id: str,
                                 reason: str) -> None:
    """A request refused before any caller is known (no or invalid access token)."""
    decision = audit.ConsentDecision(permit=False, reason=reason, action="authenticate",
                                     client_id=None, request_id=request_id, recorded=store.now())
    event = audit.consent_decision_audit_event(decision, observer=settings.base_url)
    metrics.CONSENT_DECISIONS.labels("deny", "no-access-token").inc()
    await store.insert_decision(db, {
        "_id": event["id"], "recorded": decision.recorded, "permit": False,
        "action": "authenticate", "reason": reason, "patient": None, "client_id": None,
        "fhir_user": None, "basis": None, "jti": None, "request_id": request_id,
        "entities": [], "event": event})


async def release(ctx: Context, token: consent_token.ConsentToken, action: str,
                  refs: list[str]) -> dict[str, str]:
    """Record the permit and the disclosure (one group-committed write, audit_log.py); the
    headers announcing it to the gateway."""
    permit = decision_record(ctx, permit=True, reason=f"{action} permitted by {token.basis}",
                             action=action, patient=token.patient, basis=token.basis,
                             purposes=list(token.purpose_of_use), jti=token.jti, entities=refs)
    if not refs:
        await ctx.audit_log.insert(("decisions", permit))
        return dict(NO_STORE)
    disclosure = audit.Disclosure(
        patient=token.patient, entities=refs, purpose_of_use=list(token.purpose_of_use),
        basis=token.basis, recipient_client_id=token.client_id, recipient_user=token.fhir_user,
        description=f"psychotherapy notes ({action}) released under {token.basis}")
    moment = store.now()
    event = audit.disclosure_audit_event(disclosure, custodian=ctx.base,
                                         request_id=ctx.request_id, recorded=moment)
    await ctx.audit_log.insert(("decisions", permit), ("disclosures", {
        "_id": event["id"], "recorded": moment, "patient": token.patient,
        "request_id": ctx.request_id, "basis": token.basis, "recipient": token.client_id,
        "recipient_user": token.fhir_user, "entities": refs, "event": event}))
    return {**NO_STORE, audit.DISCLOSURE_HEADER: audit.encode_disclosures([disclosure])}



def bundle(head: dict[str, Any], entries: list[bytes]) -> bytes:
    opening = orjson.dumps(head)[:-1]
    if not entries:
        return opening + b"}"
    return opening + b',"entry":[' + b",".join(entries) + b"]}"



def resource_headers(doc: dict[str, Any]) -> dict[str, str]:
    return {"ETag": f'W/"{doc["vid"]}"',
            "Last-Modified": format_datetime(utc(doc["ts"]), usegmt=True)}

