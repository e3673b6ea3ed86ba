"""Records' client key for calling payers (SMART Backend Services private_key_jwt, ES384).

Kept apart from records' document-signing key (records/lifecycle): one key authenticates records
to payers, the other signs what it releases. In production `MINDCHART_RECORDS_CDEX_CLIENT_KEY_FILE`
names a PEM EC P-384 private key mounted from a secret; in development one is generated once
under the data dir (mode 0600, O_EXCL so replicas starting together agree on one); read by the
one EC key-file loader every service uses (mindchart_core.keyfiles).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey

from mindchart_core import keyfiles

DEV_KEY_NAME = "records-cdex-client.pem"
ALGORITHM = "ES384"


def load(key_file: Path | None, data_dir: Path, production: bool) -> ECKey:
    if key_file is None and production:
        raise keyfiles.KeyFileError("MINDCHART_RECORDS_CDEX_CLIENT_KEY_FILE is required in production")
    return keyfiles.ec_key(key_file or data_dir / "records" / DEV_KEY_NAME, curve="P-384",
                           alg=ALGORITHM, create=key_file is None, what="CDex client key",
                           setting="MINDCHART_RECORDS_CDEX_CLIENT_KEY_FILE")


def public_jwks(key: ECKey) -> dict[str, Any]:
    return {"keys": [key.as_dict(private=False)]}


def client_assertion(key: ECKey, client_id: str, token_url: str) -> str:
    """SMART Backend Services §authentication: a short-lived JWT signed with our private key."""
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "iat": now, "exp": now + 300,
              "jti": uuid.uuid4().hex}
    return jwt.encode({"alg": ALGORITHM, "kid": key.kid, "typ": "JWT"}, claims, key,
                      algorithms=[ALGORITHM])
