"""Envelope encryption of what psychnotes keeps at rest (AES-256-GCM, `cryptography`).

Each version of each note (and of each Consent) gets a fresh 256-bit data key. The resource JSON
is sealed under the data key; the data key is wrapped (AES-256-GCM again) under the current
key-encryption key, and the wrap records the KEK id. Both layers bind, as associated data, the
resource type, id, version and patient: a ciphertext or a wrapped key copied onto another note,
version or patient fails authentication instead of decrypting (issue 5, "Notes").

Key rotation (`rewrap`) only unwraps and re-wraps data keys: note ciphertexts are never decrypted.
The AES-GCM seal itself is mindchart_core.sealing, shared with the gateway's signing-key wrap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from bson.binary import Binary

from mindchart_core import sealing
from psychnotes.keys import Keyring

ALGORITHM = "A256GCM"
_DOMAIN = b"mindchart-psychnotes/v1"


class VaultError(RuntimeError):
    """A sealed record cannot be opened: wrong key, tampered or swapped ciphertext."""


@dataclass(frozen=True)
class Binding:
    """What a sealed record belongs to; authenticated on open, never encrypted."""

    resource_type: str
    resource_id: str
    version: int
    patient: str

    def aad(self, layer: bytes) -> bytes:
        return b"|".join([_DOMAIN, layer, self.resource_type.encode(), self.resource_id.encode(),
                          str(self.version).encode(), self.patient.encode()])


def _wrap(keyring: Keyring, data_key: bytes, binding: Binding) -> dict[str, Any]:
    aad = binding.aad(b"dek:" + keyring.current_id.encode())
    nonce, wrapped = sealing.seal(keyring.current, data_key, aad)
    return {"kek": keyring.current_id, "nonce": Binary(nonce), "key": Binary(wrapped)}


def _unwrap(keyring: Keyring, wrapped: dict[str, Any], binding: Binding) -> bytes:
    kid = str(wrapped["kek"])
    kek = keyring.keks.get(kid)
    if kek is None:
        raise VaultError(f"data key is wrapped by KEK {kid}, which is not configured")
    try:
        return sealing.open_sealed(kek, bytes(wrapped["nonce"]), bytes(wrapped["key"]),
                                   binding.aad(b"dek:" + kid.encode()))
    except sealing.SealError:
        raise VaultError("wrapped data key failed authentication") from None


def seal(keyring: Keyring, resource: dict[str, Any], binding: Binding) -> dict[str, Any]:
    """The resource as an opaque, bound ciphertext with its own wrapped data key."""
    data_key = sealing.new_key()
    nonce, ciphertext = sealing.seal(data_key, orjson.dumps(resource), binding.aad(b"body"))
    return {"alg": ALGORITHM, "nonce": Binary(nonce), "ct": Binary(ciphertext),
            "dek": _wrap(keyring, data_key, binding)}


def open_sealed(keyring: Keyring, sealed: dict[str, Any], binding: Binding) -> bytes:
    """The resource JSON bytes, or VaultError."""
    if sealed.get("alg") != ALGORITHM:
        raise VaultError("unknown sealing algorithm")
    data_key = _unwrap(keyring, sealed["dek"], binding)
    try:
        return sealing.open_sealed(data_key, bytes(sealed["nonce"]), bytes(sealed["ct"]),
                                   binding.aad(b"body"))
    except sealing.SealError:
        raise VaultError("sealed resource failed authentication") from None


def rewrap(keyring: Keyring, sealed: dict[str, Any], binding: Binding) -> dict[str, Any] | None:
    """The same sealed record with its data key wrapped by the current KEK (None: already is)."""
    if sealed["dek"]["kek"] == keyring.current_id:
        return None
    data_key = _unwrap(keyring, sealed["dek"], binding)
    return {**sealed, "dek": _wrap(keyring, data_key, binding)}
