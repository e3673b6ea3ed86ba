"""Psychnotes settings: environment variables prefixed MINDCHART_PSYCHNOTES_ (README table).

Key material (keys.py): `KEK_FILE` holds the key-encryption key (base64 of 32 bytes, one line),
`PREVIOUS_KEK_FILES` (comma-separated paths) the retired ones still needed to unwrap data keys
until `mindchart psychnotes rotate-key` has re-wrapped them, `SIGNING_KEY_FILE` the PEM private
key (EC P-256) that signs consent tokens, `DOCUMENT_SIGNING_KEY_FILE` the one (EC P-256) that signs
note versions on `$sign` (`PREVIOUS_DOCUMENT_SIGNING_KEY_FILES` the retired ones, still published so
older signatures keep verifying), `RECORDS_CLIENT_KEY_FILE` the EC P-384 key psychnotes
authenticates with as the backend client `RECORDS_CLIENT_ID` to ask records who is on a patient's
care team (careteam.py). Production refuses to start without them; development generates them
under `<MINDCHART_DATA_DIR>/keys/` (mode 0600) on first start.
"""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from mindchart_core.settings import ServiceSettings


class PsychnotesSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MINDCHART_PSYCHNOTES_", extra="ignore",
                                      populate_by_name=True)

    port: int = 8002
    mongo_url: str = "mongodb://127.0.0.1:27118/?directConnection=true"
    db_name: str = "mindchart_psychnotes"
    public_base_url: str = "http://127.0.0.1:8000/psychnotes/fhir"
    issuer: str = "http://127.0.0.1:8000"
    jwks_url: str = "http://127.0.0.1:8000/oauth/jwks"
    # The gateway's revocations (mindchart_core.tokens.RevocationFeed), followed as a long poll;
    # the refresh interval is the pause after a failed request or one answered at once.
    revocations_url: str = "http://127.0.0.1:8000/oauth/revocations"
    revocation_refresh_seconds: float = 1.0
    # The secret the feed is read with (= the gateway's MINDCHART_GATEWAY_REVOCATIONS_SECRET);
    # development: generated under the data dir (mindchart_core.tokens.feed_secret).
    revocations_secret: str = ""
    kek_file: Path | None = None
    previous_kek_files: str = ""  # comma-separated; retired KEKs kept until re-wrapped
    signing_key_file: Path | None = None
    # psychnotes' own document-signing key (lifecycle/keys.py), apart from the consent-token key.
    document_signing_key_file: Path | None = None
    previous_document_signing_key_files: str = ""  # comma-separated; retired, still published
    consent_token_minutes: int = 10  # DESIGN.md "Consent token": exp in minutes
    exception_token_minutes: int = 10
    min_justification_chars: int = 20
    # Care teams (careteam.py): records through the gateway, with psychnotes' own credentials.
    token_url: str = "http://127.0.0.1:8000/oauth/token"
    records_base_url: str = "http://127.0.0.1:8000/fhir"
    records_client_id: str = "mindchart-psychnotes"
    records_client_key_file: Path | None = None
    care_team_cache_seconds: float = 30.0
    # How old the Consent or exception grant behind a consent token may be when a read is
    # checked against it (gate_cache.py): a revocation by another replica is seen within this.
    gate_cache_seconds: float = 1.0

    @property
    def base_url(self) -> str:
        return self.public_base_url.rstrip("/")

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if not self.revocations_secret:
            problems.append("MINDCHART_PSYCHNOTES_REVOCATIONS_SECRET_FILE is not set (the gateway's "
                            "revocation feed answers only its holders: every token would get 503)")
        if self.kek_file is None:
            problems.append("MINDCHART_PSYCHNOTES_KEK_FILE is not set (notes would be unreadable "
                            "after a redeploy)")
        if self.signing_key_file is None:
            problems.append("MINDCHART_PSYCHNOTES_SIGNING_KEY_FILE is not set")
        if self.document_signing_key_file is None:
            problems.append("MINDCHART_PSYCHNOTES_DOCUMENT_SIGNING_KEY_FILE is not set (signed notes "
                            "would stop verifying after a redeploy)")
        if self.records_client_key_file is None:
            problems.append("MINDCHART_PSYCHNOTES_RECORDS_CLIENT_KEY_FILE is not set")
        return problems

    def previous_kek_paths(self) -> list[Path]:
        return [Path(p.strip()) for p in self.previous_kek_files.split(",") if p.strip()]

    def previous_document_signing_key_paths(self) -> list[Path]:
        return [Path(p.strip()) for p in self.previous_document_signing_key_files.split(",") if p.strip()]
