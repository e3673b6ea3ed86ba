"""Psychnotes settings: environment variables prefixed MINDCHART_PSYCHNOTES_ (README table)."""

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
    kek_file: Path | None = None
    signing_key_file: Path | None = None
