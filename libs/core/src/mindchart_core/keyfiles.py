"""Key files, read alike by every service: KEK files (base64 of 32 bytes, mindchart_core.sealing)
and PEM EC private keys (kid = RFC 7638 thumbprint). Production mounts them from secrets; in
development a service generates its own once, mode 0600, linked into place whole so processes
racing on first start agree on one file.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from mindchart_core.sealing import KEY_BYTES

CURVES: dict[str, type[ec.EllipticCurve]] = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}


class KeyFileError(RuntimeError):
    """Key material is missing or malformed: the service must not start."""


def write_secret_file(path: Path, content: bytes) -> bool:
    """Create `path` with mode 0600 unless it exists. Written whole under a draft name, then
    linked into place: processes racing on first start agree on one file, and none reads half."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.link(draft, path)
    except FileExistsError:
        return False
    finally:
        draft.unlink()
    return True


def read_kek(path: Path) -> bytes:
    try:
        kek = base64.b64decode(path.read_text().strip(), validate=True)
    except (OSError, binascii.Error, ValueError) as exc:
        raise KeyFileError(f"cannot read a KEK from {path}: {type(exc).__name__}") from None
    if len(kek) != KEY_BYTES:
        raise KeyFileError(f"{path} must hold base64 of exactly {KEY_BYTES} bytes")
    return kek


def new_kek_file(path: Path) -> bytes:
    kek = os.urandom(KEY_BYTES)
    if not write_secret_file(path, base64.b64encode(kek) + b"\n"):
        raise KeyFileError(f"{path} already exists")
    return kek


def kek(path: Path, *, create: bool) -> bytes:
    """The KEK in `path`; with `create` (a development default path) generated first if missing."""
    if create and not path.exists():
        write_secret_file(path, base64.b64encode(os.urandom(KEY_BYTES)) + b"\n")
    return read_kek(path)


def ec_key(path: Path, *, curve: str, alg: str, create: bool, what: str) -> ECKey:
    """The private EC key (`curve`, signing with `alg`) in PEM file `path`, as a JWK with kid =
    its RFC 7638 thumbprint and use sig; with `create` generated first if missing."""
    if create and not path.exists():
        private = ec.generate_private_key(CURVES[curve]())
        write_secret_file(path, private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    try:
        key = ECKey.import_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the {what} {path}: {type(exc).__name__}") from None
    if key.curve_name != curve or not key.is_private:
        raise KeyFileError(f"the {what} must be a private EC {curve} key ({alg})")
    return ECKey.import_key(key.as_dict(private=True),
                            parameters={"kid": key.thumbprint(), "alg": alg, "use": "sig"})


__all__ = ["KeyFileError", "ec_key", "kek", "new_kek_file", "read_kek", "write_secret_file"]
