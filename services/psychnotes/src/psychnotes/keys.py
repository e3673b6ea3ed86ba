"""Where psychnotes' own secrets come from: the key-encryption keys (KEKs) that wrap note data
keys, and the EC key that signs consent tokens. Never the gateway's keys, never in the datastore.

A KEK file is base64 of 32 random bytes on one line. Its id is the first 16 hex digits of the
SHA-256 of the key, so every wrapped data key records which KEK wrapped it without a registry.
In production both files are required (with a KMS, mount the KEK it releases as that file, e.g.
through the Kubernetes secrets-store CSI driver); in development they are generated once under
`<data dir>/keys/`, mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from psychnotes.settings import PsychnotesSettings

KEK_BYTES = 32  # AES-256
DEV_KEK_NAME = "psychnotes-kek"
DEV_SIGNING_KEY_NAME = "psychnotes-consent-signing.pem"
DEV_RECORDS_CLIENT_KEY_NAME = "psychnotes-records-client.pem"


class KeyConfigError(RuntimeError):
    """Key material is missing or malformed; the service must not start."""


def kek_id(kek: bytes) -> str:
    return hashlib.sha256(b"mindchart-psychnotes-kek:" + kek).hexdigest()[:16]


def read_kek(path: Path) -> bytes:
    try:
        raw = path.read_text().strip()
        kek = base64.b64decode(raw, validate=True)
    except (OSError, binascii.Error, ValueError) as exc:
        raise KeyConfigError(f"cannot read a KEK from {path}: {type(exc).__name__}") from None
    if len(kek) != KEK_BYTES:
        raise KeyConfigError(f"{path} must hold base64 of exactly {KEK_BYTES} bytes")
    return kek


def write_secret_file(path: Path, content: bytes) -> bool:
    """Create `path` with mode 0600 unless it exists (O_EXCL: replicas racing on first start agree)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
    return True


def new_kek_file(path: Path) -> bytes:
    kek = os.urandom(KEK_BYTES)
    if not write_secret_file(path, base64.b64encode(kek) + b"\n"):
        raise KeyConfigError(f"{path} already exists")
    return kek


@dataclass(frozen=True)
class Keyring:
    """The current KEK (wraps every new data key) and the retired ones (unwrap only)."""

    current_id: str
    keks: dict[str, bytes]

    @property
    def current(self) -> bytes:
        return self.keks[self.current_id]


def dev_key_dir(settings: PsychnotesSettings) -> Path:
    return Path(settings.data_dir) / "keys"


def current_kek_path(settings: PsychnotesSettings) -> Path:
    if settings.kek_file is not None:
        return Path(settings.kek_file)
    if settings.is_production:
        raise KeyConfigError("MINDCHART_PSYCHNOTES_KEK_FILE is required in production")
    return dev_key_dir(settings) / DEV_KEK_NAME


def load_keyring(settings: PsychnotesSettings, *, create: bool = True) -> Keyring:
    path = current_kek_path(settings)
    if not path.exists() and settings.kek_file is None and create:
        write_secret_file(path, base64.b64encode(os.urandom(KEK_BYTES)) + b"\n")
    current = read_kek(path)
    keks = {kek_id(current): current}
    for previous in settings.previous_kek_paths():
        old = read_kek(previous)
        keks.setdefault(kek_id(old), old)
    return Keyring(current_id=kek_id(current), keks=keks)


def load_signing_key(settings: PsychnotesSettings) -> ECKey:
    """The consent-token signing key (ES256, P-256); its kid is its RFC 7638 thumbprint."""
    if settings.signing_key_file is not None:
        path = Path(settings.signing_key_file)
    elif settings.is_production:
        raise KeyConfigError("MINDCHART_PSYCHNOTES_SIGNING_KEY_FILE is required in production")
    else:
        path = dev_key_dir(settings) / DEV_SIGNING_KEY_NAME
        if not path.exists():
            private = ec.generate_private_key(ec.SECP256R1())
            write_secret_file(path, private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
    try:
        key = ECKey.import_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyConfigError(f"cannot read the signing key {path}: {type(exc).__name__}") from None
    if key.curve_name != "P-256" or not key.is_private:
        raise KeyConfigError("the consent-token signing key must be a private EC P-256 key")
    return ECKey.import_key(key.as_dict(private=True),
                            parameters={"kid": key.thumbprint(), "alg": "ES256", "use": "sig"})


def records_client_key_path(settings: PsychnotesSettings) -> Path:
    """Where psychnotes' own backend-client key lives (careteam.py authenticates with it)."""
    if settings.records_client_key_file is not None:
        return Path(settings.records_client_key_file)
    if settings.is_production:
        raise KeyConfigError("MINDCHART_PSYCHNOTES_RECORDS_CLIENT_KEY_FILE is required in production")
    return dev_key_dir(settings) / DEV_RECORDS_CLIENT_KEY_NAME


def load_records_client_key(settings: PsychnotesSettings, *, create: bool = True) -> ECKey:
    """psychnotes' SMART Backend Services key (ES384, P-384; kid = RFC 7638 thumbprint), which
    signs its client assertions at the gateway's token endpoint. Development generates one under
    `<data dir>/keys/`; the stack runner registers its public half with the gateway."""
    path = records_client_key_path(settings)
    if not path.exists() and settings.records_client_key_file is None and create:
        private = ec.generate_private_key(ec.SECP384R1())
        write_secret_file(path, private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    try:
        key = ECKey.import_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyConfigError(f"cannot read the records client key {path}: {type(exc).__name__}") from None
    if key.curve_name != "P-384" or not key.is_private:
        raise KeyConfigError("the records client key must be a private EC P-384 key (ES384)")
    return ECKey.import_key(key.as_dict(private=True),
                            parameters={"kid": key.thumbprint(), "alg": "ES384", "use": "sig"})
