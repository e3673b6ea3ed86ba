"""Gateway settings: environment variables prefixed MINDCHART_GATEWAY_ (see the README table)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from mindchart_core.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MINDCHART_GATEWAY_", extra="ignore",
                                      populate_by_name=True)

    port: int = 8000
    mongo_url: str = "mongodb://127.0.0.1:27119/?directConnection=true"
    db_name: str = "mindchart_gateway"
    public_url: str = "http://127.0.0.1:8000"
    records_url: str = "http://127.0.0.1:8001"
    psychnotes_url: str = "http://127.0.0.1:8002"
    signing_key_file: Path | None = None
    backend_token_seconds: int = 300  # SMART Backend Services: SHOULD be <= 300
    upstream_timeout_seconds: float = 60.0

    @property
    def issuer(self) -> str:
        return self.public_url.rstrip("/")

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/oauth/token"

    @property
    def records_base(self) -> str:
        return f"{self.issuer}/fhir"

    @property
    def psychnotes_base(self) -> str:
        return f"{self.issuer}/psychnotes/fhir"

    def audience_for(self, name: str) -> str:
        """Registered audience name (records|psychnotes) → the FHIR base URL tokens carry."""
        return {"records": self.records_base, "psychnotes": self.psychnotes_base}[name]
