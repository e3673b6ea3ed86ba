"""The one module that talks to Mindchart, over the gateway's public HTTP APIs only, as any
third-party SMART app would: OAuth (authorize URL, token, refresh, revoke, JWKS for the id_token)
and the two FHIR bases (records at /fhir, psychnotes at /psychnotes/fhir). No route builds a URL.

SMART App Launch 2.2: §app-launch (authorization code + PKCE S256, `aud` = the FHIR base, `state`
of at least 122 bits), §client-confidential-symmetric (HTTP Basic with the client secret at the
token endpoint), §token-response (patient context, `id_token` with `fhirUser`), §refresh.
RFC 7009 (revocation: a refresh token revoked ends its whole grant at the gateway).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from workspace.settings import WorkspaceSettings

FHIR_JSON = "application/fhir+json"
# What the workspace asks for. Records: the patients, sessions, notes and scores it writes.
# Psychnotes: the therapist's own private notes (create, read with a consent token, update).
RECORDS_SCOPE = ("launch launch/patient openid fhirUser online_access user/Patient.rs "
                 "user/Practitioner.rs user/CareTeam.rs user/Encounter.crus user/DocumentReference.crus "
                 "user/Observation.crs")
EHR_RECORDS_SCOPE = RECORDS_SCOPE.replace("launch launch/patient", "launch")
PSYCHNOTES_SCOPE = "openid fhirUser online_access user/DocumentReference.crus"


class ApiError(Exception):
    """A FHIR or OAuth call failed; `message` is the server's own diagnostics, safe to show."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def pkce_pair() -> tuple[str, str]:
    """RFC 7636 §4.1-4.2: a fresh verifier and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _diagnostics(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        texts = [str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code"))
                 for i in body.get("issue", [])]
        return "; ".join(texts) or f"HTTP {response.status_code}"
    if isinstance(body, dict) and "error" in body:
        return str(body.get("error_description") or body["error"])
    return f"HTTP {response.status_code}"


@dataclass
class Gateway:
    settings: WorkspaceSettings
    http: httpx.AsyncClient

    # -- OAuth ----------------------------------------------------------------------------------

    def base_for(self, audience: str) -> str:
        return self.settings.records_base if audience == "records" else self.settings.psychnotes_base

    def authorize_url(self, audience: str, state: str, challenge: str, launch: str | None) -> str:
        scope = PSYCHNOTES_SCOPE if audience == "psychnotes" else (
            EHR_RECORDS_SCOPE if launch else RECORDS_SCOPE)
        params = {"response_type": "code", "client_id": self.settings.client_id,
                  "redirect_uri": self.settings.redirect_uri, "scope": scope, "state": state,
                  "aud": self.base_for(audience), "code_challenge": challenge,
                  "code_challenge_method": "S256"}
        if launch:
            params["launch"] = launch
        return f"{self.settings.gateway_url}/oauth/authorize?{urlencode(params)}"

    def _client_auth(self) -> tuple[str, str]:
        return (self.settings.client_id, self.settings.client_secret)

    async def _token(self, form: dict[str, str]) -> dict[str, Any]:
        response = await self.http.post(f"{self.settings.gateway_url}/oauth/token", data=form,
                                        auth=self._client_auth())
        if response.status_code != 200:
            raise ApiError(response.status_code, _diagnostics(response))
        body: dict[str, Any] = response.json()
        body["expires_at"] = int(time.time()) + int(body.get("expires_in", 300))
        return body

    async def exchange_code(self, code: str, verifier: str) -> dict[str, Any]:
        return await self._token({"grant_type": "authorization_code", "code": code,
                                  "redirect_uri": self.settings.redirect_uri,
                                  "code_verifier": verifier})

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        return await self._token({"grant_type": "refresh_token", "refresh_token": refresh_token})

    async def revoke(self, token: str) -> None:
        """RFC 7009 §2.1. Best effort on sign-out: the session ends here whatever the answer."""
        try:
            await self.http.post(f"{self.settings.gateway_url}/oauth/revoke", data={"token": token},
                                 auth=self._client_auth())
        except httpx.HTTPError:
            pass

    async def verify_id_token(self, id_token: str) -> dict[str, Any]:
        """OpenID Connect Core §3.1.3.7: signature (the gateway's JWKS), iss, aud = our client id,
        exp. Its `fhirUser` names the signed-in practitioner."""
        response = await self.http.get(f"{self.settings.gateway_url}/oauth/jwks")
        try:
            keys = KeySet.import_key_set(response.json())
            token = jwt.decode(id_token, keys, algorithms=["RS256"])
            jwt.JWTClaimsRegistry(
                leeway=30, iss={"essential": True, "value": self.settings.gateway_url},
                aud={"essential": True, "value": self.settings.client_id}, exp={"essential": True},
            ).validate(token.claims)
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise ApiError(401, "The sign-in could not be verified") from exc
        return dict(token.claims)

    # -- FHIR -----------------------------------------------------------------------------------

    def fhir(self, audience: str, access_token: str) -> FhirApi:
        return FhirApi(self.http, self.base_for(audience), access_token)


@dataclass
class FhirApi:
    http: httpx.AsyncClient
    base: str
    access_token: str

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}", "Accept": FHIR_JSON, **extra}

    async def _send(self, method: str, path: str, *, body: Any = None, params: Any = None,
                    headers: dict[str, str] | None = None) -> httpx.Response:
        extra = dict(headers or {})
        if body is not None:
            extra["Content-Type"] = FHIR_JSON
        url = f"{self.base}/{path}" if path else self.base
        response = await self.http.request(method, url, json=body, params=params,
                                           headers=self._headers(**extra))
        if response.status_code >= 400:
            raise ApiError(response.status_code, _diagnostics(response))
        return response

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        response = await self._send("GET", f"{resource_type}/{resource_id}")
        resource: dict[str, Any] = response.json()
        return resource

    async def search(self, resource_type: str, params: list[tuple[str, str]],
                     headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
        response = await self._send("GET", resource_type, params=params, headers=headers)
        return [e["resource"] for e in response.json().get("entry", []) if "resource" in e]

    async def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        response = await self._send("POST", resource["resourceType"], body=resource,
                                    headers={"Prefer": "return=representation"})
        created: dict[str, Any] = response.json() if response.content else {}
        if "id" not in created:  # a server that answered with Location only
            parts = response.headers.get("location", "").split("/")
            created = {**resource, "id": parts[parts.index(resource["resourceType"]) + 1],
                       "meta": {"versionId": parts[-1] if "_history" in parts else "1"}}
        return created

    async def update(self, resource: dict[str, Any], version: str) -> dict[str, Any]:
        """FHIR R4 http.html §concurrency: If-Match with the version the editor started from, so
        a save from a stale tab is refused (409/412) instead of overwriting silently."""
        response = await self._send("PUT", f"{resource['resourceType']}/{resource['id']}", body=resource,
                                    headers={"If-Match": f'W/"{version}"',
                                             "Prefer": "return=representation"})
        updated: dict[str, Any] = response.json()
        return updated

    async def transaction(self, entries: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """All or nothing (R4 http.html §transaction). Returns the created references in order."""
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": url, "resource": resource,
             "request": {"method": "POST", "url": resource["resourceType"]}}
            for url, resource in entries]}
        response = await self._send("POST", "", body=bundle)
        return [str(e.get("response", {}).get("location", "")).split("/_history")[0]
                for e in response.json().get("entry", [])]

    async def operation(self, path: str, parameters: dict[str, Any],
                        headers: dict[str, str] | None = None) -> dict[str, Any]:
        response = await self._send("POST", path, body=parameters, headers=headers)
        result: dict[str, Any] = response.json()
        return result
