"""The gateway's token-signing keys: kept in its datastore so every replica signs alike, each
private key sealed under a key-encryption key (KEK) that never enters the datastore.

Read access to the gateway datastore must not be enough to forge tokens (issue 12, "Also
found"). Each key document holds `public` (the public JWK, what /oauth/jwks publishes) and
`sealed` (the private JWK's JSON sealed with AES-256-GCM under the KEK, mindchart_core.sealing,
with the kid as associated data, so a sealed key moved onto another kid does not open). The KEK is
`MINDCHART_GATEWAY_SIGNING_KEK_FILE` (base64 of 32 bytes, mindchart_core.keyfiles): required in
production, generated once under `<data dir>/keys/` in development, like psychnotes' KEK. A key
document from before the KEK (a clear `jwk`) is sealed the first time a keyring with the KEK
loads it, and the clear field removed.

The newest key signs; every unretired key is published at /oauth/jwks, so a key added by
`mindchart key rotate` verifies alongside the old one until the old tokens expire. Whatever only
verifies (chain_verify, `mindchart audit verify`) builds a Keyring without the KEK: public halves.

The KEK itself rotates as psychnotes' does (psychnotes/rotation.py): `mindchart key new-kek`
writes a new file; gateways restart with `SIGNING_KEK_FILE` = the new one and
`SIGNING_PREVIOUS_KEK_FILES` = the old one. At start-up each opens every key with whichever of
them sealed it and seals again under the current KEK what a previous one sealed (`reseal`), with
a compare-and-set on the stored ciphertext, so replicas starting at once each re-seal a key at
most once between them and never overwrite one another's seal. `mindchart key kek-status` says
which keys are still under a retired KEK; once none is, drop the old file and destroy it.
Why rotate at all: NIST SP 800-57 Pt. 1 Rev. 5 §5.3 (a cryptoperiod limits how much a
compromised key exposes) and §5.3.5 (protection needed past a key's cryptoperiod is reapplied
under a new key), which is what the re-seal does; the signing keys themselves rotate apart
(`mindchart key rotate`).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, cast

import orjson
import structlog
from bson.binary import Binary
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey

from gateway import store
from gateway.settings import GatewaySettings
from mindchart_core import keyfiles, sealing

SIGNING_ALG = "RS256"  # SMART 2.2 §id_token: RS256 SHALL be supported
SIGNING_RELOAD_SECONDS = 2.0
SEAL_ALG = "A256GCM"
DEV_KEK_NAME = "gateway-signing-kek"
KEK_DOMAIN = b"mindchart-gateway-signing-kek:"
_AAD = b"mindchart-gateway-signing-key/v1|"

KEK_SETTING = "MINDCHART_GATEWAY_SIGNING_KEK_FILE"
PREVIOUS_KEK_SETTING = "MINDCHART_GATEWAY_SIGNING_PREVIOUS_KEK_FILES"

KeyConfigError = keyfiles.KeyFileError  # the KEK is missing, malformed or not the one keys need
Keks = keyfiles.Keks

log = structlog.get_logger("keys")


def kek_id(kek: bytes) -> str:
    return sealing.key_id(KEK_DOMAIN, kek)


def kek_path(settings: GatewaySettings) -> Path:
    if settings.signing_kek_file is not None:
        return Path(settings.signing_kek_file)
    if settings.is_production:
        raise KeyConfigError("MINDCHART_GATEWAY_SIGNING_KEK_FILE is required in production")
    return Path(settings.data_dir) / "keys" / DEV_KEK_NAME


def load_kek(settings: GatewaySettings) -> bytes:
    """The KEK that seals the signing keys; in development generated on first use."""
    return keyfiles.kek(kek_path(settings), create=settings.signing_kek_file is None,
                        setting=KEK_SETTING)


def load_keks(settings: GatewaySettings) -> Keks:
    """The current KEK and the retired ones (`SIGNING_PREVIOUS_KEK_FILES`), by KEK id."""
    return keyfiles.load_keks(kek_path(settings), create=settings.signing_kek_file is None,
                              setting=KEK_SETTING, previous=settings.signing_previous_kek_paths(),
                              previous_setting=PREVIOUS_KEK_SETTING, domain=KEK_DOMAIN)


def as_keks(kek: bytes | Keks) -> Keks:
    return kek if isinstance(kek, Keks) else Keks(current_id=kek_id(kek), keks={kek_id(kek): kek})


def signing_pem(settings: GatewaySettings) -> bytes | None:
    """The PEM RSA key to import as the first signing key (`SIGNING_KEY_FILE`), if one is set;
    KeyConfigError naming the setting and the path when it is missing or not an RSA private key."""
    if settings.signing_key_file is None:
        return None
    path, setting = Path(settings.signing_key_file), "MINDCHART_GATEWAY_SIGNING_KEY_FILE"
    pem = keyfiles.read_bytes(path, setting=setting)
    try:
        private = RSAKey.import_key(pem).is_private
    except (ValueError, TypeError, JoseError):
        private = False
    if not private:
        raise KeyConfigError(f"{keyfiles.where(path, setting)}: not a PEM RSA private key")
    return pem


def new_private_jwk(pem: bytes | None = None) -> tuple[str, dict[str, Any]]:
    kid = uuid.uuid4().hex[:16]
    params: Any = {"kid": kid, "use": "sig", "alg": SIGNING_ALG}
    key = RSAKey.import_key(pem, parameters=params) if pem else RSAKey.generate_key(2048, parameters=params)
    return kid, key.as_dict(private=True)


def seal_private_jwk(kek: bytes, kid: str, private_jwk: dict[str, Any]) -> dict[str, Any]:
    """What the datastore keeps of a signing key: its public JWK and the sealed private one."""
    nonce, ciphertext = sealing.seal(kek, orjson.dumps(private_jwk), _AAD + kid.encode())
    public = RSAKey.import_key(private_jwk).as_dict(private=False)
    return {"public": public, "sealed": {"alg": SEAL_ALG, "kek": kek_id(kek), "nonce": Binary(nonce),
                                         "ct": Binary(ciphertext)}}


def open_private_jwk(kek: bytes, doc: dict[str, Any]) -> dict[str, Any]:
    """The private JWK of a stored key document, or KeyConfigError naming the KEK it needs."""
    kid, sealed = str(doc["_id"]), doc["sealed"]
    try:
        opened = sealing.open_sealed(kek, bytes(sealed["nonce"]), bytes(sealed["ct"]),
                                     _AAD + kid.encode())
    except sealing.SealError:
        raise KeyConfigError(
            f"signing key {kid} is sealed under KEK {sealed.get('kek')}, but the configured KEK is "
            f"{kek_id(kek)}: set {KEK_SETTING} to the KEK the keys were sealed with") from None
    return dict(orjson.loads(opened))


def open_sealed_key(keks: Keks, doc: dict[str, Any]) -> dict[str, Any]:
    """The private JWK of a stored key document, opened with the KEK (current or previous) its
    seal names, or KeyConfigError naming the settings and the KEK ids."""
    kid, under = str(doc["_id"]), str(doc["sealed"].get("kek"))
    kek = keks.keks.get(under)
    if kek is None:
        raise KeyConfigError(
            f"signing key {kid} is sealed under KEK {under}, but the configured KEK is "
            f"{keks.current_id} ({KEK_SETTING}) and the previous ones are "
            f"{', '.join(keks.previous_ids) or 'none'} ({PREVIOUS_KEK_SETTING}): configure the "
            "KEK the keys were sealed with")
    return open_private_jwk(kek, doc)


async def reseal(db: store.Db, keks: Keks) -> int:
    """Seal again under the current KEK every stored key that a previous KEK sealed (or that is
    still in clear, from before the KEK), retired keys included; how many this call re-sealed.

    Each write is a compare-and-set on what was read (the ciphertext, or the clear `jwk`), so
    with two replicas starting at once one of them re-seals a key and the other's write matches
    nothing: no seal is overwritten, and a replica configured with yet another KEK cannot take a
    key away from the first. Idempotent: keys already under the current KEK are not read.
    An unretired key under a KEK not configured refuses start-up (KeyConfigError); a retired one
    is left as it is (nothing opens it again) and `mindchart key kek-status` names it."""
    resealed = 0
    for doc in await store.signing_keys_not_sealed_under(db, keks.current_id):
        kid = str(doc["_id"])
        if "sealed" not in doc:
            done = await store.seal_signing_key(db, kid, seal_private_jwk(keks.current, kid, doc["jwk"]))
        elif str(doc["sealed"].get("kek")) not in keks.keks and doc.get("retired"):
            continue
        else:
            private = open_sealed_key(keks, doc)
            done = await store.reseal_signing_key(db, kid, bytes(doc["sealed"]["ct"]),
                                                  seal_private_jwk(keks.current, kid, private))
        resealed += int(done)
    if resealed:
        log.info("signing keys sealed again under the current KEK", resealed=resealed,
                 kek_id=keks.current_id)
    return resealed


async def kek_status(db: store.Db, keks: Keks) -> dict[str, Any]:
    """Which KEK seals each stored key (`mindchart key kek-status`): a previous KEK file can go
    once no key names it."""
    keys = []
    for doc in await store.all_signing_keys(db):
        under = str(doc["sealed"].get("kek")) if "sealed" in doc else None
        state = ("clear" if under is None else "current" if under == keks.current_id
                 else "previous" if under in keks.keks else "unknown")
        keys.append({"kid": str(doc["_id"]), "kek": under, "sealed_under": state,
                     "retired": bool(doc.get("retired"))})
    still_needed = {kid: [k["kid"] for k in keys if k["kek"] == kid] for kid in keks.previous_ids}
    return {"kek": keks.current_id, "previous_keks": keks.previous_ids, "keys": keys,
            "previous_keks_still_needed": {kid: kids for kid, kids in still_needed.items() if kids},
            "not_under_current_kek": [k["kid"] for k in keys if k["sealed_under"] != "current"]}


async def add_key(db: store.Db, kek: bytes, pem: bytes | None = None) -> str:
    kid, jwk = new_private_jwk(pem)
    await store.add_signing_key(db, kid, seal_private_jwk(kek, kid, jwk))
    return kid


class Keyring:
    """In-memory view of the signing keys, reloaded from the datastore every `ttl` seconds.

    With the KEK it signs (and seals legacy clear keys as it meets them); without it, it only
    verifies: `sign` refuses, the public halves are all it ever reads."""

    def __init__(self, db: store.Db, kek: bytes | Keks | None = None, *, ttl: float = 30.0) -> None:
        self.db = db
        self.keks = as_keks(kek) if kek is not None else None
        self.kek = self.keks.current if self.keks is not None else None
        self.ttl = ttl
        self._kids: list[str] = []
        self._private: dict[str, RSAKey] = {}  # kid -> key: a key document never changes
        self._public: dict[str, Any] = {"keys": []}
        self._keyset = KeySet([])
        self._loaded = 0.0

    async def load(self, *, force: bool = False) -> None:
        if not force and self._kids and time.monotonic() - self._loaded < self.ttl:
            return
        docs = await store.signing_keys(self.db)
        kids = [str(d["_id"]) for d in docs]
        if kids != self._kids or not self._kids:
            # Importing an RSA private key validates it (tens of ms on a busy core): only keys
            # not seen before are opened, and the public set is rebuilt only when keys change.
            if self.kek is not None:
                self._private = {d["_id"]: self._private.get(d["_id"]) or await self._open(d)
                                 for d in docs}
            self._public = {"keys": [_public_jwk(d) for d in docs]}
            self._keyset = KeySet.import_key_set(cast(Any, self._public)) if docs else KeySet([])
            self._kids = kids
        self._loaded = time.monotonic()

    async def _open(self, doc: dict[str, Any]) -> RSAKey:
        assert self.kek is not None and self.keks is not None
        if "sealed" in doc:
            return RSAKey.import_key(open_sealed_key(self.keks, doc))
        # A key stored before the KEK: seal it now and drop the clear copy (one replica wins;
        # the others find no clear `jwk` left to replace).
        key = RSAKey.import_key(doc["jwk"])
        await store.seal_signing_key(self.db, str(doc["_id"]),
                                     seal_private_jwk(self.kek, str(doc["_id"]), doc["jwk"]))
        return key

    async def ensure_key(self, pem: bytes | None = None) -> None:
        """At least one signing key exists, every stored one opens with the current or a previous
        KEK, and what a previous KEK sealed is sealed again under the current one (`reseal`)."""
        if self.keks is not None:
            await reseal(self.db, self.keks)
        await self.load(force=True)
        if not self._kids:
            if self.kek is None:
                raise KeyConfigError("creating a signing key needs the gateway's KEK")
            await add_key(self.db, self.kek, pem)
            await self.load(force=True)

    async def sign(self, claims: dict[str, Any], *, typ: str = "JWT") -> str:
        if self.kek is None:
            raise KeyConfigError("this keyring has no KEK: it verifies, it does not sign")
        # Signing is rare next to verifying: look for a newly rotated key every few seconds.
        if time.monotonic() - self._loaded > SIGNING_RELOAD_SECONDS:
            await self.load(force=True)
        key = self._private[self._kids[0]]
        header = {"alg": SIGNING_ALG, "kid": key.kid, "typ": typ}
        return jwt.encode(header, claims, key)

    async def public_jwks(self, *, fresh: bool = False) -> dict[str, Any]:
        await self.load(force=fresh)
        return self._public

    async def keyset(self, *, refresh: bool = False) -> KeySet:
        """KeySource for mindchart_core.tokens.TokenVerifier (public halves only)."""
        await self.load(force=refresh)
        return self._keyset


def _public_jwk(doc: dict[str, Any]) -> dict[str, Any]:
    if "public" in doc:
        return dict(doc["public"])
    return RSAKey.import_key(doc["jwk"]).as_dict(private=False)  # not sealed yet


__all__ = ["Keks", "KeyConfigError", "Keyring", "add_key", "kek_path", "kek_status", "load_kek",
           "load_keks", "open_private_jwk", "open_sealed_key", "reseal", "seal_private_jwk",
           "signing_pem"]
