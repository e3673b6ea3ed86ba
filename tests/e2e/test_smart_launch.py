"""SMART App Launch 2.2 at the gateway, end to end over HTTP: discovery, standalone and EHR launch,
tokens and their context, refresh, introspection, revocation, key rotation, and every refusal the
issue lists (PKCE mismatch, plain PKCE, reused code, unregistered redirect URI, scope not allowed,
aud not ours, revoked refresh token, replayed client assertion)."""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway.keys import SIGNING_RELOAD_SECONDS
from tests.actors import (
    APP_REDIRECT,
    BackendClient,
    create_user,
    exchange_code,
    pkce_pair,
    register_app,
    register_backend,
    run_cli,
    sensitive,
    smart_authorize,
    smart_login,
)
from tests.conftest import RunningStack

PASSWORD = sensitive("correct horse battery staple 7")
APP_SCOPE = ("launch launch/patient launch/encounter openid fhirUser offline_access online_access "
             "patient/*.rs user/*.rs user/AuditEvent.rs")


class World:
    """Who takes part: one practice, two patients, a clinician, a patient user, and apps."""

    def __init__(self, live: RunningStack, writer_http: httpx.Client) -> None:
        self.live = live
        suffix = uuid.uuid4().hex[:6]
        self.patient_id = self._create(writer_http, {
            "resourceType": "Patient", "name": [{"family": "Okafor", "given": ["Ada"]}],
            "birthDate": "1990-05-01"})
        self.other_patient_id = self._create(writer_http, {
            "resourceType": "Patient", "name": [{"family": "Lindqvist", "given": ["Bo"]}]})
        self.practitioner_id = self._create(writer_http, {
            "resourceType": "Practitioner", "name": [{"family": "Reyes", "given": ["Mara"]}]})
        self.encounter_id = self._create(writer_http, {
            "resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{self.patient_id}"}})
        self.clinician = f"dr-{suffix}"
        self.patient_user = f"pt-{suffix}"
        self.admin = f"admin-{suffix}"
        create_user(live.cli_env, self.clinician, PASSWORD, "practitioner", f"Practitioner/{self.practitioner_id}")
        create_user(live.cli_env, self.patient_user, PASSWORD, "patient", f"Patient/{self.patient_id}")
        create_user(live.cli_env, self.admin, PASSWORD, "admin")
        self.app = f"app-{suffix}"
        register_app(live.cli_env, self.app, APP_SCOPE)
        self.secret_app = f"sapp-{suffix}"
        self.secret = sensitive(f"s3cret-{uuid.uuid4().hex}")
        register_app(live.cli_env, self.secret_app, APP_SCOPE, secret=self.secret)

    @staticmethod
    def _create(http: httpx.Client, resource: dict[str, Any]) -> str:
        response = http.post(f"/{resource['resourceType']}", json=resource)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def login(self, username: str, scope: str, **kw: Any) -> dict[str, Any]:
        return smart_login(self.live.gateway_url, client_id=kw.pop("client_id", self.app), username=username,
                           password=PASSWORD, scope=scope, aud=kw.pop("aud", self.live.fhir), **kw)

    def authorize(self, username: str, scope: str, **kw: Any) -> Any:
        return smart_authorize(self.live.gateway_url, client_id=kw.pop("client_id", self.app),
                               username=username, password=PASSWORD, scope=scope,
                               aud=kw.pop("aud", self.live.fhir), **kw)


@pytest.fixture(scope="module")
def world(live: RunningStack, writer_http: httpx.Client) -> World:
    return World(live, writer_http)


def claims_of(live: RunningStack, token: str) -> dict[str, Any]:
    keys = KeySet.import_key_set(httpx.get(f"{live.gateway_url}/oauth/jwks").json())
    return dict(jwt.decode(token, keys).claims)


def authorize_url(live: RunningStack, client_id: str, **params: str) -> dict[str, str]:
    _, challenge = pkce_pair()
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": APP_REDIRECT,
             "scope": "patient/*.rs launch/patient", "state": "st-123", "aud": live.fhir,
             "code_challenge": challenge, "code_challenge_method": "S256"}
    query.update(params)
    return {k: v for k, v in query.items() if v != ""}


def redirect_params(response: httpx.Response) -> dict[str, str]:
    assert response.status_code in (302, 303), response.text
    location = response.headers["location"]
    assert location.startswith(APP_REDIRECT + "?")
    return dict(parse_qsl(urlsplit(location).query))


def fhir_get(url: str, token: str) -> httpx.Response:
    return httpx.get(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"})


# -- discovery ---------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["/fhir", "/psychnotes/fhir"])
def test_smart_configuration_for_both_bases(live: RunningStack, base: str) -> None:
    response = httpx.get(f"{live.gateway_url}{base}/.well-known/smart-configuration",
                         headers={"Accept": "text/html", "Origin": "https://app.example"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["access-control-allow-origin"] == "*"
    config = response.json()
    gw = live.gateway_url
    assert config["issuer"] == gw and config["jwks_uri"] == f"{gw}/oauth/jwks"
    assert config["authorization_endpoint"] == f"{gw}/oauth/authorize"
    assert config["token_endpoint"] == f"{gw}/oauth/token"
    assert config["introspection_endpoint"] == f"{gw}/oauth/introspect"
    assert config["revocation_endpoint"] == f"{gw}/oauth/revoke"
    assert {"authorization_code", "client_credentials"} <= set(config["grant_types_supported"])
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert "code" in config["response_types_supported"]
    assert {"RS384", "ES384"} & set(config["token_endpoint_auth_signing_alg_values_supported"])
    assert set(config["capabilities"]) >= {
        "launch-standalone", "launch-ehr", "client-public", "client-confidential-symmetric",
        "client-confidential-asymmetric", "context-standalone-patient", "context-ehr-patient",
        "permission-patient", "permission-user", "permission-offline", "permission-v1",
        "permission-v2", "sso-openid-connect", "context-style"}
    assert {"openid", "fhirUser", "launch/patient", "offline_access"} <= set(config["scopes_supported"])


def test_openid_configuration_and_cors(live: RunningStack) -> None:
    config = httpx.get(f"{live.gateway_url}/.well-known/openid-configuration").json()
    for field in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri",
                  "response_types_supported", "subject_types_supported"):
        assert config[field]
    assert "RS256" in config["id_token_signing_alg_values_supported"]
    assert config["issuer"] == live.gateway_url
    preflight = httpx.options(f"{live.gateway_url}/oauth/token", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    metadata = httpx.get(f"{live.fhir}/metadata", headers={"Origin": "https://app.example"})
    assert metadata.status_code == 200 and metadata.headers["access-control-allow-origin"] == "*"


# -- standalone launch ------------------------------------------------------------------------

def test_patient_standalone_launch_gets_own_record_in_context(live: RunningStack, world: World) -> None:
    body = world.login(world.patient_user, "launch/patient openid fhirUser offline_access patient/*.rs")
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 3600
    assert body["patient"] == world.patient_id
    assert body["need_patient_banner"] is True
    assert set(body["scope"].split()) == {"launch/patient", "openid", "fhirUser", "offline_access",
                                          "patient/*.rs"}
    assert body["refresh_token"]
    access = claims_of(live, body["access_token"])
    assert access["aud"] == live.fhir and access["iss"] == live.gateway_url
    assert access["fhirUser"] == f"{live.fhir}/Patient/{world.patient_id}"
    assert access["patient"] == world.patient_id and access["roles"] == ["patient"]
    assert access["client_id"] == world.app and access["jti"]
    id_token = claims_of(live, body["id_token"])
    assert id_token["aud"] == world.app and id_token["iss"] == live.gateway_url
    assert id_token["sub"] == world.patient_user and id_token["exp"] > time.time()
    assert id_token["fhirUser"] == f"{live.fhir}/Patient/{world.patient_id}"
    # fhirUser resolves, and the token reads this patient only.
    own = fhir_get(id_token["fhirUser"], body["access_token"])
    assert own.status_code == 200 and own.json()["id"] == world.patient_id
    assert fhir_get(f"{live.fhir}/Patient/{world.other_patient_id}", body["access_token"]).status_code in (403, 404)


def test_token_response_headers_and_no_refresh_without_access_scope(live: RunningStack, world: World) -> None:
    result = world.authorize(world.patient_user, "patient/*.rs")
    response = httpx.post(f"{live.gateway_url}/oauth/token", headers={"Origin": "https://app.example"}, data={
        "grant_type": "authorization_code", "code": result.code, "redirect_uri": result.redirect_uri,
        "code_verifier": result.verifier, "client_id": world.app})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"  # browser apps may call it
    assert response.headers["cache-control"] == "no-store" and response.headers["pragma"] == "no-cache"
    body = response.json()
    assert "refresh_token" not in body and "id_token" not in body


def test_clinician_picks_a_patient(live: RunningStack, world: World) -> None:
    body = world.login(world.clinician, "launch/patient openid fhirUser patient/*.rs",
                       patient=world.other_patient_id)
    assert body["patient"] == world.other_patient_id
    claims = claims_of(live, body["access_token"])
    assert claims["fhirUser"] == f"{live.fhir}/Practitioner/{world.practitioner_id}"
    assert claims["roles"] == ["practitioner"]
    assert fhir_get(f"{live.fhir}/Patient/{world.other_patient_id}", body["access_token"]).status_code == 200
    assert fhir_get(f"{live.fhir}/Patient/{world.patient_id}", body["access_token"]).status_code in (403, 404)


def test_picker_lists_patients_and_searches_by_name(live: RunningStack, world: World,
                                                    writer_http: httpx.Client) -> None:
    # More namesakes than the picker shows at once: it must say so, not present 50 as the whole list.
    family = f"Picker{uuid.uuid4().hex[:8]}"
    for n in range(51):
        World._create(writer_http, {"resourceType": "Patient", "name": [{"family": family, "given": [f"P{n}"]}]})
    with httpx.Client(base_url=live.gateway_url, follow_redirects=False) as http:
        page = http.get("/oauth/authorize", params=authorize_url(live, world.app))
        session = page.text.split('name="session" value="')[1].split('"')[0]
        picker = http.post("/oauth/authorize/login", data={"session": session, "username": world.clinician,
                                                           "password": PASSWORD})
        assert picker.status_code == 200 and "Choose a patient" in picker.text
        # Over 50 patients are stored by now: a page of them, and a prompt to search by name.
        assert 1 <= picker.text.count('type="radio"') <= 50 and "<label" in picker.text
        assert "Not every patient is shown: find one by name." in picker.text
        session = picker.text.split('name="session" value="')[1].split('"')[0]  # renewed at sign-in
        found = http.post("/oauth/authorize/patient", data={"session": session, "name": "Lindqvist",
                                                            "search": "1"})
        assert "Bo Lindqvist" in found.text and "Ada Okafor" not in found.text, found.text
        assert "Not every" not in found.text
        many = http.post("/oauth/authorize/patient", data={"session": session, "name": family, "search": "1"})
        assert many.text.count('type="radio"') == 50 and "Not every match is shown: narrow the name." in many.text
        refused = http.post("/oauth/authorize/patient", data={"session": session, "choose": "1",
                                                              "patient": "no-such-patient"})
        assert 'role="alert"' in refused.text
        # A patient the list did not show may still be chosen: records says whether this user sees it.
        chosen = http.post("/oauth/authorize/patient", data={"session": session, "choose": "1",
                                                             "patient": world.patient_id})
        assert chosen.status_code == 200 and f"Patient/{world.patient_id}" in chosen.text, chosen.text


def test_user_may_untick_scopes_and_deny(live: RunningStack, world: World) -> None:
    result = world.authorize(world.patient_user, "patient/*.rs offline_access openid fhirUser",
                             approve=["patient/*.rs", "openid"])
    body = exchange_code(live.gateway_url, result, world.app).json()
    assert set(body["scope"].split()) == {"patient/*.rs", "openid"}
    assert "refresh_token" not in body and "fhirUser" not in claims_of(live, body["id_token"])
    denied = world.authorize(world.patient_user, "patient/*.rs", decision="deny")
    assert denied.params["error"] == "access_denied" and denied.params["state"] == denied.state


def test_confidential_symmetric_app(live: RunningStack, world: World) -> None:
    result = world.authorize(world.patient_user, "patient/*.rs", client_id=world.secret_app)
    without = exchange_code(live.gateway_url, result, world.secret_app)  # no secret: refused
    assert without.status_code == 401 and without.json()["error"] == "invalid_client"
    result = world.authorize(world.patient_user, "patient/*.rs", client_id=world.secret_app)
    ok = exchange_code(live.gateway_url, result, world.secret_app, secret=world.secret)
    assert ok.status_code == 200 and ok.json()["patient"] == world.patient_id


def test_confidential_asymmetric_app(live: RunningStack, world: World, tmp_path: Any) -> None:
    app = BackendClient(f"asym-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, app, "patient/*.rs", tmp=tmp_path)
    run = run_cli(live.cli_env, "client", "create", "--id", app.client_id, "--auth", "private_key_jwt",
                  "--jwks", str(tmp_path / f"{app.client_id}.jwks.json"), "--scope", "patient/*.rs",
                  "--redirect-uri", APP_REDIRECT)
    assert run.returncode == 0, run.stderr
    result = world.authorize(world.patient_user, "patient/*.rs", client_id=app.client_id)
    assertion = app.assertion()
    form = {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}
    ok = exchange_code(live.gateway_url, result, app.client_id, **form)
    assert ok.status_code == 200, ok.text
    # Replayed client assertion: refused even with a fresh code.
    result = world.authorize(world.patient_user, "patient/*.rs", client_id=app.client_id)
    replay = exchange_code(live.gateway_url, result, app.client_id, **form)
    assert replay.status_code in (400, 401) and replay.json()["error"] == "invalid_client"


# -- EHR launch ---------------------------------------------------------------------------------

def test_ehr_launch_carries_patient_and_encounter(live: RunningStack, world: World) -> None:
    env = {**live.cli_env, "MINDCHART_GATEWAY_PUBLIC_URL": live.gateway_url}
    minted = run_cli(env, "launch", "create", "--patient", f"Patient/{world.patient_id}",
                     "--encounter", world.encounter_id, "--client", world.app,
                     "--launch-url", "https://app.example/launch")
    assert minted.returncode == 0, minted.stderr
    import json
    launch = json.loads(minted.stdout)
    assert launch["iss"] == live.fhir and len(launch["launch"]) >= 24
    assert launch["launch_url"].startswith("https://app.example/launch?iss=")
    body = world.login(world.clinician, "launch openid fhirUser patient/*.rs user/*.rs",
                       launch=launch["launch"])
    assert body["patient"] == world.patient_id
    assert body["encounter"] == world.encounter_id
    assert body["need_patient_banner"] is False
    # ONC (g)(10) `g10_smart_style_url`: present on the EHR launch and answering JSON.
    style = httpx.get(body["smart_style_url"], headers={"Origin": "https://app.example"})
    assert style.status_code == 200 and style.headers["content-type"].startswith("application/json")
    assert style.headers["access-control-allow-origin"] == "*"
    assert style.json()["color_background"].startswith("#")
    standalone = world.login(world.clinician, "openid fhirUser user/*.rs")
    assert "smart_style_url" not in standalone
    claims = claims_of(live, body["access_token"])
    assert claims["patient"] == world.patient_id and claims["encounter"] == world.encounter_id
    # A launch id the gateway never minted is refused at the authorize endpoint.
    with httpx.Client(base_url=live.gateway_url, follow_redirects=False) as http:
        bad = http.get("/oauth/authorize", params=authorize_url(live, world.app, launch="forged", scope="launch patient/*.rs"))
    assert redirect_params(bad)["error"] == "invalid_request"


def test_ehr_launch_api_for_signed_in_clinicians(live: RunningStack, world: World) -> None:
    clinician = world.login(world.clinician, "user/*.rs")
    created = httpx.post(f"{live.gateway_url}/oauth/launch", json={"patient": world.patient_id},
                         headers={"Authorization": f"Bearer {clinician['access_token']}"})
    assert created.status_code == 201, created.text
    body = world.login(world.clinician, "launch patient/*.rs", launch=created.json()["launch"])
    assert body["patient"] == world.patient_id
    patient = world.login(world.patient_user, "patient/*.rs")
    refused = httpx.post(f"{live.gateway_url}/oauth/launch", json={"patient": world.patient_id},
                         headers={"Authorization": f"Bearer {patient['access_token']}"})
    assert refused.status_code == 403


# -- refresh, introspection, revocation ----------------------------------------------------------

def refresh(live: RunningStack, token: str, client_id: str, **extra: str) -> httpx.Response:
    return httpx.post(f"{live.gateway_url}/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": token, "client_id": client_id, **extra})


def test_refresh_rotates_narrows_and_detects_reuse(live: RunningStack, world: World) -> None:
    first = world.login(world.patient_user, "offline_access patient/*.rs openid fhirUser")
    narrowed = refresh(live, first["refresh_token"], world.app, scope="offline_access patient/*.rs")
    assert narrowed.status_code == 200, narrowed.text
    assert narrowed.headers["cache-control"] == "no-store"
    second = narrowed.json()
    assert set(second["scope"].split()) == {"offline_access", "patient/*.rs"}
    assert second["refresh_token"] != first["refresh_token"] and second["patient"] == world.patient_id
    assert second["expires_in"] > 0
    wider = refresh(live, second["refresh_token"], world.app, scope="offline_access patient/*.rs user/*.rs")
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    # Wrong client: refused, and the token stays usable by its own client.
    other = refresh(live, second["refresh_token"], world.secret_app, client_secret=world.secret)
    assert other.status_code == 400 and other.json()["error"] == "invalid_grant"
    third = refresh(live, second["refresh_token"], world.app)
    assert third.status_code == 200
    # The rotated-out token used again: refused, and the whole grant is revoked.
    reuse = refresh(live, first["refresh_token"], world.app)
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    assert refresh(live, third.json()["refresh_token"], world.app).json()["error"] == "invalid_grant"
    assert fhir_get(f"{live.fhir}/Patient/{world.patient_id}", third.json()["access_token"]).status_code == 401


def test_refresh_without_client_id_only_for_public_clients(live: RunningStack, world: World) -> None:
    """SMART 2.2 §refresh-access-token: a public app sends grant_type and refresh_token only; a
    confidential client must still authenticate (RFC 6749 §6)."""
    public = world.login(world.patient_user, "offline_access patient/*.rs")
    bare = httpx.post(f"{live.gateway_url}/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": public["refresh_token"]})
    assert bare.status_code == 200, bare.text
    assert fhir_get(f"{live.fhir}/Patient/{world.patient_id}", bare.json()["access_token"]).status_code == 200
    confidential = world.login(world.patient_user, "offline_access patient/*.rs", client_id=world.secret_app,
                               secret=world.secret)
    unauthenticated = httpx.post(f"{live.gateway_url}/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": confidential["refresh_token"]})
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"] == "invalid_client"
    unknown = httpx.post(f"{live.gateway_url}/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": "not-a-token"})
    assert unknown.status_code == 400 and unknown.json()["error"] == "invalid_grant"
    # The refused attempt did not spend the confidential client's token.
    assert refresh(live, confidential["refresh_token"], world.secret_app,
                   client_secret=world.secret).status_code == 200


def introspect(live: RunningStack, token: str, auth_token: str) -> httpx.Response:
    return httpx.post(f"{live.gateway_url}/oauth/introspect", data={"token": token},
                      headers={"Authorization": f"Bearer {auth_token}"})


def resource_server_token(live: RunningStack, tmp_path: Any) -> str:
    """A backend registered with the resource-server role: RFC 7662 §4, it may introspect any
    token (every other caller only its own client's)."""
    server = BackendClient(f"rs-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, server, "system/Patient.rs", tmp=tmp_path,
                     roles=("resource-server",))
    return server.token("system/Patient.rs")


def test_introspection(live: RunningStack, world: World, writer: BackendClient, tmp_path: Any) -> None:
    body = world.login(world.clinician, "launch/patient openid fhirUser patient/*.rs online_access",
                       patient=world.patient_id)
    resource_server = resource_server_token(live, tmp_path)
    active = introspect(live, body["access_token"], resource_server)
    assert active.status_code == 200 and active.headers["cache-control"] == "no-store"
    info = active.json()
    assert info["active"] is True
    assert info["scope"] == body["scope"] and info["client_id"] == world.app
    assert info["exp"] > time.time() and info["patient"] == world.patient_id
    assert info["sub"] == world.clinician and info["iss"] == live.gateway_url
    assert info["fhirUser"] == f"{live.fhir}/Practitioner/{world.practitioner_id}"
    # Client authentication works as well as a bearer token, but another client learns nothing
    # about this app's tokens (RFC 7662 §2.2: not allowed to introspect = not active).
    by_secret = httpx.post(f"{live.gateway_url}/oauth/introspect", data={"token": body["refresh_token"]},
                           auth=(world.secret_app, world.secret))
    assert by_secret.status_code == 200 and by_secret.json() == {"active": False}
    assert introspect(live, body["refresh_token"], resource_server).json()["active"] is True
    assert introspect(live, body["access_token"], writer.token("system/Patient.rs")).json() == {
        "active": False}  # a backend without the resource-server role
    for junk in ("", "not-a-token", body["access_token"][:-4] + "AAAA", body["id_token"]):
        assert introspect(live, junk, resource_server).json() == {"active": False}
    unauthenticated = httpx.post(f"{live.gateway_url}/oauth/introspect", data={"token": body["access_token"]})
    assert unauthenticated.status_code == 401


def test_revocation(live: RunningStack, world: World, writer: BackendClient, tmp_path: Any) -> None:
    body = world.login(world.patient_user, "offline_access patient/*.rs")
    url = f"{live.fhir}/Patient/{world.patient_id}"
    assert fhir_get(url, body["access_token"]).status_code == 200
    revoked = httpx.post(f"{live.gateway_url}/oauth/revoke",
                         data={"token": body["access_token"], "client_id": world.app})
    assert revoked.status_code == 200
    assert fhir_get(url, body["access_token"]).status_code == 401
    rs = resource_server_token(live, tmp_path)
    assert introspect(live, body["access_token"], rs).json() == {"active": False}
    # Revoked refresh token: refused at the token endpoint.
    assert httpx.post(f"{live.gateway_url}/oauth/revoke", data={
        "token": body["refresh_token"], "client_id": world.app}).status_code == 200
    again = refresh(live, body["refresh_token"], world.app)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert introspect(live, body["refresh_token"], rs).json() == {"active": False}
    unknown = httpx.post(f"{live.gateway_url}/oauth/revoke", data={"token": "nothing", "client_id": world.app})
    assert unknown.status_code == 200


# -- refusals --------------------------------------------------------------------------------------

def test_pkce_mismatch_is_invalid_grant(live: RunningStack, world: World) -> None:
    result = world.authorize(world.patient_user, "patient/*.rs")
    other_verifier, _ = pkce_pair()
    response = exchange_code(live.gateway_url, result, world.app, code_verifier=other_verifier)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    missing = exchange_code(live.gateway_url, world.authorize(world.patient_user, "patient/*.rs"),
                            world.app, code_verifier="")
    assert missing.status_code == 400 and missing.json()["error"] in ("invalid_request", "invalid_grant")


@pytest.mark.parametrize(("params", "error"), [
    ({"code_challenge_method": "plain"}, "invalid_request"),
    ({"code_challenge_method": "", "code_challenge": ""}, "invalid_request"),
    ({"aud": "https://evil.example/fhir"}, "invalid_request"),
    ({"aud": ""}, "invalid_request"),
    ({"scope": "system/*.rs"}, "invalid_scope"),
    ({"response_type": "token"}, "unsupported_response_type"),
])
def test_bad_authorize_requests_are_redirected_with_an_error(live: RunningStack, world: World,
                                                             params: dict[str, str], error: str) -> None:
    with httpx.Client(base_url=live.gateway_url, follow_redirects=False) as http:
        response = http.get("/oauth/authorize", params=authorize_url(live, world.app, **params))
    got = redirect_params(response)
    assert got["error"] == error and got["state"] == "st-123" and "code" not in got


def test_scope_not_registered_is_refused(live: RunningStack, world: World) -> None:
    narrow = f"narrow-{uuid.uuid4().hex[:6]}"
    register_app(live.cli_env, narrow, "patient/Observation.rs")
    with httpx.Client(base_url=live.gateway_url, follow_redirects=False) as http:
        response = http.get("/oauth/authorize", params=authorize_url(live, narrow, scope="patient/Patient.rs"))
    assert redirect_params(response)["error"] == "invalid_scope"
    body = world.login(world.patient_user, "patient/Observation.rs patient/Patient.rs", client_id=narrow)
    assert body["scope"] == "patient/Observation.rs"


def test_unregistered_redirect_uri_is_never_redirected_to(live: RunningStack, world: World) -> None:
    with httpx.Client(base_url=live.gateway_url, follow_redirects=False) as http:
        for params in (authorize_url(live, world.app, redirect_uri="https://evil.example/cb"),
                       authorize_url(live, world.app, redirect_uri="https://evil.example/cb",
                                     code_challenge_method="plain"),
                       authorize_url(live, "no-such-client")):
            response = http.get("/oauth/authorize", params=params)
            assert response.status_code == 400
            assert "location" not in response.headers
            assert "evil.example" not in response.text
            assert response.headers["content-type"].startswith("text/html")
            record = live.db("gateway").audit_events.find_one({"request_id": response.headers["x-request-id"]})
            assert record["status"] == 400 and record["event"]["outcome"] == "4"
            assert record["event"]["outcomeDesc"] in ("unregistered redirect_uri", "unknown client_id")


def test_reused_code_is_refused_and_revokes_its_tokens(live: RunningStack, world: World) -> None:
    result = world.authorize(world.patient_user, "patient/*.rs offline_access")
    first = exchange_code(live.gateway_url, result, world.app)
    assert first.status_code == 200
    second = exchange_code(live.gateway_url, result, world.app)
    assert second.status_code == 400 and second.json()["error"] == "invalid_grant"
    tokens = first.json()
    assert fhir_get(f"{live.fhir}/Patient/{world.patient_id}", tokens["access_token"]).status_code == 401
    assert refresh(live, tokens["refresh_token"], world.app).json()["error"] == "invalid_grant"


def test_code_bound_to_client_and_redirect_uri(live: RunningStack, world: World) -> None:
    result = world.authorize(world.patient_user, "patient/*.rs")
    stolen = exchange_code(live.gateway_url, result, world.secret_app, secret=world.secret)
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
    result = world.authorize(world.patient_user, "patient/*.rs")
    moved = exchange_code(live.gateway_url, result, world.app, redirect_uri="https://app.example/other")
    assert moved.status_code == 400 and moved.json()["error"] == "invalid_grant"


def test_token_for_the_other_base_is_refused(live: RunningStack, world: World) -> None:
    # The app is registered for records only: asking for psychnotes is refused at authorize.
    with httpx.Client(base_url=live.gateway_url, follow_redirects=False) as http:
        response = http.get("/oauth/authorize", params=authorize_url(live, world.app, aud=live.psychnotes))
    assert redirect_params(response)["error"] == "unauthorized_client"


def test_sign_in_lockout_after_repeated_failures(live: RunningStack, world: World) -> None:
    victim = f"victim-{uuid.uuid4().hex[:6]}"
    create_user(live.cli_env, victim, PASSWORD, "patient", f"Patient/{world.patient_id}")
    with httpx.Client(base_url=live.gateway_url, follow_redirects=False) as http:
        page = http.get("/oauth/authorize", params=authorize_url(live, world.app))
        session = page.text.split('name="session" value="')[1].split('"')[0]
        for _ in range(5):
            wrong = http.post("/oauth/authorize/login", data={"session": session, "username": victim,
                                                              "password": "wrong password!!"})
            assert wrong.status_code == 401 and 'role="alert"' in wrong.text
        locked = http.post("/oauth/authorize/login", data={"session": session, "username": victim,
                                                           "password": PASSWORD})
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert live.db("gateway").users.find_one({"_id": victim})["locked_until"]


# -- keys ----------------------------------------------------------------------------------------

def test_key_rotation_keeps_old_tokens_valid(live: RunningStack, world: World, writer: BackendClient) -> None:
    old = writer.token("system/Patient.rs")
    old_kid = jwt.decode(old, KeySet.import_key_set(httpx.get(f"{live.gateway_url}/oauth/jwks").json())).header["kid"]
    rotated = run_cli(live.cli_env, "key", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    import json
    new_kid = json.loads(rotated.stdout)["kid"]
    kids = {k["kid"] for k in httpx.get(f"{live.gateway_url}/oauth/jwks").json()["keys"]}
    assert {old_kid, new_kid} <= kids
    assert fhir_get(f"{live.fhir}/Patient", old).status_code == 200
    # The gateway looks for a newer signing key every SIGNING_RELOAD_SECONDS: new tokens carry it
    # within that (bounded with a margin for a busy machine).
    keys = KeySet.import_key_set(httpx.get(f"{live.gateway_url}/oauth/jwks").json())
    deadline = time.monotonic() + SIGNING_RELOAD_SECONDS + 10
    while jwt.decode(new := writer.token("system/Patient.rs"), keys).header["kid"] != new_kid:
        assert time.monotonic() < deadline, "tokens are still signed with the old key"
        time.sleep(0.2)
    for token in (old, new):
        assert fhir_get(f"{live.fhir}/Patient", token).status_code == 200
        assert fhir_get(f"{live.direct_url('records')}/fhir/Patient", token).status_code == 200


# -- rate limiting -------------------------------------------------------------------------------

def test_rate_limit_per_client(live: RunningStack, tmp_path: Any) -> None:
    client = BackendClient(f"busy-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, client, "system/Patient.rs", tmp=tmp_path)
    jwks = tmp_path / f"{client.client_id}.jwks.json"
    run = run_cli(live.cli_env, "client", "create", "--id", client.client_id, "--auth", "private_key_jwt",
                  "--jwks", str(jwks), "--scope", "system/Patient.rs", "--rate-limit", "3")
    assert run.returncode == 0, run.stderr
    token = client.token("system/Patient.rs")
    statuses = [fhir_get(f"{live.fhir}/Patient", token) for _ in range(5)]
    codes = [r.status_code for r in statuses]
    assert 429 in codes and codes[0] == 200
    limited = next(r for r in statuses if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["issue"][0]["code"] == "throttled"
    record = live.db("gateway").audit_events.find_one({"request_id": limited.headers["x-request-id"]})
    assert record["status"] == 429 and record["client_id"] == client.client_id


def test_authorize_accepts_form_post(live: RunningStack, world: World) -> None:
    """SMART 2.2 `authorize-post`: the same request as a form POST."""
    page = httpx.post(f"{live.gateway_url}/oauth/authorize", data=authorize_url(live, world.app))
    assert page.status_code == 200 and "Sign in to Mindchart" in page.text
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"
    assert '<label for="username">' in page.text and '<html lang="en">' in page.text
