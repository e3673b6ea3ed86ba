"""Subscription settings: environment variables prefixed MINDCHART_RECORDS_SUBSCRIPTION_."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from mindchart_core.settings import FileSecretSettings, development_secret


class SubscriptionSettings(FileSecretSettings):
    """Secrets (header_key, gateway_secret) may come from `*_FILE` twins, as every setting may."""

    model_config = SettingsConfigDict(env_prefix="MINDCHART_RECORDS_SUBSCRIPTION_", extra="ignore",
                                      populate_by_name=True)

    env: Literal["development", "production"] = Field(
        "development", validation_alias=AliasChoices("MINDCHART_ENV", "env"))
    data_dir: Path = Field(Path("var"), validation_alias=AliasChoices("MINDCHART_DATA_DIR", "data_dir"))
    # Delivery workers per replica; each claims one subscription at a time with a lease.
    workers: int = 2
    # A subscription's delivery lease: a worker that has not renewed it for this long is presumed
    # dead and any replica may take the subscription over (it resends what was not acknowledged).
    lease_seconds: float = 30.0
    # Idle workers look for due subscriptions this often (a write on this replica wakes them).
    poll_seconds: float = 0.5
    # Consecutive failed attempts (non-2xx, timeout, refused address) before the subscription is
    # set to `error`; between attempts the pause doubles from retry_base_seconds up to
    # retry_max_seconds. A client resumes an `error` subscription by updating it to `requested`.
    max_failures: int = 5
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    # Upper bound of one notification POST (the backport-timeout extension may ask for less).
    timeout_seconds: float = 10.0
    # Shortest heartbeat period accepted (backport-heartbeat-period), in seconds.
    min_heartbeat_seconds: int = 5
    # Notifications one claim delivers before the lease is given back (fairness between subscriptions).
    batch: int = 50
    # How long the gateway's answer about a subscriber's grant is reused.
    grant_cache_seconds: float = 2.0
    # Networks notifications may go to even though they are not public (comma-separated CIDRs);
    # by default only globally routable addresses (and loopback over http in development).
    allow_networks: str = ""
    # AES-256 key (base64 of 32 bytes) that encrypts channel.header values at rest.
    # Development: generated under <data dir>/keys/ when unset; production: unset = no Subscriptions.
    header_key: str = ""
    # Shared with the gateway's MINDCHART_GATEWAY_INTERNAL_SECRET (see gateway/subscribers.py).
    gateway_secret: str = ""

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    def header_key_bytes(self) -> bytes:
        encoded = self.header_key or development_secret(self.data_dir, "subscription-headers")
        key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        if len(key) != 32:
            raise ValueError("MINDCHART_RECORDS_SUBSCRIPTION_HEADER_KEY must be 32 bytes, base64")
        return key

    def gateway_secret_value(self) -> str:
        return self.gateway_secret or development_secret(self.data_dir, "internal-records-gateway")

    @property
    def enabled(self) -> bool:
        """Development always; production once both secrets are configured (else Subscription
        create/update answer 503 and no worker runs)."""
        return not self.is_production or bool(self.header_key and self.gateway_secret)
