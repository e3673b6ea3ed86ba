"""Records' document-signing key: the private key that signs note versions, never the gateway's
token key. A PEM EC P-256 file (`MINDCHART_RECORDS_SIGNING_KEY_FILE`, mounted from a secret in
production, required there); in development one is generated once under the data dir with mode
0600 (O_EXCL, so replicas starting together agree on one). Retired keys
(`MINDCHART_RECORDS_PREVIOUS_SIGNING_KEY_FILES`) stay in the published JWK Set so old signatures
keep verifying after a rotation.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from mindchart_core import signatures
from mindchart_core.signatures import SigningKeys
from records.settings import RecordsSettings

DEV_SIGNING_KEY_NAME = "records-document-signing.pem"


class KeyConfigError(RuntimeError):
    """The signing key is missing or unusable: records refuses to start."""


def _write_new(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def _read(path: Path) -> ECKey:
    try:
        return signatures.signing_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyConfigError(f"cannot use the signing key {path}: {type(exc).__name__}") from None


def load(settings: RecordsSettings) -> SigningKeys:
    if settings.signing_key_file is not None:
        path = Path(settings.signing_key_file)
    elif settings.is_production:
        raise KeyConfigError("MINDCHART_RECORDS_SIGNING_KEY_FILE is required in production")
    else:
        path = Path(settings.data_dir) / "keys" / DEV_SIGNING_KEY_NAME
        if not path.exists():
            _write_new(path)
    current = _read(path)
    retired = tuple(k for k in (_read(p) for p in settings.previous_signing_key_paths())
                    if k.kid != current.kid)
    return SigningKeys(current, retired)


__all__ = ["KeyConfigError", "SigningKeys", "load"]
