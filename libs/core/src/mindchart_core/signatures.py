"""Detached JWS over the RFC 8785 (JCS) canonical form of a JSON document: how Mindchart signs a
FHIR resource version so anyone holding the signer's JWK Set can prove it unchanged.

- Canonical form: RFC 8785 JSON Canonicalization Scheme (sorted members, ECMAScript number
  serialisation, no insignificant whitespace), the scheme Da Vinci CDex 2.x requires for FHIR
  digital signatures (CDex signatures.html, CONF-030).
- Signature: a JWS (RFC 7515) in compact serialisation with a *detached* payload (RFC 7515
  Appendix F): `<protected header>..<signature>`; the verifier supplies the canonical bytes
  again. The FHIR `Signature` carrying it has `sigFormat: application/jose` (CDex CONF-029,
  R4 datatypes.html#Signature) and `targetFormat` naming the canonicalization (`TARGET_FORMAT`).
- Keys: ES256 on P-256, `kid` the RFC 7638 thumbprint; verifiers pick the key by `kid` from the
  signer's published JWK Set.

Used by records for signed progress notes and by any service that must sign or check the same way.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet

ALGORITHM = "ES256"
SIG_FORMAT = "application/jose"
# CDex CONF-031: the JCS canonicalization, named in Signature.targetFormat.
TARGET_FORMAT = "application/fhir+json;canonicalization=http://hl7.org/fhir/canonicalization/json#document"


class SignatureInvalid(Exception):
    """The JWS does not verify over these bytes (wrong key, altered content, malformed)."""


def canonical(document: Any) -> bytes:
    """RFC 8785 canonical bytes of a JSON value (a dict parsed from JSON, or raw JSON bytes)."""
    if isinstance(document, bytes | bytearray | memoryview):
        document = orjson.loads(bytes(document))
    return rfc8785.dumps(document)


def generate_key() -> ECKey:
    """A fresh private ES256 signing key with its thumbprint as kid."""
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return signing_key(pem)


def signing_key(pem: bytes) -> ECKey:
    """A PEM EC P-256 private key as a JWK with kid = RFC 7638 thumbprint, alg ES256, use sig.
    Raises ValueError when the PEM is not a private P-256 key."""
    key = ECKey.import_key(pem)
    if key.curve_name != "P-256" or not key.is_private:
        raise ValueError("a document-signing key must be a private EC P-256 key")
    return ECKey.import_key(key.as_dict(private=True),
                            parameters={"kid": key.thumbprint(), "alg": ALGORITHM, "use": "sig"})


@dataclass(frozen=True)
class SigningKeys:
    """A service's document-signing keys: the current one signs, retired ones still verify."""

    current: ECKey
    retired: tuple[ECKey, ...] = ()

    @property
    def all(self) -> list[ECKey]:
        return [self.current, *self.retired]

    def jwks(self) -> dict[str, Any]:
        return public_jwks(self.all)


def public_jwks(keys: Iterable[ECKey]) -> dict[str, Any]:
    """The JWK Set to publish: public halves only."""
    return {"keys": [k.as_dict(private=False) for k in keys]}


def sign_detached(payload: bytes, key: ECKey, *, header: dict[str, Any] | None = None) -> str:
    """Compact JWS over `payload` with the payload part left empty (RFC 7515 Appendix F)."""
    protected = {**(header or {}), "alg": ALGORITHM, "kid": key.kid}
    compact = jws.serialize_compact(protected, payload, key, algorithms=[ALGORITHM])
    return jws.detach_content(compact)


def protected_header(signature: str) -> dict[str, Any]:
    """The protected header of a compact JWS, unverified (to learn its kid). Raises
    SignatureInvalid when it is not a compact JWS with a detached payload."""
    parts = signature.split(".")
    if len(parts) != 3 or parts[1] != "":
        raise SignatureInvalid("not a compact JWS with a detached payload")
    try:
        header = orjson.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (binascii.Error, orjson.JSONDecodeError, ValueError):
        raise SignatureInvalid("the JWS header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise SignatureInvalid("the JWS header is not a JSON object")
    return header


def verify_detached(signature: str, payload: bytes, keys: KeySet | Iterable[ECKey]) -> dict[str, Any]:
    """Check a detached compact JWS over `payload` with the key its `kid` names; returns the
    protected header. Raises SignatureInvalid on any failure."""
    header = protected_header(signature)
    if header.get("alg") != ALGORITHM:
        raise SignatureInvalid(f"unexpected JWS algorithm {str(header.get('alg'))[:16]!r}")
    keyset = keys if isinstance(keys, KeySet) else KeySet(list(keys))
    key = next((k for k in keyset.keys if k.kid == header.get("kid")), None)
    if key is None:
        raise SignatureInvalid("the JWS names a key that is not in the signer's JWK Set")
    try:
        jws.deserialize_compact(signature, key, algorithms=[ALGORITHM], payload=payload)
    except (JoseError, ValueError):
        raise SignatureInvalid("the signature does not match the content") from None
    return header


__all__ = ["ALGORITHM", "SIG_FORMAT", "TARGET_FORMAT", "SignatureInvalid", "SigningKeys", "canonical",
           "generate_key", "protected_header", "public_jwks", "sign_detached", "signing_key",
           "verify_detached"]
