"""The gateway's signing keys sealed under its KEK, seen from outside (issue 12, "Also found"):
real gateway processes (uvicorn, as `make run` and the Dockerfile start them) on the stack's
gateway datastore, each in a database of its own.

- a key stored in clear before the KEK existed is sealed at start-up and keeps signing;
- what the datastore holds decodes to no private RSA parameter;
- restarted with the KEK, tokens issued before still introspect as active;
- `mindchart key rotate` seals the new key; new tokens carry it, old ones still verify;
- a gateway given another KEK refuses to start, in one line naming the setting and both KEK
  ids, no traceback; `key rotate` without a KEK in production refuses too.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from pymongo import MongoClient

from gateway import keys
from mindchart_core import keyfiles, sealing
from tests.actors import run_cli
from tests.conftest import RunningStack, free_port

CLIENT, SECRET = "kek-client", secrets.token_urlsafe(24)


class Gateway:
    """One gateway process at a time on its own port and database."""

    def __init__(self, live: RunningStack, tmp: Path) -> None:
        self.live, self.port, self.db_name = live, free_port(), f"gw_kek_{uuid.uuid4().hex[:8]}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None
        self.mongo: MongoClient[dict[str, Any]] = MongoClient(live.config.mongo_url("gateway"),
                                                              tz_aware=True)
        self.kek_files = {}
        for name in ("right", "wrong"):
            path = tmp / f"{name}-kek"
            path.write_bytes(base64.b64encode(sealing.new_key()) + b"\n")
            self.kek_files[name] = path

    @property
    def db(self) -> Any:
        return self.mongo[self.db_name]

    def env(self, kek: str) -> dict[str, str]:
        return {**self.live.cli_env, "MINDCHART_GATEWAY_DB_NAME": self.db_name,
                "MINDCHART_GATEWAY_PORT": str(self.port), "MINDCHART_GATEWAY_PUBLIC_URL": self.url,
                "MINDCHART_GATEWAY_SIGNING_KEK_FILE": str(self.kek_files[kek])}

    def start(self, kek: str) -> subprocess.Popen[str]:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "gateway.app:create_app", "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            env={**os.environ, **self.env(kek)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        return self.process

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the gateway did not become ready")

    def output(self) -> str:
        assert self.process is not None
        if self.process.poll() is None:
            return ""
        return self.process.stdout.read() if self.process.stdout else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def token(self) -> str:
        response = httpx.post(f"{self.url}/oauth/token", auth=(CLIENT, SECRET), data={
            "grant_type": "client_credentials", "scope": "system/Patient.rs"})
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def introspect(self, token: str) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/oauth/introspect", auth=(CLIENT, SECRET),
                              data={"token": token})
        assert response.status_code == 200, response.text
        return dict(response.json())

    def jwks(self) -> KeySet:
        return KeySet.import_key_set(httpx.get(f"{self.url}/oauth/jwks").json())


@pytest.fixture
def gateway(live: RunningStack, tmp_path: Path) -> Iterator[Gateway]:
    running = Gateway(live, tmp_path)
    yield running
    running.stop()
    running.mongo.drop_database(running.db_name)
    running.mongo.close()


def assert_no_private_material(raw: dict[str, Any], private: dict[str, Any]) -> None:
    blob = repr(raw).encode()
    for name in ("d", "p", "q", "dp", "dq", "qi"):
        scalar = base64.urlsafe_b64decode(private[name] + "=" * (-len(private[name]) % 4))
        for form in (private[name].encode(), scalar, scalar.hex().encode(), base64.b64encode(scalar)):
            assert form not in blob, f"the private parameter {name} is readable in the datastore"
    assert "jwk" not in raw and "d" not in raw["public"]


def test_a_clear_key_is_sealed_at_start_up_and_tokens_survive_restart_and_rotation(
        gateway: Gateway) -> None:
    # A key as a gateway before the KEK stored it: the private JWK in clear.
    legacy_kid, legacy = keys.new_private_jwk()
    gateway.db.signing_keys.insert_one({"_id": legacy_kid, "jwk": legacy, "created": datetime.now(UTC),
                                        "retired": False})
    created = run_cli(gateway.env("right"), "client", "create", "--id", CLIENT, "--auth",
                      "client_secret", "--secret", SECRET, "--scope", "system/Patient.rs")
    assert created.returncode == 0, created.stderr
    gateway.start("right")
    gateway.wait_ready()
    before = gateway.token()
    assert jwt.decode(before, gateway.jwks()).header["kid"] == legacy_kid  # the same key signs
    [raw] = gateway.db.signing_keys.find({})
    assert_no_private_material(raw, legacy)  # sealed at start-up, clear copy gone
    RSAKey.import_key(raw["public"])  # the public half is all a datastore reader gets

    gateway.stop()
    gateway.start("right")
    gateway.wait_ready()
    assert gateway.introspect(before)["active"] is True  # tokens verify across the restart

    rotated = run_cli(gateway.env("right"), "key", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    deadline = time.monotonic() + 30
    while (after := gateway.token()) and jwt.decode(after, gateway.jwks()).header["kid"] == legacy_kid:
        assert time.monotonic() < deadline, "the rotated key never signed"
        time.sleep(0.5)
    assert gateway.introspect(before)["active"] is True and gateway.introspect(after)["active"] is True
    right = keyfiles.read_kek(gateway.kek_files["right"])
    for stored in gateway.db.signing_keys.find({}):
        assert_no_private_material(stored, keys.open_private_jwk(right, stored))


def test_a_gateway_given_another_kek_refuses_to_start_in_one_line(gateway: Gateway) -> None:
    right = keyfiles.read_kek(gateway.kek_files["right"])
    kid, private = keys.new_private_jwk()
    gateway.db.signing_keys.insert_one({"_id": kid, **keys.seal_private_jwk(right, kid, private),
                                        "created": datetime.now(UTC), "retired": False})
    refused = gateway.start("wrong")
    refused.wait(timeout=120)
    said = gateway.output()
    assert refused.returncode != 0
    assert "refusing to start" in said and "MINDCHART_GATEWAY_SIGNING_KEK_FILE" in said, said
    wrong = keyfiles.read_kek(gateway.kek_files["wrong"])
    assert keys.kek_id(right) in said and keys.kek_id(wrong) in said, said
    assert "Traceback" not in said, said
    assert gateway.db.signing_keys.count_documents({}) == 1  # nothing new stored
    without_kek = run_cli({k: v for k, v in gateway.env("right").items()
                           if k != "MINDCHART_GATEWAY_SIGNING_KEK_FILE"} | {"MINDCHART_ENV": "production"},
                          "key", "rotate")
    assert without_kek.returncode == 2, without_kek.stderr
    assert "SIGNING_KEK_FILE" in without_kek.stderr and "Traceback" not in without_kek.stderr
    assert gateway.db.signing_keys.count_documents({}) == 1
