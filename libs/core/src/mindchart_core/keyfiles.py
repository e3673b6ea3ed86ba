"""Key files, read alike by every service: KEK files (base64 of 32 bytes, mindchart_core.sealing)
and PEM EC private keys (kid = RFC 7638 thumbprint). Production mounts them from secrets; in
development a service generates its own once, mode 0600, linked into place whole so processes
racing on first start agree on one file.

Every problem with a key file (missing, unreadable, a directory, not base64, the wrong length,
not a private key of the expected curve) is a KeyFileError whose message names the setting and
the path, never a byte of the file: a service refuses to start with that one line
(mindchart_core.service_app, asgi.StartupRefusalMiddleware).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from mindchart_core.sealing import KEY_BYTES, key_id

CURVES: dict[str, type[ec.EllipticCurve]] = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}


class KeyFileError(RuntimeError):
    """Key material is missing or malformed: the service must not start."""


def where(path: Path, setting: str) -> str:
    """How a refusal names a key file: the setting it comes from and the path read."""
    return f"{setting} ({path})" if setting else str(path)


def _unreadable(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "not readable by this process (permission denied)"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def read_bytes(path: Path, *, setting: str = "") -> bytes:
    """The bytes of a secret file, or KeyFileError naming `setting` and `path`."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{where(path, setting)}: {_unreadable(exc)}") from None


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


def read_kek(path: Path, *, setting: str = "") -> bytes:
    raw = read_bytes(path, setting=setting)
    try:
        kek = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{where(path, setting)}: not base64 (a KEK file is base64 of "
                           f"{KEY_BYTES} random bytes on one line)") from None
    if len(kek) != KEY_BYTES:
        raise KeyFileError(f"{where(path, setting)}: holds {len(kek)} bytes, a KEK must be "
                           f"base64 of exactly {KEY_BYTES} bytes")
    return kek


def new_kek_file(path: Path) -> bytes:
    kek = os.urandom(KEY_BYTES)
    if not write_secret_file(path, base64.b64encode(kek) + b"\n"):
        raise KeyFileError(f"{path} already exists")
    return kek


def kek(path: Path, *, create: bool, setting: str = "") -> bytes:
    """The KEK in `path`; with `create` (a development default path) generated first if missing."""
    if create and not path.exists():
        write_secret_file(path, base64.b64encode(os.urandom(KEY_BYTES)) + b"\n")
    return read_kek(path, setting=setting)


@dataclass(frozen=True)
class Keks:
    """The current KEK (seals everything new) and the retired ones (open only), by KEK id.

    Rotation keeps a retired KEK only until what it sealed is sealed again under the current
    one: NIST SP 800-57 Pt. 1 Rev. 5 §5.3 (a cryptoperiod limits what one key exposes) and
    §5.3.5 (protection needed beyond a key's cryptoperiod is reapplied under a new key)."""

    current_id: str
    keks: dict[str, bytes]

    @property
    def current(self) -> bytes:
        return self.keks[self.current_id]

    @property
    def previous_ids(self) -> list[str]:
        return [kid for kid in self.keks if kid != self.current_id]


def load_keks(current: Path, *, create: bool, setting: str, previous: Iterable[Path],
              previous_setting: str, domain: bytes) -> Keks:
    """The current KEK file (`setting`) and every retired one (`previous_setting`), ids under
    `domain` (mindchart_core.sealing.key_id)."""
    now = kek(current, create=create, setting=setting)
    keks = {key_id(domain, now): now}
    for path in previous:
        old = read_kek(path, setting=previous_setting)
        keks.setdefault(key_id(domain, old), old)
    return Keks(current_id=key_id(domain, now), keks=keks)


def ec_key(path: Path, *, curve: str, alg: str, create: bool, what: str,
           setting: str = "") -> ECKey:
    """The private EC key (`curve`, signing with `alg`) in PEM file `path`, as a JWK with kid =
    its RFC 7638 thumbprint and use sig; with `create` generated first if missing."""
    if create and not path.exists():
        private = ec.generate_private_key(CURVES[curve]())
        write_secret_file(path, private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    raw = read_bytes(path, setting=setting)
    try:
        key = ECKey.import_key(raw)
    except (ValueError, TypeError, JoseError):
        raise KeyFileError(f"{where(path, setting)}: not a PEM EC private key (the {what} must "
                           f"be a private EC {curve} key, {alg})") from None
    if key.curve_name != curve or not key.is_private:
        raise KeyFileError(f"{where(path, setting)}: the {what} must be a private EC {curve} key "
                           f"({alg})")
    return ECKey.import_key(key.as_dict(private=True),
                            parameters={"kid": key.thumbprint(), "alg": alg, "use": "sig"})


__all__ = ["Keks", "KeyFileError", "ec_key", "kek", "load_keks", "new_kek_file", "read_bytes",
           "read_kek", "where", "write_secret_file"]
