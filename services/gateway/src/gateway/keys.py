"""The gateway's token-signing keys: kept in its datastore so every replica signs alike.

The newest key signs; every unretired key is published at /oauth/jwks, so a key added by
`mindchart key rotate` verifies alongside the old one until the old tokens expire.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, cast

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from gateway import store

SIGNING_ALG = "RS256"  # SMART 2.2 §id_token: RS256 SHALL be supported
SIGNING_RELOAD_SECONDS = 2.0


def new_private_jwk(pem: bytes | None = None) -> tuple[str, dict[str, Any]]:
    kid = uuid.uuid4().hex[:16]
    params: Any = {"kid": kid, "use": "sig", "alg": SIGNING_ALG}
    key = RSAKey.import_key(pem, parameters=params) if pem else RSAKey.generate_key(2048, parameters=params)
    return kid, key.as_dict(private=True)


class Keyring:
    """In-memory view of the signing keys, reloaded from the datastore every `ttl` seconds."""

    def __init__(self, db: store.Db, *, ttl: float = 30.0) -> None:
        self.db = db
        self.ttl = ttl
        self._keys: list[RSAKey] = []
        self._imported: dict[str, RSAKey] = {}  # kid -> key: a key document never changes
        self._public: dict[str, Any] = {"keys": []}
        self._keyset = KeySet([])
        self._loaded = 0.0

    async def load(self, *, force: bool = False) -> None:
        if not force and self._keys and time.monotonic() - self._loaded < self.ttl:
            return
        docs = await store.signing_keys(self.db)
        kids = [str(d["_id"]) for d in docs]
        if kids != [k.kid for k in self._keys] or not self._keys:
            # Importing an RSA private key validates it (tens of ms on a busy core): only keys
            # not seen before are imported, and the public set is rebuilt only when keys change.
            self._imported = {d["_id"]: self._imported.get(d["_id"]) or RSAKey.import_key(d["jwk"])
                              for d in docs}
            self._keys = [self._imported[kid] for kid in kids]
            self._public = {"keys": [k.as_dict(private=False) for k in self._keys]}
            self._keyset = KeySet.import_key_set(cast(Any, self._public)) if self._keys else KeySet([])
        self._loaded = time.monotonic()

    async def ensure_key(self, pem: bytes | None = None) -> None:
        await self.load(force=True)
        if not self._keys:
            kid, jwk = new_private_jwk(pem)
            await store.add_signing_key(self.db, kid, jwk)
            await self.load(force=True)

    async def sign(self, claims: dict[str, Any], *, typ: str = "JWT") -> str:
        # Signing is rare next to verifying: look for a newly rotated key every few seconds.
        if time.monotonic() - self._loaded > SIGNING_RELOAD_SECONDS:
            await self.load(force=True)
        key = self._keys[0]
        header = {"alg": SIGNING_ALG, "kid": key.kid, "typ": typ}
        return jwt.encode(header, claims, key)

    async def public_jwks(self, *, fresh: bool = False) -> dict[str, Any]:
        await self.load(force=fresh)
        return self._public

    async def keyset(self, *, refresh: bool = False) -> KeySet:
        """KeySource for mindchart_core.tokens.TokenVerifier (public halves only)."""
        await self.load(force=refresh)
        return self._keyset
