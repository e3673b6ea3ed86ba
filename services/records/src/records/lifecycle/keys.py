"""Records' document-signing key: the private key that signs note versions, never the gateway's
token key. A PEM EC P-256 file (`MINDCHART_RECORDS_SIGNING_KEY_FILE`, mounted from a secret in
production, required there); in development one is generated once under the data dir with mode
0600 (O_EXCL, so replicas starting together agree on one). Retired keys
(`MINDCHART_RECORDS_PREVIOUS_SIGNING_KEY_FILES`) stay in the published JWK Set so old signatures
keep verifying after a rotation.
"""

from __future__ import annotations

from pathlib import Path

from joserfc.jwk import ECKey

from mindchart_core import keyfiles, signatures
from mindchart_core.signatures import SigningKeys
from records.settings import RecordsSettings

DEV_SIGNING_KEY_NAME = "records-document-signing.pem"


KeyConfigError = keyfiles.KeyFileError  # the signing key is missing or unusable: do not start


SETTING = "MINDCHART_RECORDS_SIGNING_KEY_FILE"
PREVIOUS_SETTING = "MINDCHART_RECORDS_PREVIOUS_SIGNING_KEY_FILES"


def _read(path: Path, setting: str, *, create: bool = False) -> ECKey:
    return keyfiles.ec_key(path, curve="P-256", alg=signatures.ALGORITHM, create=create,
                           what="document-signing key", setting=setting)


def load(settings: RecordsSettings) -> SigningKeys:
    if settings.signing_key_file is not None:
        path = Path(settings.signing_key_file)
    elif settings.is_production:
        raise KeyConfigError("MINDCHART_RECORDS_SIGNING_KEY_FILE is required in production")
    else:
        path = Path(settings.data_dir) / "keys" / DEV_SIGNING_KEY_NAME
    current = _read(path, SETTING, create=settings.signing_key_file is None)
    retired = tuple(k for k in (_read(p, PREVIOUS_SETTING) for p in settings.previous_signing_key_paths())
                    if k.kid != current.kid)
    return SigningKeys(current, retired)


__all__ = ["KeyConfigError", "SigningKeys", "load"]
