"""Records settings: environment variables prefixed MINDCHART_RECORDS_ (see the README table)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from mindchart_core.settings import ServiceSettings


class RecordsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MINDCHART_RECORDS_", extra="ignore",
                                      populate_by_name=True)

    port: int = 8001
    mongo_url: str = "mongodb://127.0.0.1:27117/?directConnection=true"
    db_name: str = "mindchart_records"
    public_base_url: str = "http://127.0.0.1:8000/fhir"
    issuer: str = "http://127.0.0.1:8000"
    jwks_url: str = "http://127.0.0.1:8000/oauth/jwks"
