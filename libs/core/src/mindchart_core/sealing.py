"""AES-256-GCM sealing under a key-encryption key (KEK), the same in every service that keeps
key material or data at rest: psychnotes' note data keys (psychnotes/vault.py) and the gateway's
token-signing keys (gateway/keys.py).

A seal is a fresh 96-bit random nonce and the ciphertext with its 128-bit tag; the associated
data (what the sealed bytes belong to: a note version, a key id) is authenticated, never
encrypted, so sealed bytes copied onto another record fail to open. NIST SP 800-38D §8.3: a
random 96-bit IV is allowed while one key seals at most 2^32 messages, far beyond either use.

A KEK file is base64 of 32 random bytes on one line. Its id is the first 16 hex digits of the
SHA-256 of a service-specific domain and the key, so what a KEK sealed records which KEK it was
without a registry and without revealing anything about the key.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12


class SealError(ValueError):
    """Sealed bytes cannot be opened: wrong key, tampered ciphertext or other associated data."""


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def key_id(domain: bytes, key: bytes) -> str:
    return hashlib.sha256(domain + key).hexdigest()[:16]


def seal(key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """(nonce, ciphertext) of `plaintext` under `key`, bound to `aad`."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError):
        raise SealError("sealed bytes failed authentication") from None


__all__ = ["KEY_BYTES", "NONCE_BYTES", "SealError", "key_id", "new_key", "open_sealed", "seal"]
