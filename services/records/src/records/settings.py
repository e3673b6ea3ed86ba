"""Records settings: environment variables prefixed MINDCHART_RECORDS_ (see the README table)."""

from __future__ import annotations

from pathlib import Path

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
    # The gateway's revocations (mindchart_core.tokens.RevocationFeed), followed as a long poll;
    # the refresh interval is the pause after a failed request or one answered at once.
    revocations_url: str = "http://127.0.0.1:8000/oauth/revocations"
    revocation_refresh_seconds: float = 1.0
    # The secret the feed is read with (= the gateway's MINDCHART_GATEWAY_REVOCATIONS_SECRET);
    # development: generated under the data dir (mindchart_core.tokens.feed_secret).
    revocations_secret: str = ""
    # records' own document-signing key (PEM, EC P-256) for signed notes (records/lifecycle);
    # development: generated under the data dir. Retired keys stay published for verification.
    signing_key_file: Path | None = None
    previous_signing_key_files: str = ""  # comma-separated PEM files

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if not self.revocations_secret:
            problems.append("MINDCHART_RECORDS_REVOCATIONS_SECRET_FILE is not set (the gateway's "
                            "revocation feed answers only its holders: every token would get 503)")
        if self.signing_key_file is None:
            problems.append("MINDCHART_RECORDS_SIGNING_KEY_FILE is not set (signatures of notes "
                            "would not verify after a redeploy)")
        return problems

    def previous_signing_key_paths(self) -> list[Path]:
        return [Path(p.strip()) for p in self.previous_signing_key_files.split(",") if p.strip()]
