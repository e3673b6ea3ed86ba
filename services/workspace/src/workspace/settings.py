"""Workspace settings: environment variables prefixed MINDCHART_WORKSPACE_ (README table).

The workspace is a SMART App Launch 2.2 confidential client of the gateway: `client_id` and
`client_secret` (or `CLIENT_SECRET_FILE`) are what `mindchart run` registered for it.
"""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from mindchart_core.settings import ServiceSettings


class WorkspaceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MINDCHART_WORKSPACE_", extra="ignore",
                                      populate_by_name=True)

    port: int = 8003
    mongo_url: str = "mongodb://127.0.0.1:27120/?directConnection=true"
    db_name: str = "mindchart_workspace"
    public_url: str = "http://127.0.0.1:8003"  # where therapists' browsers reach the workspace
    gateway_url: str = "http://127.0.0.1:8000"  # the issuer; FHIR bases are <this>/fhir, /psychnotes/fhir
    client_id: str = "workspace"
    client_secret: str = ""
    session_hours: int = 10  # a sign-in lasts at most a working day
    cookie_secure: bool = False  # production: True (the cookie travels only over HTTPS)

    @property
    def records_base(self) -> str:
        return f"{self.gateway_url}/fhir"

    @property
    def psychnotes_base(self) -> str:
        return f"{self.gateway_url}/psychnotes/fhir"

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_url}/callback"

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if len(self.client_secret) < 16:
            problems.append("MINDCHART_WORKSPACE_CLIENT_SECRET is missing or too short")
        if not self.cookie_secure or not self.public_url.startswith("https://"):
            problems.append("the workspace must be served over HTTPS with a Secure cookie")
        return problems
