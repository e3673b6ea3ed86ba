"""Psychnotes' document-signing key: it signs the version a `$sign` makes final (service.py), and
is neither the consent-token key nor the gateway's. A PEM EC P-256 file
(`MINDCHART_PSYCHNOTES_DOCUMENT_SIGNING_KEY_FILE`, required in production); development generates
one under `<data dir>/keys/` (mode 0600). Retired keys
(`MINDCHART_PSYCHNOTES_PREVIOUS_DOCUMENT_SIGNING_KEY_FILES`) stay in the published JWK Set
(`[base]/.well-known/jwks.json`) so older signatures keep verifying after a rotation.
"""

from __future__ import annotations

from pathlib import Path

from joserfc.jwk import ECKey

from mindchart_core import keyfiles, signatures
from mindchart_core.signatures import SigningKeys
from psychnotes.keys import KeyConfigError, dev_key_dir
from psychnotes.settings import PsychnotesSettings

DEV_DOCUMENT_SIGNING_KEY_NAME = "psychnotes-document-signing.pem"
JWKS_PATH = "/.well-known/jwks.json"
SETTING = "MINDCHART_PSYCHNOTES_DOCUMENT_SIGNING_KEY_FILE"
PREVIOUS_SETTING = "MINDCHART_PSYCHNOTES_PREVIOUS_DOCUMENT_SIGNING_KEY_FILES"


def _read(path: Path, setting: str, *, generate: bool = False) -> ECKey:
    """KeyConfigError (mindchart_core.keyfiles.KeyFileError) when missing or not a P-256 key."""
    return keyfiles.ec_key(path, curve="P-256", alg=signatures.ALGORITHM, create=generate,
                           what="document-signing key", setting=setting)


def load(settings: PsychnotesSettings) -> SigningKeys:
    if settings.document_signing_key_file is not None:
        current = _read(Path(settings.document_signing_key_file), SETTING)
    elif settings.is_production:
        raise KeyConfigError(f"{SETTING} is required in production")
    else:
        current = _read(dev_key_dir(settings) / DEV_DOCUMENT_SIGNING_KEY_NAME, SETTING, generate=True)
    retired = tuple(k for k in (_read(p, PREVIOUS_SETTING)
                                for p in settings.previous_document_signing_key_paths())
                    if k.kid != current.kid)
    return SigningKeys(current, retired)
