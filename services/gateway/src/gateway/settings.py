"""Gateway settings: environment variables prefixed MINDCHART_GATEWAY_ (see the README table)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from mindchart_core.keyfiles import read_bytes
from mindchart_core.settings import ServiceSettings, development_secret


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
    # Key-encryption key (base64 of 32 bytes) sealing the signing keys in the datastore (keys.py).
    signing_kek_file: Path | None = None
    # Comma-separated retired KEKs: keys still sealed under one open at start-up and are sealed
    # again under SIGNING_KEK_FILE; `mindchart key kek-status` says when a file can go.
    signing_previous_kek_files: str = ""
    # HMAC key for the audit hash chain, kept outside the datastore (a secret mount). Without it
    # the chain is plain SHA-256: still tamper-evident, but recomputable by a datastore writer.
    audit_chain_key_file: Path | None = None
    # How often a signed checkpoint of every audit partition's head is written (checkpoints.py),
    # and how long a replica's hold on its audit partition lasts unrenewed (partitions.py).
    audit_checkpoint_seconds: float = 5.0
    audit_partition_lease_seconds: float = 30.0
    backend_token_seconds: int = 300  # SMART Backend Services: SHOULD be <= 300
    upstream_timeout_seconds: float = 60.0
    user_token_seconds: int = 3600  # SMART 2.2 §token-response: expires_in SHOULD be <= 1 h
    authorization_code_seconds: int = 60  # RFC 6749 §4.1.2: short-lived, single use
    authorization_session_seconds: int = 900  # time to sign in and approve
    online_refresh_seconds: int = 8 * 3600
    offline_refresh_seconds: int = 90 * 86400
    launch_seconds: int = 3600  # an EHR launch id stays usable this long
    login_max_failures: int = 5  # consecutive failures before the account is locked
    login_lockout_seconds: int = 300
    rate_limit_requests: int = 6000  # per client per window; generous so tests never trip it
    rate_limit_window_seconds: int = 60
    # 0: each replica counts its own windows (with N replicas a client gets N x the budget);
    # > 0: replicas add their counts to the datastore this often and share one budget.
    rate_limit_sync_seconds: float = 0.0
    # How often each replica asks the datastore for revocations newer than the last it saw: a
    # revoked access token is refused by every other replica within this interval.
    revocation_refresh_seconds: float = 1.0
    # The secret records and psychnotes present to read the revocation feed (revocations.py);
    # nobody else is answered. Development: generated under the data dir (tokens.feed_secret).
    revocations_secret: str = ""
    # Requests refused before parsing (431, 414, 408, malformed 400) recorded one by one per
    # window per process; beyond, counted into one summary record per window (refusals.py).
    refusal_audit_per_window: int = 60
    refusal_audit_window_seconds: float = 60.0
    # Shared with records (its MINDCHART_RECORDS_SUBSCRIPTION_GATEWAY_SECRET): authenticates
    # records' calls to /internal/subscriber, where it learns a subscriber's current grant.
    # Development: generated under <data dir>/keys/ when unset; production: unset = no Subscriptions.
    internal_secret: str = ""
    # Proxies whose X-Forwarded-For is believed (comma-separated addresses or CIDR blocks);
    # empty: the TCP peer is the client (forwarded.py).
    trusted_proxies: str = ""

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

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if self.signing_key_file is None:
            problems.append("MINDCHART_GATEWAY_SIGNING_KEY_FILE is not set (a key generated at start-up "
                            "is a development convenience)")
        if self.signing_kek_file is None:
            problems.append("MINDCHART_GATEWAY_SIGNING_KEK_FILE is not set (the signing keys in the "
                            "datastore are sealed under it)")
        if not self.revocations_secret:
            problems.append("MINDCHART_GATEWAY_REVOCATIONS_SECRET_FILE is not set (records and "
                            "psychnotes present it to follow the revocation feed)")

        return problems

    def signing_previous_kek_paths(self) -> list[Path]:
        return [Path(p.strip()) for p in self.signing_previous_kek_files.split(",") if p.strip()]

    def internal_secret_value(self) -> str:
        """The configured secret; in development a generated one; in production without one,
        empty: /internal/subscriber then refuses everyone (and records' Subscriptions stay off)."""
        if self.internal_secret or self.is_production:
            return self.internal_secret
        return development_secret(self.data_dir, "internal-records-gateway")

    def audit_chain_key(self) -> bytes | None:
        """KeyFileError naming the setting and path when the file cannot be read."""
        if self.audit_chain_key_file is None:
            return None
        return read_bytes(Path(self.audit_chain_key_file),
                          setting="MINDCHART_GATEWAY_AUDIT_CHAIN_KEY_FILE").strip()

    def audience_for(self, name: str) -> str:
        """Registered audience name (records|psychnotes) → the FHIR base URL tokens carry."""
        return {"records": self.records_base, "psychnotes": self.psychnotes_base}[name]
