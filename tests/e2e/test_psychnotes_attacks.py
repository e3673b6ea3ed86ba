"""Issue 5's attack suite: every way to get a psychotherapy note without a valid consent token is
refused with an OperationOutcome, audited with its reason, and not one note byte leaves.

Tokens signed with psychnotes' real key (read from the development key file, as an insider with
the key could) are used only to isolate one check at a time (expiry, typ, audience); an attacker
without the key is covered by the tampering, alg-none and gateway-key cases.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey

from tests.actors import mint_token
from tests.conftest import CARE_TEAM_CACHE_S, RunningStack
from tests.e2e.test_psychnotes import (
    READER_SCOPE,
    assert_audited,
    assert_no_secret,
    assert_refused,
    attest,
    authorization,
    care_team,
    compliance_token,
    headers,
    marker,
    mint_consent_token,
    mint_response,
    patient_token,
    psy_note,
    record_consent,
    user_token,
    write_note,
)
from tests.e2e.test_psychnotes_gate_cache import refused_within


class World:
    """Patients A and B, therapist T's notes, and A's authorization naming Dr Bello for a1 only."""

    def __init__(self, live: RunningStack) -> None:
        self.live = live
        self.a, self.b = f"atk-a-{uuid.uuid4().hex[:6]}", f"atk-b-{uuid.uuid4().hex[:6]}"
        self.therapist = user_token(live, "Practitioner/th-attacks")
        self.texts = {name: marker(f"attack-{name}") for name in ("a1", "a2", "b1")}
        self.a1 = write_note(live, self.therapist, self.a, self.texts["a1"])
        self.a2 = write_note(live, self.therapist, self.a, self.texts["a2"])
        self.b1 = write_note(live, self.therapist, self.b, self.texts["b1"])
        self.consent = record_consent(live, patient_token(live, self.a), authorization(
            self.a, recipient={"reference": "Practitioner/dr-bello"}, notes=[self.a1]))
        self.bello = user_token(live, "Practitioner/dr-bello", client_id="referral-ehr",
                                scope=READER_SCOPE)
        self.granted = mint_consent_token(live, self.bello, self.consent, purpose="TREAT")

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(self.texts.values())

    def url(self, path: str) -> str:
        return f"{self.live.psychnotes}{path}"

    def get(self, path: str, access: str | None = None, consent: str | None = None,
            **extra: str) -> httpx.Response:
        return httpx.get(self.url(path), headers=headers(access or self.bello, consent, **extra))


@pytest.fixture(scope="module")
def world(live: RunningStack) -> World:
    return World(live)


def signing_key(live: RunningStack) -> ECKey:
    pem = (live.config.data_dir / "keys" / "psychnotes-consent-signing.pem").read_bytes()
    key = ECKey.import_key(pem)
    return ECKey.import_key(key.as_dict(private=True), parameters={"kid": key.thumbprint()})


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def forge(live: RunningStack, claims: dict[str, Any], **header: Any) -> str:
    key = signing_key(live)
    head = {"alg": "ES256", "typ": "consent+jwt", "kid": key.kid, **header}
    return jwt.encode(head, claims, key, algorithms=["ES256"])


READS = ("/DocumentReference/{a1}", "/DocumentReference/{a1}/_history",
         "/DocumentReference/{a1}/_history/1", "/DocumentReference?patient={a}")


def each_read(world: World) -> list[str]:
    return [path.format(a1=world.a1, a=world.a) for path in READS]


# -- no token, bad tokens -----------------------------------------------------------------------

def test_every_read_without_a_consent_token_is_refused(world: World) -> None:
    for path in each_read(world):
        response = world.get(path)
        assert_refused(response, 403, *world.secrets)
        assert_audited(world.live, response, permit=False, reason="no consent token")
    search = httpx.post(world.url("/DocumentReference/_search"), content=f"patient={world.a}",
                        headers={**headers(world.bello),
                                 "Content-Type": "application/x-www-form-urlencoded"})
    assert_refused(search, 403, *world.secrets)


@pytest.mark.parametrize("garbage", ["garbage", "a.b.c", "Bearer x.y.z", "e30.e30.", "x" * 9000])
def test_malformed_consent_tokens_are_401(world: World, garbage: str) -> None:
    response = world.get(f"/DocumentReference/{world.a1}", consent=garbage)
    body = assert_refused(response, 401, *world.secrets)
    assert "consent token" in body["issue"][0]["diagnostics"].lower()
    assert response.headers["www-authenticate"].startswith("Consent-Token")
    assert_audited(world.live, response, permit=False)


def test_tampered_claims_are_refused(world: World) -> None:
    header, _payload, signature = world.granted.split(".")
    claims = claims_of(world.granted)
    for change in ({"notes": {"ids": [world.a1, world.a2]}}, {"patient": f"Patient/{world.b}"},
                   {"grantee": {"client_id": "evil", "fhirUser": "Practitioner/evil"}},
                   {"exp": claims["exp"] + 86400}, {"basis": "exception:coroner"}):
        forged = f"{header}.{b64({**claims, **change})}.{signature}"
        response = world.get(f"/DocumentReference/{world.a2}", consent=forged)
        assert_refused(response, 401, *world.secrets)
        assert_audited(world.live, response, permit=False, reason="signature")


def test_alg_none_and_symmetric_algorithms_are_refused(world: World) -> None:
    claims = {**claims_of(world.granted), "notes": {"ids": [world.a2]}}
    none = f"{b64({'alg': 'none', 'typ': 'consent+jwt'})}.{b64(claims)}."
    assert_refused(world.get(f"/DocumentReference/{world.a2}", consent=none), 401, *world.secrets)
    # HS256 keyed with the public key's bytes: the classic algorithm-confusion forgery.
    public = signing_key(world.live).as_dict(private=False)
    secret = OctKey.import_key(json.dumps(public).encode())
    confused = jwt.encode({"alg": "HS256", "typ": "consent+jwt"}, claims, secret, algorithms=["HS256"])
    assert_refused(world.get(f"/DocumentReference/{world.a2}", consent=confused), 401, *world.secrets)


def test_a_gateway_signed_token_is_not_a_consent_token(world: World) -> None:
    live = world.live
    claims = claims_of(world.granted)
    lookalike = mint_token(live, audience=live.psychnotes, **{k: v for k, v in claims.items()
                                                              if k not in ("aud", "iss")})
    assert_refused(world.get(f"/DocumentReference/{world.a1}", consent=lookalike), 401, *world.secrets)
    own_access = world.get(f"/DocumentReference/{world.a1}", consent=world.bello)
    assert_refused(own_access, 401, *world.secrets)


def test_a_consent_token_is_not_an_access_token(world: World) -> None:
    for base in (world.live.psychnotes, f"{world.live.direct_url('psychnotes')}/psychnotes/fhir"):
        response = httpx.get(f"{base}/DocumentReference/{world.a1}",
                             headers={"Authorization": f"Bearer {world.granted}",
                                      "Consent-Token": world.granted})
        assert_refused(response, 401, *world.secrets)


def test_each_claim_check_on_its_own(world: World) -> None:
    """Signed with the real key, so only the one thing wrong can be what refuses it."""
    live = world.live
    good = claims_of(world.granted)
    now = int(time.time())
    cases = [
        ({**good, "exp": now - 60, "iat": now - 700, "nbf": now - 700}, {}, "expired"),
        ({**good, "aud": live.fhir}, {}, "not for this server"),
        ({**good, "iss": live.gateway_url}, {}, "not for this server"),
        (good, {"typ": "JWT"}, "not a consent token"),
        (good, {"kid": "another-key"}, "unknown key"),
        ({k: v for k, v in good.items() if k != "grantee"}, {}, "lacks required claims"),
    ]
    for claims, header, reason in cases:
        response = world.get(f"/DocumentReference/{world.a1}", consent=forge(live, claims, **header))
        assert_refused(response, 401, *world.secrets)
        assert_audited(live, response, permit=False, reason=reason)
    still_fine = world.get(f"/DocumentReference/{world.a1}", consent=forge(live, good))
    assert still_fine.status_code == 200


# -- tokens used out of bounds ------------------------------------------------------------------

def test_token_for_patient_a_is_refused_on_patient_b(world: World) -> None:
    read = world.get(f"/DocumentReference/{world.b1}", consent=world.granted)
    assert_refused(read, 403, *world.secrets)
    assert_audited(world.live, read, permit=False, reason="not inside")
    assert_refused(world.get(f"/DocumentReference?patient={world.b}", consent=world.granted), 403,
                   *world.secrets)
    by_id = world.get(f"/DocumentReference?_id={world.b1},{world.a2}", consent=world.granted)
    assert by_id.status_code == 200
    assert by_id.json()["total"] == 0 and "entry" not in by_id.json()
    assert_no_secret(by_id, *world.secrets)
    # Even an A-token whose claims name B's note (re-signed by an insider) stays on patient A.
    forged = forge(world.live, {**claims_of(world.granted), "notes": {"ids": [world.b1]}})
    assert_refused(world.get(f"/DocumentReference/{world.b1}", consent=forged), 403, *world.secrets)


def test_notes_outside_the_token_are_refused_in_every_interaction(world: World) -> None:
    for path in (f"/DocumentReference/{world.a2}", f"/DocumentReference/{world.a2}/_history",
                 f"/DocumentReference/{world.a2}/_history/1", "/DocumentReference/does-not-exist",
                 "/DocumentReference/_history", "/Patient/whatever"):
        response = world.get(path, consent=world.granted)
        assert response.status_code in (403, 404), (path, response.text)
        assert_no_secret(response, *world.secrets)
    missing, other = (world.get(f"/DocumentReference/{p}", consent=world.granted)
                      for p in ("no-such-note", world.a2))
    assert missing.status_code == other.status_code == 403
    assert missing.json() == other.json()  # a refusal never tells existing from missing


def test_search_never_reveals_what_lies_outside_the_token(world: World) -> None:
    before = world.get(f"/DocumentReference?patient={world.a}", consent=world.granted)
    assert before.status_code == 200
    assert [e["resource"]["id"] for e in before.json()["entry"]] == [world.a1]
    assert before.json()["total"] == 1
    extra = marker("attack-extra")
    write_note(world.live, world.therapist, world.a, extra)
    after = world.get(f"/DocumentReference?patient={world.a}", consent=world.granted)
    assert after.content == before.content
    assert_no_secret(after, extra, world.texts["a2"], world.texts["b1"])
    unsupported = world.get(f"/DocumentReference?patient={world.a}&_include=DocumentReference:subject",
                            consent=world.granted)
    assert_refused(unsupported, 400, *world.secrets)


def test_another_callers_token_is_refused(world: World, live: RunningStack) -> None:
    impostors = [
        user_token(live, "Practitioner/dr-crane", client_id="referral-ehr", scope=READER_SCOPE),
        user_token(live, "Practitioner/dr-bello", client_id="other-app", scope=READER_SCOPE),
        mint_token(live, audience=live.psychnotes, sub="referral-ehr", client_id="referral-ehr",
                   scope="system/DocumentReference.rs"),
    ]
    for access in impostors:
        response = world.get(f"/DocumentReference/{world.a1}", access=access, consent=world.granted)
        assert_refused(response, 403, *world.secrets)
        assert_audited(live, response, permit=False, reason="another caller")


def test_minting_needs_a_named_recipient_and_an_authorized_purpose(world: World, live: RunningStack) -> None:
    crane = user_token(live, "Practitioner/dr-crane", client_id="referral-ehr", scope=READER_SCOPE)
    cases = [
        (mint_response(live, crane, world.consent, purpose="TREAT"), "recipient"),
        (mint_response(live, world.bello, world.consent, purpose="HPAYMT"), "purpose"),
        (mint_response(live, world.bello, world.consent, purpose="TREAT",
                       note={"reference": f"DocumentReference/{world.a2}"}), "not covered"),
        (mint_response(live, world.bello, "no-such-consent", purpose="TREAT"), "recipient"),
    ]
    for response, reason in cases:
        assert_refused(response, 403, *world.secrets)
        assert_audited(live, response, permit=False, reason=reason)
    no_scope = user_token(live, "Practitioner/dr-bello", client_id="referral-ehr",
                          scope="user/Consent.r")
    assert_refused(mint_response(live, no_scope, world.consent, purpose="TREAT"), 403, *world.secrets)


def test_an_expired_authorization_releases_nothing(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-expiry")
    patient = f"atk-exp-{uuid.uuid4().hex[:6]}"
    text = marker("expiry")
    note_id = write_note(live, therapist, patient, text)
    already = authorization(patient, recipient={"reference": "Practitioner/dr-bello"}, notes=[note_id],
                            end=datetime.now(UTC) - timedelta(days=1))
    assert_refused(httpx.post(f"{live.psychnotes}/Consent", headers=headers(patient_token(live, patient)),
                              json=already), 422, text)
    consent_id = record_consent(live, patient_token(live, patient), authorization(
        patient, recipient={"reference": "Practitioner/dr-bello"}, notes=[note_id]))
    bello = user_token(live, "Practitioner/dr-bello", client_id="referral-ehr", scope=READER_SCOPE)
    token = mint_consent_token(live, bello, consent_id, purpose="TREAT")
    assert httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}",
                     headers=headers(bello, token)).status_code == 200
    # Time passes (without sleeping): the authorization's end is now behind us. Written straight
    # to the datastore, as another replica would: seen within the gate's interval (gate_cache.py).
    live.db("psychnotes").consents.update_one(
        {"_id": consent_id}, {"$set": {"end": datetime.now(UTC) - timedelta(seconds=1)}})
    response, _ = refused_within(lambda: httpx.get(f"{live.psychnotes}/DocumentReference/{note_id}",
                                                   headers=headers(bello, token)))
    assert_refused(response, 403, text)
    assert_audited(live, response, permit=False, reason="expired")
    assert_refused(mint_response(live, bello, consent_id, purpose="TREAT"), 403, text)


def test_replay_after_revocation_by_the_treating_practitioner(live: RunningStack) -> None:
    therapist = user_token(live, "Practitioner/th-revoke")
    patient = f"atk-rev-{uuid.uuid4().hex[:6]}"
    text = marker("revoke")
    note_id = write_note(live, therapist, patient, text)
    consent_id = record_consent(live, therapist, authorization(
        patient, recipient={"reference": "Practitioner/dr-bello"}, notes=[note_id]))
    bello = user_token(live, "Practitioner/dr-bello", client_id="referral-ehr", scope=READER_SCOPE)
    token = mint_consent_token(live, bello, consent_id, purpose="TREAT")
    url = f"{live.psychnotes}/DocumentReference/{note_id}"
    assert httpx.get(url, headers=headers(bello, token)).status_code == 200
    assert_refused(httpx.post(f"{live.psychnotes}/Consent/{consent_id}/$revoke", headers=headers(bello)),
                   403, text)  # a recipient cannot revoke (nor un-revoke) anything
    assert httpx.post(f"{live.psychnotes}/Consent/{consent_id}/$revoke",
                      headers=headers(therapist)).status_code == 200
    for _ in range(2):
        assert_refused(httpx.get(url, headers=headers(bello, token)), 403, text)
    edit = httpx.put(f"{live.psychnotes}/Consent/{consent_id}", headers=headers(therapist),
                     json={"resourceType": "Consent", "id": consent_id, "status": "active"})
    assert edit.status_code == 405
    assert_refused(httpx.get(url, headers=headers(bello, token)), 403, text)


# -- the 164.508(a)(2) exceptions ---------------------------------------------------------------

def test_originator_exception_is_only_for_the_author_and_their_own_notes(world: World, live: RunningStack) -> None:
    other = user_token(live, "Practitioner/th-colleague")
    colleague_text = marker("colleague")
    colleague_note = write_note(live, other, world.a, colleague_text)
    crane = user_token(live, "Practitioner/dr-crane")
    refused = mint_response(live, crane, basis="originator-treatment",
                            patient={"reference": f"Patient/{world.b}"})
    assert_refused(refused, 403, *world.secrets)
    assert_audited(live, refused, permit=False, reason="author")
    patient_user = mint_token(live, audience=live.psychnotes, sub="p", client_id="patient-app",
                              scope="patient/DocumentReference.rs", patient=world.a,
                              fhirUser=f"{live.fhir}/Patient/{world.a}")
    assert_refused(mint_response(live, patient_user, basis="originator-treatment",
                                 patient={"reference": f"Patient/{world.a}"}), 403, *world.secrets)
    own = mint_consent_token(live, world.therapist, basis="originator-treatment",
                             patient={"reference": f"Patient/{world.a}"})
    assert world.get(f"/DocumentReference/{world.a1}", access=world.therapist, consent=own).status_code == 200
    theirs = world.get(f"/DocumentReference/{colleague_note}", access=world.therapist, consent=own)
    assert_refused(theirs, 403, colleague_text, *world.secrets)
    search = world.get(f"/DocumentReference?patient={world.a}", access=world.therapist, consent=own)
    assert colleague_note not in search.text and world.a1 in search.text
    assert_no_secret(search, colleague_text)


def test_other_exceptions_need_the_compliance_role_and_a_kept_justification(world: World, live: RunningStack) -> None:
    auditor = mint_token(live, audience=live.psychnotes, sub="privacy-officer", client_id="compliance-console",
                         scope="user/DocumentReference.rs", roles=["compliance"],
                         fhirUser=f"{live.fhir}/Practitioner/privacy-officer")
    plain = mint_token(live, audience=live.psychnotes, sub="clerk", client_id="compliance-console",
                       scope="user/DocumentReference.rs", fhirUser=f"{live.fhir}/Practitioner/clerk")
    patient = {"reference": f"Patient/{world.b}"}
    why = "Subpoena 2026-CV-0142 from the county coroner, case 88-113, received 2026-11-21."
    for access, values, reason in (
        (plain, {"justification": why}, "compliance"),
        (auditor, {}, "justification"),
        (auditor, {"justification": "because"}, "justification"),
        (auditor, {"justification": why, "purpose": "TREAT"}, "purpose"),
    ):
        response = mint_response(live, access, basis="coroner", patient=patient, **values)
        assert_refused(response, 403, *world.secrets)
        assert_audited(live, response, permit=False, reason=reason)
    assert_refused(mint_response(live, auditor, basis="curiosity", patient=patient,
                                 justification=why), 422, *world.secrets)
    token = mint_consent_token(live, auditor, basis="coroner", patient=patient, justification=why)
    read = world.get(f"/DocumentReference/{world.b1}", access=auditor, consent=token)
    assert read.status_code == 200 and world.texts["b1"] in base64.b64decode(
        read.json()["content"][0]["attachment"]["data"]).decode()
    assert_refused(world.get(f"/DocumentReference/{world.a1}", access=auditor, consent=token), 403,
                   *world.secrets)
    grant = live.db("psychnotes").exception_grants.find_one({"_id": claims_of(token)["jti"]})
    assert grant["justification"] == why and grant["basis"] == "coroner"
    assert grant["client_id"] == "compliance-console" and "compliance" in grant["roles"]
    released = live.db("psychnotes").disclosures.find_one({"request_id": read.headers["x-request-id"]})
    assert released["basis"] == "exception:coroner"
    assert released["event"]["purposeOfEvent"][0]["coding"][0]["code"] == "HDECD"


# -- smuggling and path tricks ------------------------------------------------------------------

def test_header_smuggling_through_the_gateway(world: World, live: RunningStack) -> None:
    url = f"/DocumentReference/{world.a1}"
    for extra in ({"X-Consent-Token": world.granted}, {"Consent_Token": world.granted},
                  {"X-Forwarded-Consent-Token": world.granted},
                  {"X-Mindchart-Disclosure": "e30="}):
        response = world.get(url, **extra)
        assert_refused(response, 403, *world.secrets)
    in_query = httpx.get(world.url(url), params={"consent_token": world.granted,
                                                 "Consent-Token": world.granted},
                         headers=headers(world.bello))
    assert_refused(in_query, 403, *world.secrets)
    # Duplicated headers: however a proxy folds them, an impostor never gets a note.
    crane = user_token(live, "Practitioner/dr-crane", client_id="referral-ehr", scope=READER_SCOPE)
    for pair in ([world.granted, "garbage"], ["garbage", world.granted], [world.granted, world.granted]):
        raw = httpx.Request("GET", world.url(url), headers=[
            ("Authorization", f"Bearer {crane}"), *[("Consent-Token", v) for v in pair]])
        with httpx.Client() as client:
            response = client.send(raw)
        assert response.status_code in (401, 403), response.text
        assert_no_secret(response, *world.secrets)
    folded = world.get(url, consent=f"{world.granted}, {world.granted}")
    assert_refused(folded, 401, *world.secrets)


def test_duplicated_consent_token_headers_are_refused_by_psychnotes(world: World, live: RunningStack) -> None:
    direct = f"{live.direct_url('psychnotes')}/psychnotes/fhir/DocumentReference/{world.a1}"
    for pair in ([world.granted, "garbage"], ["garbage", world.granted], [world.granted, world.granted]):
        request = httpx.Request("GET", direct, headers=[
            ("Authorization", f"Bearer {world.bello}"), *[("Consent-Token", v) for v in pair]])
        with httpx.Client() as client:
            response = client.send(request)
        assert_refused(response, 401, *world.secrets)
    alone = httpx.get(direct, headers={"Authorization": f"Bearer {world.bello}",
                                       "X-Consent-Token": world.granted})
    assert_refused(alone, 403, *world.secrets)


def test_path_tricks(world: World, live: RunningStack) -> None:
    host, port = live.gateway_url.removeprefix("http://").split(":")
    records = mint_token(live)  # a records-audience token
    tricks = [
        (f"/psychnotes/fhir/../../fhir/DocumentReference/{world.a1}", records),
        (f"/psychnotes/fhir/../fhir/DocumentReference/{world.a1}", world.bello),
        (f"/fhir/../psychnotes/fhir/DocumentReference/{world.a1}", records),
        (f"/fhir/%2e%2e/psychnotes/fhir/DocumentReference/{world.a1}", records),
        (f"/psychnotes/fhir/DocumentReference/..%2F{world.a1}", world.bello),
        (f"/psychnotes/fhir//DocumentReference/{world.a1}", world.bello),
        (f"/psychnotes/fhir/./DocumentReference/{world.a1}", world.bello),
        (f"/psychnotes/fhir/DocumentReference/{world.a1}%00", world.bello),
        (f"/psychnotes/fhir/DocumentReference\\{world.a1}", world.bello),
    ]
    for raw, access in tricks:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", raw, headers={"Authorization": f"Bearer {access}",
                                          "Consent-Token": world.granted})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status in (400, 401, 403, 404), raw
        assert json.loads(body)["resourceType"] == "OperationOutcome", raw
        for secret in world.secrets:
            assert secret.encode() not in body and base64.b64encode(secret.encode()) not in body, raw
    # Straight at psychnotes, an un-normalised path never reaches a note either.
    direct_host, direct_port = live.direct_url("psychnotes").removeprefix("http://").split(":")
    for raw in (f"/psychnotes/fhir/DocumentReference/{world.a2}/../{world.a1}",
                f"/psychnotes/fhir/DocumentReference/{world.a1}/../{world.a2}"):
        conn = http.client.HTTPConnection(direct_host, int(direct_port), timeout=10)
        conn.request("GET", raw, headers={"Authorization": f"Bearer {world.bello}",
                                          "Consent-Token": world.granted})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status in (403, 404), raw
        assert all(s.encode() not in body for s in world.secrets)


def test_no_answer_redirects_to_a_backend_address(world: World, live: RunningStack) -> None:
    """A trailing-slash mismatch used to answer 307 with a Location on the backend's own host and
    port (the gateway does not forward Host), pointing clients, and their tokens, past the gateway.
    Every service now answers such paths like any unknown path: a 4xx OperationOutcome."""
    backends = [live.direct_url(name) for name in ("records", "psychnotes")]
    paths = [("POST", "/psychnotes/fhir", world.bello), ("GET", "/psychnotes/fhir/", world.bello),
             ("GET", f"/psychnotes/fhir/DocumentReference/{world.a1}/", world.bello),
             ("GET", "/fhir/Patient/", mint_token(live))]
    for method, path, access in paths:
        answer = httpx.request(method, f"{live.gateway_url}{path}", follow_redirects=False,
                               headers={"Authorization": f"Bearer {access}", "Consent-Token": world.granted})
        assert not answer.is_redirect, (path, answer.status_code, answer.headers.get("location"))
        assert all(backend not in answer.text for backend in backends), path
        assert 400 <= answer.status_code < 500 and answer.json()["resourceType"] == "OperationOutcome", path


# -- isolation from records ---------------------------------------------------------------------

def test_records_and_psychnotes_refuse_each_others_tokens(world: World, live: RunningStack) -> None:
    records_token = mint_token(live, scope="system/*.rs")
    psych_token = mint_token(live, audience=live.psychnotes, scope="system/*.rs")
    direct_psy = f"{live.direct_url('psychnotes')}/psychnotes/fhir"
    direct_rec = f"{live.direct_url('records')}/fhir"
    for url in (f"{live.psychnotes}/DocumentReference/{world.a1}", f"{direct_psy}/DocumentReference/{world.a1}",
                f"{live.psychnotes}/DocumentReference"):
        assert_refused(httpx.get(url, headers=headers(records_token, world.granted)), 401, *world.secrets)
    for url in (f"{live.fhir}/DocumentReference", f"{direct_rec}/DocumentReference",
                f"{live.fhir}/DocumentReference/{world.a1}"):
        assert_refused(httpx.get(url, headers=headers(psych_token)), 401, *world.secrets)
    # A refused access token straight at psychnotes is in psychnotes' own trail as well.
    direct = httpx.get(f"{direct_psy}/DocumentReference/{world.a1}",
                       headers={**headers(records_token, world.granted), "X-Request-ID": "direct-refusal-1"})
    assert_refused(direct, 401, *world.secrets)
    [refusal] = list(live.db("psychnotes").decisions.find({"request_id": "direct-refusal-1"}))
    assert refusal["permit"] is False and refusal["action"] == "authenticate"
    assert refusal["event"]["outcome"] == "4" and "access token" in refusal["reason"]


def test_records_never_returns_or_reveals_a_psychotherapy_note(world: World, live: RunningStack) -> None:
    records_token = mint_token(live, scope="system/*.rs")
    missing = httpx.get(f"{live.fhir}/DocumentReference/{world.a1}", headers=headers(records_token))
    assert missing.status_code == 404
    unknown = httpx.get(f"{live.fhir}/DocumentReference/{uuid.uuid4()}", headers=headers(records_token))
    assert unknown.status_code == 404
    assert missing.json()["issue"][0]["code"] == unknown.json()["issue"][0]["code"] == "not-found"
    for params in ({"patient": world.a}, {"_id": world.a1}):
        search = httpx.get(f"{live.fhir}/DocumentReference", params=params, headers=headers(records_token))
        assert search.status_code == 200 and "entry" not in search.json()
        assert_no_secret(search, *world.secrets)


# -- issue 12: who treats whom, who authorizes, who receives --------------------------------------

def consent_status(live: RunningStack, access: str, consent_id: str) -> int:
    return httpx.get(f"{live.psychnotes}/Consent/{consent_id}", headers=headers(access)).status_code


def test_a_practitioner_off_the_care_team_can_neither_write_nor_authorize_themselves(
        world: World, live: RunningStack) -> None:
    """Critical 1: Dr Mallory never treated patient B. Writing one note about B used to make them
    "treating"; then they recorded a Consent for B naming themselves, with any bytes as the
    signed form, minted a consent token and read the therapist's notes about B. Treatment comes
    from records' CareTeam; a Consent recorded by anyone but the patient needs a second person's
    attestation; and nobody receives under an authorization they recorded."""
    mallory = user_token(live, "Practitioner/dr-mallory", scope=f"{READER_SCOPE} user/DocumentReference.c "
                         "user/Consent.cru")
    text = marker("mallory")
    wrote = httpx.post(f"{live.psychnotes}/DocumentReference", headers=headers(mallory),
                       json=psy_note(world.b, text))
    assert_refused(wrote, 403, text, *world.secrets)
    assert_audited(live, wrote, permit=False, reason="care team")
    self_grant = authorization(world.b, recipient={"reference": "Practitioner/dr-mallory"},
                               data_period={"start": "2020-01-01", "end": "2030-01-01"})
    assert_refused(httpx.post(f"{live.psychnotes}/Consent", headers=headers(mallory),
                              json=self_grant), 403, *world.secrets)
    # Even on the care team (a colleague), a self-authorization never reads anything.
    care_team(live, world.b, "Practitioner/dr-mallory")
    recorded = httpx.post(f"{live.psychnotes}/Consent", headers=headers(mallory), json=self_grant)
    assert recorded.status_code == 201 and recorded.json()["status"] == "proposed", recorded.text
    consent_id = recorded.json()["id"]
    assert_refused(mint_response(live, mallory, consent_id, purpose="TREAT"), 403, *world.secrets)
    assert_refused(attest(live, consent_id, mallory), 403)  # no compliance role
    assert attest(live, consent_id).status_code == 200  # a compliance officer attests it...
    refused = mint_response(live, mallory, consent_id, purpose="TREAT")  # ...still not for its recorder
    assert_refused(refused, 403, *world.secrets)
    assert_audited(live, refused, permit=False, reason="recipient")


def test_an_authorization_recorded_for_the_patient_needs_a_second_persons_attestation(
        world: World, live: RunningStack) -> None:
    """The two-person check: recorded by a care-team member it stays `proposed` and releases
    nothing; the recorder cannot attest it even with the compliance role, nor can a recipient
    it names; another compliance officer's `$attest` puts it in force."""
    recorder = f"Practitioner/th-records-{uuid.uuid4().hex[:4]}"
    care_team(live, world.a, recorder)
    clerk = user_token(live, recorder, scope="user/Consent.cru", roles=["compliance"])
    consent_id = record_consent(live, clerk, authorization(
        world.a, recipient={"reference": "Practitioner/dr-quinn"}, notes=[world.a2]), attested=False)
    quinn = user_token(live, "Practitioner/dr-quinn", client_id="referral-ehr",
                       scope=f"{READER_SCOPE} user/Consent.rus", roles=["compliance"])
    assert_refused(mint_response(live, quinn, consent_id, purpose="TREAT"), 403, *world.secrets)
    own = attest(live, consent_id, clerk)
    assert_refused(own, 403)
    assert_audited(live, own, permit=False, reason="recorded")
    assert_refused(attest(live, consent_id, quinn), 403)  # the recipient
    done = attest(live, consent_id, compliance_token(live, "Practitioner/second-officer"))
    assert done.status_code == 200 and done.json()["status"] == "active", done.text
    assert_audited(live, done, permit=True)
    assert_refused(attest(live, consent_id), 403)  # only a proposed one is attested
    token = mint_consent_token(live, quinn, consent_id, purpose="TREAT")
    read = world.get(f"/DocumentReference/{world.a2}", access=quinn, consent=token)
    assert read.status_code == 200 and world.texts["a2"] in read.text


def test_naming_an_app_does_not_open_notes_or_the_consent_to_its_users(world: World,
                                                                          live: RunningStack) -> None:
    """Critical 2: patient A's Consent named client `portal`; patient B signed in to `portal`
    and read A's notes and A's Consent. A client-id recipient is matched only by that client's
    own backend tokens."""
    consent_id = record_consent(live, patient_token(live, world.a), authorization(
        world.a, recipient={"identifier": {"system": "urn:ietf:params:oauth:client-id", "value": "portal"}},
        notes=[world.a1]))
    patient_b = mint_token(live, audience=live.psychnotes, sub=f"patient-{world.b}", client_id="portal",
                           scope="patient/DocumentReference.rs patient/Consent.rs", patient=world.b,
                           fhirUser=f"{live.fhir}/Patient/{world.b}")
    clinician = user_token(live, "Practitioner/portal-user", client_id="portal",
                           scope=f"{READER_SCOPE} user/Consent.rs")
    for user in (patient_b, clinician):
        assert_refused(mint_response(live, user, consent_id, purpose="TREAT"), 403, *world.secrets)
        assert consent_status(live, user, consent_id) == 404
    backend = mint_token(live, audience=live.psychnotes, sub="portal", client_id="portal",
                         scope="system/DocumentReference.rs system/Consent.rs")
    assert consent_status(live, backend, consent_id) == 200
    token = mint_consent_token(live, backend, consent_id, purpose="TREAT")
    read = world.get(f"/DocumentReference/{world.a1}", access=backend, consent=token)
    assert read.status_code == 200 and world.texts["a1"] in read.text
    for user in (patient_b, clinician):  # the app's token is no use to its users either
        assert_refused(world.get(f"/DocumentReference/{world.a1}", access=user, consent=token),
                       403, *world.secrets)


def test_patient_context_tokens_never_read_psychotherapy_notes(world: World, live: RunningStack) -> None:
    """45 CFR 164.524(a)(1)(i): psychotherapy notes are outside the right of access, so no
    patient-context token reads them; and a Consent cannot name its own patient as recipient."""
    own = mint_token(live, audience=live.psychnotes, sub=f"patient-{world.a}", client_id="patient-app",
                     scope="patient/DocumentReference.rs patient/Consent.crus", patient=world.a,
                     fhirUser=f"{live.fhir}/Patient/{world.a}")
    for path in each_read(world):
        assert_refused(world.get(path, access=own, consent=world.granted), 403, *world.secrets)
    naming_self = authorization(world.a, recipient={"reference": f"Patient/{world.a}"}, notes=[world.a1])
    refused = httpx.post(f"{live.psychnotes}/Consent", headers=headers(own), json=naming_self)
    body = assert_refused(refused, 422, *world.secrets)
    assert "164.524(a)(1)(i)" in body["issue"][0]["diagnostics"]
    assert_refused(mint_response(live, own, basis="originator-treatment",
                                 patient={"reference": f"Patient/{world.a}"}), 403, *world.secrets)


def test_a_consent_is_shown_only_to_its_parties(world: World, live: RunningStack) -> None:
    """Its patient, recorder, attester, named recipients and the compliance role; not the
    treating therapist who did not record it, not another clinician."""
    assert consent_status(live, patient_token(live, world.a), world.consent) == 200  # patient/recorder
    assert consent_status(live, user_token(live, "Practitioner/dr-bello", scope="user/Consent.rs"),
                          world.consent) == 200  # recipient
    assert consent_status(live, compliance_token(live), world.consent) == 200
    for outsider in (world.therapist, user_token(live, "Practitioner/dr-crane"),
                     patient_token(live, world.b)):
        assert consent_status(live, outsider, world.consent) == 404
    listed = httpx.get(f"{live.psychnotes}/Consent", params={"patient": world.a},
                       headers=headers(world.therapist))
    assert_refused(listed, 403, *world.secrets)


def test_a_practitioner_who_left_the_care_team_cannot_sign_their_draft(live: RunningStack) -> None:
    """Signing is a write: `$sign` checks care-team membership as create, update and delete do.
    Dr Ross drafted a note while on patient C's care team, then left it (the CareTeam became
    inactive); once psychnotes' cached membership has lapsed their `$sign` is refused with 403,
    audited, and the draft stays an unsigned version 1."""
    patient = f"atk-c-{uuid.uuid4().hex[:6]}"
    ross = user_token(live, "Practitioner/dr-ross")
    draft_text = marker("left-team-draft")
    team_id = care_team(live, patient, "Practitioner/dr-ross")
    drafted = httpx.post(f"{live.psychnotes}/DocumentReference", headers=headers(ross),
                         json=psy_note(patient, draft_text, docStatus="preliminary"))
    assert drafted.status_code == 201, drafted.text
    note_id = drafted.headers["location"].split("/")[-3]
    records_admin = mint_token(live, scope="system/CareTeam.cruds")
    left = httpx.put(f"{live.fhir}/CareTeam/{team_id}", headers=headers(records_admin), json={
        "resourceType": "CareTeam", "id": team_id, "status": "inactive",
        "subject": {"reference": f"Patient/{patient}"},
        "participant": [{"member": {"reference": "Practitioner/dr-ross"}}]})
    assert left.status_code == 200, left.text
    # A refused create writes nothing: poll with it until the remembered membership has lapsed
    # (CARE_TEAM_CACHE_S in this stack), bounded by that plus a margin for a busy machine.
    deadline = time.monotonic() + CARE_TEAM_CACHE_S + 30
    while True:
        probe = httpx.post(f"{live.psychnotes}/DocumentReference", headers=headers(ross),
                           json=psy_note(patient, marker("probe")))
        if probe.status_code == 403:
            break
        assert probe.status_code == 201 and time.monotonic() < deadline, probe.text
        httpx.delete(f"{live.psychnotes}/DocumentReference/{probe.headers['location'].split('/')[-3]}",
                     headers=headers(ross))
        time.sleep(0.5)
    signed = httpx.post(f"{live.psychnotes}/DocumentReference/{note_id}/$sign", headers=headers(ross))
    assert_refused(signed, 403, draft_text)
    assert_audited(live, signed, permit=False, reason="care team")
    stored = live.db("psychnotes").notes.find_one({"_id": note_id})
    assert stored["vid"] == 1 and stored["doc_status"] == "preliminary"
