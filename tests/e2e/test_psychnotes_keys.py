"""Psychnotes' key material: development keys generated once (0600), production refusing to start
without its own, and KEK rotation with `mindchart psychnotes rotate-key` re-wrapping data keys
without touching a single note ciphertext. Each vault here is an in-process psychnotes app on its
own database of the test stack's psychnotes datastore, trusting the stack's gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from starlette.testclient import TestClient

from mindchart_core import tokens
from psychnotes import keys
from psychnotes.app import create_app
from psychnotes.settings import PsychnotesSettings
from tests.actors import run_cli
from tests.conftest import RunningStack
from tests.e2e.test_psychnotes import (
    _CARE_TEAMS,
    care_team,
    fhir_user_of,
    headers,
    marker,
    note_text,
    parameters,
    psy_note,
    user_token,
)


def settings_for(live: RunningStack, db_name: str, data_dir: Path, **changes: Any) -> PsychnotesSettings:
    values: dict[str, Any] = {
        "mongo_url": live.config.mongo_url("psychnotes"), "db_name": db_name, "data_dir": data_dir,
        "public_base_url": live.psychnotes, "issuer": live.gateway_url,
        "jwks_url": f"{live.gateway_url}/oauth/jwks",
        "revocations_url": f"{live.gateway_url}/oauth/revocations",
        "revocations_secret": tokens.feed_secret("", data_dir=live.config.data_dir, production=False),
        # the stack's own psychnotes client (registered at the gateway) asks for care teams
        "token_url": f"{live.gateway_url}/oauth/token", "records_base_url": live.fhir,
        "records_client_key_file": live.config.data_dir / "keys" / "psychnotes-records-client.pem"}
    return PsychnotesSettings(**{**values, **changes})


@pytest.fixture
def db_name(live: RunningStack) -> Iterator[str]:
    name = f"psychnotes_keys_{uuid.uuid4().hex[:8]}"
    yield name
    live.db("psychnotes").client.drop_database(name)


class Vault:
    def __init__(self, client: TestClient, access: str, live: RunningStack) -> None:
        self.client, self.access, self.live = client, access, live

    def write(self, patient: str, text: str) -> str:
        author = fhir_user_of(self.access)
        if (self.live.gateway_url, patient, author) not in _CARE_TEAMS:
            care_team(self.live, patient, author)
        response = self.client.post("/psychnotes/fhir/DocumentReference", headers=headers(self.access),
                                    json=psy_note(patient, text))
        assert response.status_code == 201, response.text
        return response.headers["location"].split("/")[-3]

    def read(self, patient: str, note_id: str) -> Any:
        minted = self.client.post("/psychnotes/fhir/$consent-token", headers=headers(self.access), json=parameters(
            basis="originator-treatment", patient={"reference": f"Patient/{patient}"}))
        assert minted.status_code == 200, minted.text
        token = minted.json()["parameter"][0]["valueString"]
        return self.client.get(f"/psychnotes/fhir/DocumentReference/{note_id}",
                               headers=headers(self.access, token))


def kek_file(live: RunningStack, path: Path) -> str:
    result = run_cli(live.cli_env, "psychnotes", "new-kek", "--out", str(path))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text().strip())) == 32
    return str(json.loads(result.stdout)["kek"])


def test_rotate_key_rewraps_data_keys_without_touching_ciphertexts(
        live: RunningStack, tmp_path: Path, db_name: str) -> None:
    old_file, new_file = tmp_path / "old.kek", tmp_path / "new.kek"
    old_id, new_id = kek_file(live, old_file), kek_file(live, new_file)
    assert old_id != new_id
    refused = run_cli(live.cli_env, "psychnotes", "new-kek", "--out", str(old_file))
    assert refused.returncode == 2  # never overwrites a key
    access = user_token(live, "Practitioner/th-rotation")
    before, during = marker("rotation-before"), marker("rotation-during")

    with TestClient(create_app(settings_for(live, db_name, tmp_path, kek_file=old_file))) as client:
        vault = Vault(client, access, live)
        first = vault.write("rot-patient", before)
        assert note_text(vault.read("rot-patient", first).json()) == before
    raw = live.db("psychnotes").client[db_name]
    sealed_before = raw.notes.find_one({"_id": first})["sealed"]
    assert sealed_before["dek"]["kek"] == old_id

    # Step 1: the service learns the new KEK (new writes use it) and keeps the old one to read.
    both = settings_for(live, db_name, tmp_path, kek_file=new_file, previous_kek_files=str(old_file))
    with TestClient(create_app(both)) as client:
        vault = Vault(client, access, live)
        second = vault.write("rot-patient", during)
        assert note_text(vault.read("rot-patient", first).json()) == before
    assert raw.notes.find_one({"_id": second})["sealed"]["dek"]["kek"] == new_id

    # Step 2: re-wrap everything still under the old KEK.
    env = {**live.cli_env, "MINDCHART_PSYCHNOTES_MONGO_URL": live.config.mongo_url("psychnotes"),
           "MINDCHART_PSYCHNOTES_DB_NAME": db_name, "MINDCHART_DATA_DIR": str(tmp_path),
           "MINDCHART_PSYCHNOTES_KEK_FILE": str(old_file)}
    result = run_cli(env, "psychnotes", "rotate-key", "--new-kek-file", str(new_file))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kek"] == new_id
    assert report["rewrapped"] == {"notes": 1, "notes_history": 1}
    sealed_after = raw.notes.find_one({"_id": first})["sealed"]
    assert sealed_after["dek"]["kek"] == new_id
    assert bytes(sealed_after["ct"]) == bytes(sealed_before["ct"])  # the note was not re-encrypted
    assert bytes(sealed_after["nonce"]) == bytes(sealed_before["nonce"])
    assert bytes(sealed_after["dek"]["key"]) != bytes(sealed_before["dek"]["key"])
    assert {d["sealed"]["dek"]["kek"] for name in ("notes", "notes_history")
            for d in raw[name].find()} == {new_id}
    again = run_cli(env, "psychnotes", "rotate-key", "--new-kek-file", str(new_file))
    assert json.loads(again.stdout)["rewrapped"] == {}

    # Step 3: the old KEK is gone from the configuration; everything still opens.
    with TestClient(create_app(settings_for(live, db_name, tmp_path, kek_file=new_file))) as client:
        vault = Vault(client, access, live)
        assert note_text(vault.read("rot-patient", first).json()) == before
        assert note_text(vault.read("rot-patient", second).json()) == during
    # And the old KEK alone opens nothing any more: a vault given only it refuses to start,
    # naming both KEK ids (keys.check_vault_opens, the check its lifespan makes).
    assert_refused_with_only(settings_for(live, db_name, tmp_path, kek_file=old_file), new_id)


def assert_refused_with_only(settings: PsychnotesSettings, needed_kek: str) -> None:
    async def check() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_url)
        try:
            await keys.check_vault_opens(client[settings.db_name], keys.load_keyring(settings))
        finally:
            await client.close()

    with pytest.raises(keys.KeyConfigError) as refused:
        asyncio.run(check())
    assert needed_kek in str(refused.value) and "MINDCHART_PSYCHNOTES_KEK_FILE" in str(refused.value)


def test_rotate_key_refuses_when_an_old_kek_is_unknown(live: RunningStack, tmp_path: Path, db_name: str) -> None:
    old_file, new_file = tmp_path / "a.kek", tmp_path / "b.kek"
    kek_file(live, old_file)
    kek_file(live, new_file)
    with TestClient(create_app(settings_for(live, db_name, tmp_path, kek_file=old_file))) as client:
        Vault(client, user_token(live, "Practitioner/th-rotation"), live).write("rot-2", marker("rot-2"))
    env = {**live.cli_env, "MINDCHART_PSYCHNOTES_MONGO_URL": live.config.mongo_url("psychnotes"),
           "MINDCHART_PSYCHNOTES_DB_NAME": db_name, "MINDCHART_DATA_DIR": str(tmp_path / "elsewhere"),
           "MINDCHART_PSYCHNOTES_KEK_FILE": str(new_file)}
    result = run_cli(env, "psychnotes", "rotate-key", "--new-kek-file", str(new_file))
    assert result.returncode == 2 and "KEK" in result.stderr


def test_development_keys_are_generated_once_with_mode_0600(live: RunningStack, tmp_path: Path) -> None:
    settings = settings_for(live, "unused", tmp_path)
    create_app(settings)
    kek = tmp_path / "keys" / "psychnotes-kek"
    pem = tmp_path / "keys" / "psychnotes-consent-signing.pem"
    for path in (kek, pem):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = (kek.read_bytes(), pem.read_bytes())
    create_app(settings)
    assert (kek.read_bytes(), pem.read_bytes()) == first


def test_production_refuses_to_start_without_its_own_keys(live: RunningStack, tmp_path: Path) -> None:
    settings = settings_for(live, "unused", tmp_path, env="production",
                            mongo_url="mongodb://psychnotes:a-long-db-password@mongo.internal:27017/")
    with pytest.raises(RuntimeError) as refused:
        create_app(settings)
    assert "KEK_FILE" in str(refused.value) and "SIGNING_KEY_FILE" in str(refused.value)
    assert not (tmp_path / "keys").exists()
