"""The `mindchart` CLI off the default ports, with no stack running: one public-URL rule shared
with `make run` (stack.StackConfig.public_gateway_url), and the temporary datastore a command
starts listens on the configured MINDCHART_GATEWAY_DB_PORT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mindchart_cli import stack
from tests.actors import run_cli
from tests.conftest import free_port


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No MongoDB URL configured: the command starts its own embedded datastore."""
    return {"MINDCHART_DATA_DIR": str(tmp_path), "MINDCHART_GATEWAY_MONGO_URL": "",
            "MINDCHART_GATEWAY_DB_PORT": str(free_port()), **extra}


def test_launch_create_prints_the_url_make_run_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    env = cli_env(tmp_path, MINDCHART_GATEWAY_PORT=str(port), MINDCHART_GATEWAY_PUBLIC_URL="")
    minted = run_cli(env, "launch", "create", "--patient", "Patient/p-1", "--launch-url",
                     "https://app.example/launch")
    assert minted.returncode == 0, minted.stderr
    launch = json.loads(minted.stdout)
    assert launch["iss"] == f"http://127.0.0.1:{port}/fhir"
    assert launch["launch_url"].startswith("https://app.example/launch?iss=http")
    # `make run` under the same environment gives the gateway and records that very base.
    monkeypatch.setenv("MINDCHART_GATEWAY_PORT", str(port))
    monkeypatch.delenv("MINDCHART_GATEWAY_PUBLIC_URL", raising=False)
    config = stack.StackConfig.from_env()
    assert config.service_env("gateway")["MINDCHART_GATEWAY_PUBLIC_URL"] == f"http://127.0.0.1:{port}"
    assert config.service_env("records")["MINDCHART_RECORDS_PUBLIC_BASE_URL"] == launch["iss"]
    # An explicit public URL wins for both.
    public = "https://mindchart.example"
    minted = run_cli({**env, "MINDCHART_GATEWAY_PUBLIC_URL": public}, "launch", "create", "--patient", "p-2")
    assert json.loads(minted.stdout)["iss"] == f"{public}/fhir"
    monkeypatch.setenv("MINDCHART_GATEWAY_PUBLIC_URL", public)
    config = stack.StackConfig.from_env()
    assert config.service_env("records")["MINDCHART_RECORDS_ISSUER"] == public
    assert config.service_env("records")["MINDCHART_RECORDS_JWKS_URL"] == f"http://127.0.0.1:{port}/oauth/jwks"


def test_a_command_starts_its_datastore_on_the_configured_db_port(tmp_path: Path) -> None:
    """Before: the temporary server started on the default port and the command then waited 30 s
    for the configured one, and failed."""
    env = cli_env(tmp_path)
    created = run_cli(env, "user", "create", "--username", "ports-admin", "--password",
                      "a long enough passphrase 9", "--role", "admin")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["username"] == "ports-admin"
    rotated = run_cli(env, "key", "rotate")  # a second command on the same datastore files
    assert rotated.returncode == 0, rotated.stderr
    # The temporary server is gone again when the command ends.
    assert not stack.mongo_answers(f"mongodb://127.0.0.1:{env['MINDCHART_GATEWAY_DB_PORT']}/?directConnection=true")
