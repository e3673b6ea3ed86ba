"""CDex settings: environment variables prefixed MINDCHART_RECORDS_CDEX_ (README table)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class CdexSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MINDCHART_RECORDS_CDEX_", extra="ignore")

    # Records' own key for SMART Backend Services client assertions (private_key_jwt, ES384) when
    # it calls a payer's $submit-attachment. PEM EC P-384; generated under the data dir in
    # development; its public JWK Set is served at /fhir/.well-known/cdex-client-jwks.json for
    # payers to register.
    client_key_file: Path | None = None
    # The scope records asks the payer's token endpoint for.
    submit_scope: str = "system/*.c"
    # Delivery workers: how often idle ones look for approved attachments, the lease a delivery is
    # claimed with, attempts before the Task fails, and the pause before a retry (doubled each time).
    poll_seconds: float = 1.0
    lease_seconds: float = 30.0
    max_attempts: int = 5
    retry_seconds: float = 2.0
    request_timeout_seconds: float = 20.0
    # How often open requests are checked against their due date (past it, unreviewed: marked).
    sweep_seconds: float = 5.0
