"""Where psychnotes' own secrets come from: the key-encryption keys (KEKs) that wrap note data
keys, and the EC key that signs consent tokens. Never the gateway's keys, never in the datastore.

A KEK file is base64 of 32 random bytes on one line (mindchart_core.keyfiles, read as the
gateway reads its own). Its id is the first 16 hex digits of the SHA-256 of the key, so every
wrapped data key records which KEK wrapped it without a registry (mindchart_core.sealing).
In production both files are required (with a KMS, mount the KEK it releases as that file, e.g.
through the Kubernetes secrets-store CSI driver); in development they are generated once under
`<data dir>/keys/`, mode 0600.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from joserfc.jwk import ECKey

from mindchart_core import keyfiles, sealing
from psychnotes import store
from psychnotes.settings import PsychnotesSettings

KEK_BYTES = sealing.KEY_BYTES  # AES-256
DEV_KEK_NAME = "psychnotes-kek"
DEV_SIGNING_KEY_NAME = "psychnotes-consent-signing.pem"
DEV_RECORDS_CLIENT_KEY_NAME = "psychnotes-records-client.pem"
KEK_DOMAIN = b"mindchart-psychnotes-kek:"

KeyConfigError = keyfiles.KeyFileError  # key material missing or malformed: do not start
read_kek = keyfiles.read_kek
new_kek_file = keyfiles.new_kek_file
write_secret_file = keyfiles.write_secret_file


def kek_id(kek: bytes) -> str:
    return sealing.key_id(KEK_DOMAIN, kek)


# The current KEK (wraps every new data key) and the retired ones (unwrap only): the one KEK set
# the gateway's signing keys use too (mindchart_core.keyfiles.Keks).
Keyring = keyfiles.Keks


def dev_key_dir(settings: PsychnotesSettings) -> Path:
    return Path(settings.data_dir) / "keys"


def current_kek_path(settings: PsychnotesSettings) -> Path:
    if settings.kek_file is not None:
        return Path(settings.kek_file)
    if settings.is_production:
        raise KeyConfigError("MINDCHART_PSYCHNOTES_KEK_FILE is required in production")
    return dev_key_dir(settings) / DEV_KEK_NAME


KEK_SETTING = "MINDCHART_PSYCHNOTES_KEK_FILE"
PREVIOUS_KEK_SETTING = "MINDCHART_PSYCHNOTES_PREVIOUS_KEK_FILES"


def load_keyring(settings: PsychnotesSettings, *, create: bool = True) -> Keyring:
    """KeyConfigError naming the setting and path when a KEK file is missing or malformed."""
    return keyfiles.load_keks(current_kek_path(settings),
                              create=create and settings.kek_file is None, setting=KEK_SETTING,
                              previous=settings.previous_kek_paths(),
                              previous_setting=PREVIOUS_KEK_SETTING, domain=KEK_DOMAIN)


async def check_vault_opens(db: Any, keyring: Keyring) -> None:
    """Start-up refuses, naming the settings and KEK ids, when a stored data key is wrapped by a
    KEK that is neither the current one nor a previous one: a wrong or dropped KEK file would
    otherwise turn every read of those notes into an error, long after start-up."""
    unknown = await store.kek_not_among(db, list(keyring.keks))
    if unknown is not None:
        raise KeyConfigError(
            f"the vault holds data keys wrapped by KEK {unknown}, but the configured KEK is "
            f"{keyring.current_id} ({KEK_SETTING}) and the previous ones are "
            f"{', '.join(keyring.previous_ids) or 'none'} ({PREVIOUS_KEK_SETTING}): configure "
            "the KEK they were wrapped with")


def _key_path(configured: Path | None, setting: str, dev_name: str,
              settings: PsychnotesSettings) -> Path:
    if configured is not None:
        return Path(configured)
    if settings.is_production:
        raise KeyConfigError(f"MINDCHART_PSYCHNOTES_{setting} is required in production")
    return dev_key_dir(settings) / dev_name


def load_signing_key(settings: PsychnotesSettings) -> ECKey:
    """The consent-token signing key (ES256, P-256); its kid is its RFC 7638 thumbprint."""
    path = _key_path(settings.signing_key_file, "SIGNING_KEY_FILE", DEV_SIGNING_KEY_NAME, settings)
    return keyfiles.ec_key(path, curve="P-256", alg="ES256", create=settings.signing_key_file is None,
                           what="consent-token signing key",
                           setting="MINDCHART_PSYCHNOTES_SIGNING_KEY_FILE")


def records_client_key_path(settings: PsychnotesSettings) -> Path:
    """Where psychnotes' own backend-client key lives (careteam.py authenticates with it)."""
    return _key_path(settings.records_client_key_file, "RECORDS_CLIENT_KEY_FILE",
                     DEV_RECORDS_CLIENT_KEY_NAME, settings)


def load_records_client_key(settings: PsychnotesSettings, *, create: bool = True) -> ECKey:
    """psychnotes' SMART Backend Services key (ES384, P-384; kid = RFC 7638 thumbprint), which
    signs its client assertions at the gateway's token endpoint. Development generates one under
    `<data dir>/keys/`; the stack runner registers its public half with the gateway."""
    return keyfiles.ec_key(records_client_key_path(settings), curve="P-384", alg="ES384",
                           create=create and settings.records_client_key_file is None,
                           what="records client key",
                           setting="MINDCHART_PSYCHNOTES_RECORDS_CLIENT_KEY_FILE")
