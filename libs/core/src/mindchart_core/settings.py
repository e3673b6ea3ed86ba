"""Settings base shared by every service: pydantic-settings, one env prefix per service.

Values with a `*_FILE` twin (e.g. MINDCHART_RECORDS_MONGO_URL_FILE) are read from that file, so
secrets can come from Docker/Kubernetes secret mounts instead of the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mindchart_core.keyfiles import read_bytes

WEAK_PASSWORDS = frozenset({"password", "changeme", "change-me", "secret", "mongo", "mongodb", "admin",
                            "example", "demo", "mindchart", "letmein", "123456"})
EMBEDDED_PORTS = frozenset({27117, 27118, 27119})


class UnsafeConfiguration(RuntimeError):
    """Production start-up refused: the message lists every problem found."""


class FileSecretSettings(BaseSettings):
    """Settings whose every field may come from a `<PREFIX><NAME>_FILE` twin (a secret mount)."""

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, values: Any) -> Any:
        prefix = cls.model_config.get("env_prefix", "")
        if not isinstance(values, dict):
            return values
        for name in cls.model_fields:
            path = os.environ.get(f"{prefix}{name.upper()}_FILE")
            if path and name not in values:
                # A missing or unreadable mount refuses start-up naming the setting and the path
                # (keyfiles.KeyFileError), never the file's content.
                values[name] = read_bytes(Path(path), setting=f"{prefix}{name.upper()}_FILE"
                                          ).decode(errors="replace").strip()
        return values


class ServiceSettings(FileSecretSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    env: Literal["development", "production"] = Field(
        "development", validation_alias=AliasChoices("MINDCHART_ENV", "env")
    )
    log_level: str = Field("INFO", validation_alias=AliasChoices("MINDCHART_LOG_LEVEL", "log_level"))
    data_dir: Path = Field(
        Path("var"), validation_alias=AliasChoices("MINDCHART_DATA_DIR", "data_dir")
    )
    host: str = "127.0.0.1"
    port: int = 8000
    mongo_url: str = "mongodb://127.0.0.1:27017"
    db_name: str = "mindchart"
    max_body_bytes: int = 1024 * 1024
    # Every datastore call (server selection, connect, each operation or transaction) is bounded
    # by this: a frozen or unreachable datastore costs a request at most this long, then 503.
    mongo_timeout_seconds: float = 5.0
    # A pooled datastore connection idle this long is closed by the service before its next use
    # (PyMongo maxIdleTimeMS). Below the datastore's own idle cut-off: SecantusDB drops a client
    # connection idle for 300 s (secantus/server.py DEFAULT_CLIENT_IDLE_TIMEOUT_S), and the async
    # driver only learns of that on the next command on it; inside a transaction that is not
    # retried, so a vault idle for five minutes answered its next note write 503. PyMongo's guide
    # (mongodb.com/docs/languages/python/pymongo-driver/current/connect/connection-options/
    # connection-pools): maxIdleTimeMS "lower than firewall or proxy connection timeouts".
    mongo_max_idle_seconds: float = 60.0

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    def production_problems(self) -> list[str]:
        """What makes this configuration unfit for production (services add their own checks)."""
        problems: list[str] = []
        parts = urlsplit(self.mongo_url)
        if not parts.password:
            problems.append("the MongoDB URL carries no credentials")
        elif parts.password.lower() in WEAK_PASSWORDS or len(parts.password) < 12:
            problems.append("the MongoDB password is a default or too short (12+ characters)")
        if parts.hostname in ("127.0.0.1", "localhost") and parts.port in EMBEDDED_PORTS:
            problems.append("the MongoDB URL points at an embedded development datastore")
        return problems

    def refuse_unsafe_production(self) -> None:
        """Stop start-up in production with demo keys or default secrets (README, Configuration)."""
        if not self.is_production:
            return
        problems = self.production_problems()
        if problems:
            raise UnsafeConfiguration("refusing to start in production: " + "; ".join(problems))


def development_secret(data_dir: Path, name: str, nbytes: int = 32) -> str:
    """A random secret shared by the services of one development machine (base64url), kept at
    `<data_dir>/keys/<name>` (mode 0600) and created by whichever service asks first. The file is
    written whole under a temporary name and linked into place, so a service starting at the same
    moment reads either nothing (and links its own) or the complete secret, never half of one.
    Production configures secrets explicitly (`*_FILE` settings) and never calls this."""
    import base64
    import secrets as random_source

    folder = data_dir / "keys"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if not target.exists():
        draft = folder / f".{name}.{os.getpid()}.{random_source.token_hex(4)}"
        draft.write_text(base64.urlsafe_b64encode(random_source.token_bytes(nbytes)).decode())
        draft.chmod(0o600)
        try:
            os.link(draft, target)
        except FileExistsError:
            pass  # another service created it first: use theirs
        finally:
            draft.unlink()
    return target.read_text().strip()
