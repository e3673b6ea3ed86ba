"""Records' client key for calling payers (SMART Backend Services private_key_jwt, ES384).

Kept apart from records' document-signing key (records/lifecycle): one key authenticates records
to payers, the other signs what it releases. In production `MINDCHART_RECORDS_CDEX_CLIENT_KEY_FILE`
names a PEM EC P-384 private key mounted from a secret; in development one is generated once
under the data dir (mode 0600, O_EXCL so replicas starting together agree on one).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey

DEV_KEY_NAME = "records-cdex-client.pem"
ALGORITHM = "ES384"


def _generate(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def load(key_file: Path | None, data_dir: Path, production: bool) -> ECKey:
    if key_file is None:
        if production:
            raise RuntimeError("MINDCHART_RECORDS_CDEX_CLIENT_KEY_FILE is required in production")
        key_file = data_dir / "records" / DEV_KEY_NAME
        if not key_file.exists():
            _generate(key_file)
    key = ECKey.import_key(key_file.read_bytes())
    return ECKey.import_key(key.as_dict(private=True), parameters={
        "kid": key.thumbprint(), "alg": ALGORITHM, "use": "sig"})


def public_jwks(key: ECKey) -> dict[str, Any]:
    return {"keys": [key.as_dict(private=False)]}


def client_assertion(key: ECKey, client_id: str, token_url: str) -> str:
    """SMART Backend Services §authentication: a short-lived JWT signed with our private key."""
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "iat": now, "exp": now + 300,
              "jti": uuid.uuid4().hex}
    return jwt.encode({"alg": ALGORITHM, "kid": key.kid, "typ": "JWT"}, claims, key,
                      algorithms=[ALGORITHM])
