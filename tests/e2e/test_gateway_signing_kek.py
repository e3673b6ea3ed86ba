"""The gateway's signing keys sealed under its KEK, seen from outside (issue 12, "Also found"):
real gateway processes (uvicorn, as `make run` and the Dockerfile start them) on the stack's
gateway datastore, each in a database of its own.

- a key stored in clear before the KEK existed is sealed at start-up and keeps signing;
- what the datastore holds decodes to no private RSA parameter;
- restarted with the KEK, tokens issued before still introspect as active;
- `mindchart key rotate` seals the new key; new tokens carry it, old ones still verify;
- a gateway given another KEK refuses to start, in one line naming the setting and both KEK
  ids, no traceback; `key rotate` without a KEK in production refuses too;
- the KEK rotates: `key new-kek`, then two replicas started at once with the new KEK and the old
  one in SIGNING_PREVIOUS_KEK_FILES re-seal every key once between them; tokens signed before
  still verify; `key kek-status` says when the old file can go; the old KEK alone is refused.
"""

from __future__ import annotations

import base64
import json
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

    def __init__(self, live: RunningStack, tmp: Path, db_name: str | None = None,
                 kek_files: dict[str, Path] | None = None, public_url: str | None = None) -> None:
        self.live, self.port = live, free_port()
        self.db_name = db_name or f"gw_kek_{uuid.uuid4().hex[:8]}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.public_url = public_url or self.url  # replicas share one issuer
        self.process: subprocess.Popen[str] | None = None
        self.mongo: MongoClient[dict[str, Any]] = MongoClient(live.config.mongo_url("gateway"),
                                                              tz_aware=True)
        self.tmp = tmp
        if kek_files is None:
            kek_files = {}
            for name in ("right", "wrong"):
                path = tmp / f"{name}-kek"
                path.write_bytes(base64.b64encode(sealing.new_key()) + b"\n")
                kek_files[name] = path
        self.kek_files = kek_files
        self.previous: list[str] = []

    def replica(self) -> Gateway:
        """Another gateway process on its own port, the same database and KEK files."""
        return Gateway(self.live, self.tmp, self.db_name, self.kek_files, self.public_url)

    @property
    def db(self) -> Any:
        return self.mongo[self.db_name]

    def env(self, kek: str, previous: tuple[str, ...] = ()) -> dict[str, str]:
        return {**self.live.cli_env, "MINDCHART_GATEWAY_DB_NAME": self.db_name,
                "MINDCHART_GATEWAY_PORT": str(self.port), "MINDCHART_GATEWAY_PUBLIC_URL": self.public_url,
                "MINDCHART_GATEWAY_SIGNING_KEK_FILE": str(self.kek_files[kek]),
                "MINDCHART_GATEWAY_SIGNING_PREVIOUS_KEK_FILES": ",".join(
                    str(self.kek_files[name]) for name in previous)}

    def start(self, kek: str, previous: tuple[str, ...] = ()) -> subprocess.Popen[str]:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "gateway.app:create_app", "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            env={**os.environ, **self.env(kek, previous)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
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

    def stop(self) -> str:
        """Stop the process; what it printed."""
        if self.process is None:
            return ""
        if self.process.poll() is None:
            self.process.terminate()
        said, _ = self.process.communicate(timeout=30)
        return said or ""

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


def resealed_count(said: str) -> int:
    """What a gateway's JSON log says it re-sealed at start-up (keys.reseal)."""
    total = 0
    for line in said.splitlines():
        if line.startswith("{") and "sealed again under the current KEK" in line:
            total += int(json.loads(line)["resealed"])
    return total


def test_the_kek_rotates_under_two_replicas_and_tokens_signed_before_still_verify(
        gateway: Gateway) -> None:
    created = run_cli(gateway.env("right"), "client", "create", "--id", CLIENT, "--auth",
                      "client_secret", "--secret", SECRET, "--scope", "system/Patient.rs")
    assert created.returncode == 0, created.stderr
    gateway.start("right")
    gateway.wait_ready()
    rotated_signing_key = run_cli(gateway.env("right"), "key", "rotate")  # two keys to re-seal
    assert rotated_signing_key.returncode == 0, rotated_signing_key.stderr
    before = gateway.token()
    gateway.stop()
    kids = {d["_id"] for d in gateway.db.signing_keys.find({})}
    assert len(kids) == 2

    # The operator's procedure (README "Rotating the gateway's KEK").
    new_file = gateway.tmp / "new-kek"
    made = run_cli(gateway.env("right"), "key", "new-kek", "--out", str(new_file))
    assert made.returncode == 0, made.stderr
    gateway.kek_files["new"] = new_file
    new, old = (keyfiles.read_kek(gateway.kek_files[n]) for n in ("new", "right"))
    assert json.loads(made.stdout)["kek"] == keys.kek_id(new) and oct(new_file.stat().st_mode)[-3:] == "600"
    waiting = run_cli(gateway.env("new", ("right",)), "key", "kek-status")
    assert waiting.returncode == 1, waiting.stdout + waiting.stderr
    assert keys.kek_id(old) in waiting.stderr and all(kid in waiting.stderr for kid in kids)
    assert "Traceback" not in waiting.stderr

    second = gateway.replica()
    for replica in (gateway, second):  # both at once, as a rolling update may start them
        replica.start("new", ("right",))
    for replica in (gateway, second):
        replica.wait_ready()
    for replica in (gateway, second):  # the token signed under the old KEK's key verifies
        assert replica.introspect(before)["active"] is True
    after = second.token()
    assert gateway.introspect(after)["active"] is True
    stored = list(gateway.db.signing_keys.find({}))
    assert {d["_id"] for d in stored} == kids  # the same keys, none added or lost
    for doc in stored:
        assert doc["sealed"]["kek"] == keys.kek_id(new)
        assert_no_private_material(doc, keys.open_private_jwk(new, doc))
        with pytest.raises(keys.KeyConfigError):  # the old KEK alone no longer opens them
            keys.open_private_jwk(old, doc)
    done = run_cli(gateway.env("new", ("right",)), "key", "kek-status")
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert status["previous_keks_still_needed"] == {} and status["not_under_current_kek"] == []
    logs = gateway.stop() + second.stop()
    assert resealed_count(logs) == 2, logs  # each key re-sealed once between the two replicas

    # The old file can go: the new KEK alone starts, and the old tokens still verify.
    gateway.start("new")
    gateway.wait_ready()
    assert gateway.introspect(before)["active"] is True
    gateway.stop()
    # A gateway still given only the old KEK refuses, in one line naming both KEK ids.
    refused = gateway.start("right")
    refused.wait(timeout=120)
    said = gateway.output()
    assert refused.returncode != 0
    assert "refusing to start" in said and keys.kek_id(new) in said and keys.kek_id(old) in said
    assert "Traceback" not in said, said
