"""Registration of clients and users (the `mindchart` CLI calls these): the gateway owns both."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import urlsplit

from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from gateway import keys, oauth, store
from mindchart_core import scopes

AUDIENCES = ("records", "psychnotes")
ROLES = ("practitioner", "patient", "admin", "compliance")
PAYER_ROLE = "payer"  # a backend client acting for an insurer (Da Vinci CDex data consumer)
_FHIR_USER = r"(Practitioner|Patient|PractitionerRole|RelatedPerson|Person)/[A-Za-z0-9\-.]{1,64}"
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RegistrationError(ValueError):
    """Refused registration input; the message is safe to print."""


def _check_scope(scope: str) -> str:
    parsed = scopes.parse(scope)
    if not parsed.clinical:
        raise RegistrationError("scope must list at least one SMART scope, e.g. system/*.rs")
    return str(parsed)


async def create_client(
    db: store.Db, *, client_id: str, auth: str, scope: str, audiences: list[str],
    jwks: dict[str, Any] | None = None, jwks_url: str | None = None, secret: str | None = None,
    redirect_uris: list[str] | None = None, roles: list[str] | None = None,
    name: str | None = None, rate_limit: int | None = None,
    payer_endpoints: list[str] | None = None, payer_token_url: str | None = None,
    payer_client_id: str | None = None,
    subscription_endpoints: list[str] | None = None,
) -> dict[str, Any]:
    if not _ID.match(client_id):
        raise RegistrationError("client id: 1-64 letters, digits, '.', '_' or '-'")
    if not audiences or any(a not in AUDIENCES for a in audiences):
        raise RegistrationError(f"audience must be among {', '.join(AUDIENCES)}")
    for uri in redirect_uris or []:
        parts = urlsplit(uri)
        if not parts.scheme or parts.fragment or (parts.scheme in ("http", "https") and not parts.netloc):
            raise RegistrationError(
                f"redirect URI {uri!r} must be absolute and have no fragment (RFC 6749 §3.1.2)")
    for endpoint in subscription_endpoints or []:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment:
            raise RegistrationError(
                f"subscription endpoint {endpoint!r} must be an absolute http(s) URL without fragment")
    if rate_limit is not None and rate_limit < 1:
        raise RegistrationError("rate limit must be at least 1 request per window")
    endpoints = _payer_endpoints(payer_endpoints or [], roles or [])
    if (payer_token_url or payer_client_id) and not endpoints:
        raise RegistrationError("--payer-token-url and --payer-client-id go with --payer-endpoint")
    if endpoints and not (payer_token_url and payer_client_id):
        raise RegistrationError("--payer-endpoint needs --payer-token-url and --payer-client-id: how "
                                "records authenticates to the payer (SMART Backend Services)")
    if payer_token_url:
        _payer_endpoints([payer_token_url], roles or [])
    client: dict[str, Any] = {
        "_id": client_id, "auth": auth, "scope": _check_scope(scope), "audiences": sorted(set(audiences)),
        "redirect_uris": redirect_uris or [], "roles": roles or [], "created": datetime.now(UTC),
        "name": name or client_id, "rate_limit": rate_limit,
        "subscription_endpoints": sorted(set(subscription_endpoints or [])),
    }
    if endpoints:
        client["payer_endpoints"] = endpoints
        client["payer_token_url"] = payer_token_url
        client["payer_client_id"] = payer_client_id
    if jwks_url is not None and not jwks_url.startswith(("https://", "http://")):
        raise RegistrationError("--jwks-url must be an http(s) URL")
    if auth == "private_key_jwt" and jwks is None:
        if jwks_url is None:
            raise RegistrationError("private_key_jwt needs --jwks FILE (public keys) or --jwks-url URL")
        client["jwks_url"] = jwks_url  # keys fetched from there at each authentication
    elif auth == "private_key_jwt" and jwks is not None:
        try:
            keyset = KeySet.import_key_set(cast(Any, jwks))
        except (JoseError, ValueError, KeyError, TypeError):
            raise RegistrationError("the JWKS file is not a valid JWK Set") from None
        if any(k.is_private for k in keyset.keys):
            raise RegistrationError("the JWKS holds private keys: register only public keys")
        client["jwks"] = keyset.as_dict(private=False)
        client["jwks_url"] = jwks_url
    elif auth == "client_secret":
        if not secret or len(secret) < 16:
            raise RegistrationError("client_secret needs --secret of at least 16 characters")
        client["secret_hash"] = oauth.hash_secret(secret)
    elif auth == "none":  # a public client (SMART client-public): PKCE, no secret
        if not redirect_uris:
            raise RegistrationError("a public client needs at least one --redirect-uri")
    else:
        raise RegistrationError("auth must be private_key_jwt, client_secret or none (public)")
    await store.put_client(db, client)
    return {k: v for k, v in client.items() if k not in ("secret_hash", "jwks")} | {
        "id": client_id, "created": client["created"].isoformat()}


def _payer_endpoints(urls: list[str], roles: list[str]) -> list[str]:
    """The `$submit-attachment` endpoints records may call for this payer (Da Vinci CDex 2.1
    Task `payer-url` input): records releases attachments only to a URL registered here, never to
    one a Task merely names (server-side request forgery). Absolute http(s), no query or fragment.
    With them: the payer's token endpoint and the client id the payer gave records, which records
    authenticates as with its own key (SMART Backend Services, private_key_jwt)."""
    if urls and PAYER_ROLE not in roles:
        raise RegistrationError(f"--payer-endpoint needs --role {PAYER_ROLE}")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
            raise RegistrationError(
                f"payer endpoint {url[:200]!r} must be an absolute http(s) URL without query or fragment")
    return sorted(set(urls))


async def create_user(
    db: store.Db, *, username: str, password: str, role: str, fhir_user: str | None = None,
    supervisor: str | None = None,
) -> dict[str, Any]:
    """A user who signs in. `supervisor` (Practitioner/ID) marks a practitioner whose notes need
    a co-signature: their tokens carry it as the `supervisor` claim (records/lifecycle)."""
    if not _ID.match(username):
        raise RegistrationError("username: 1-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise RegistrationError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < 12:
        raise RegistrationError("password must be at least 12 characters")
    if fhir_user and not re.fullmatch(_FHIR_USER, fhir_user):
        raise RegistrationError("fhir-user must look like Practitioner/ID or Patient/ID")
    if role in ("practitioner", "patient") and not fhir_user:
        raise RegistrationError(f"a {role} user needs --fhir-user")
    if supervisor is not None:
        if role != "practitioner" or not re.fullmatch(r"Practitioner/[A-Za-z0-9\-.]{1,64}", supervisor):
            raise RegistrationError("--supervisor (Practitioner/ID) is for practitioner users")
        if supervisor == fhir_user:
            raise RegistrationError("a practitioner cannot supervise themselves")
    created = datetime.now(UTC)
    user = {"_id": username, "password_hash": oauth.hash_secret(password), "role": role,
            "fhir_user": fhir_user, "created": created, "failed_logins": 0}
    if supervisor:
        user["supervisor"] = supervisor
    await store.put_user(db, user)
    answer = {"username": username, "role": role, "fhir_user": fhir_user, "created": created.isoformat()}
    return {**answer, "supervisor": supervisor} if supervisor else answer


async def rotate_signing_key(db: store.Db, kek: bytes) -> dict[str, Any]:
    """A new signing key, sealed under the gateway's KEK (keys.py): it signs from now on."""
    kid = await keys.add_key(db, kek)
    return {"kid": kid, "published": [d["_id"] for d in await store.signing_keys(db)]}
