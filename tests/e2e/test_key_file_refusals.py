"""A key file that is missing, unreadable, the wrong length, not base64 or not the KEK the data
needs ends a service's start-up with one line naming the setting and the path (never a byte of
the key), a non-zero exit status and no traceback.

- One real service process per service (`uvicorn --factory <service>.app:create_app`, as the
  images and `mindchart run` start them), stderr read; they run at once, each with a data dir of
  its own and its datastore on a closed port (key files are read before any datastore is).
- Every other case through the same entry, `create_app()` from the environment, in this process
  (a process each would cost seconds of imports apiece on a shared machine): SystemExit with the
  one line uvicorn then prints.
- A KEK that opens none of the stored keys, which needs a datastore: psychnotes here, on the test
  stack's psychnotes datastore (the gateway's is test_gateway_signing_kek.py).
"""

from __future__ import annotations

import base64
import importlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mindchart_core import keyfiles, sealing
from psychnotes import keys as psychnotes_keys
from psychnotes import vault
from tests.conftest import RunningStack, free_port
from tests.replicas import wait_ready

SERVICES = {"gateway", "records", "psychnotes", "workspace"}
SECRET_BYTES = base64.b64encode(b"k" * 16)  # a recognisable KEK of the wrong length


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def kek_file(path: Path) -> Path:
    return write(path, base64.b64encode(sealing.new_key()) + b"\n")


def p256_pem(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    return write(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))


@dataclass(frozen=True)
class Case:
    service: str
    setting: str  # the variable the refusal must name
    make: Callable[[Path], Path]  # writes the bad file (or not) and returns its path
    value: Callable[[Path], str] = str  # what the setting is set to
    extra: tuple[tuple[str, str], ...] = ()


CASES: dict[str, Case] = {
    "psychnotes KEK missing": Case("psychnotes", "MINDCHART_PSYCHNOTES_KEK_FILE",
                                   lambda d: d / "absent-kek"),
    "psychnotes KEK not base64": Case("psychnotes", "MINDCHART_PSYCHNOTES_KEK_FILE",
                                      lambda d: write(d / "kek", b"not base64 at all!\n")),
    "psychnotes KEK wrong length": Case("psychnotes", "MINDCHART_PSYCHNOTES_KEK_FILE",
                                        lambda d: write(d / "kek", SECRET_BYTES + b"\n")),
    "psychnotes KEK unreadable (a directory)": Case(
        "psychnotes", "MINDCHART_PSYCHNOTES_KEK_FILE", lambda d: (d / "kek-dir").mkdir() or d / "kek-dir"),
    "psychnotes previous KEK missing": Case(
        "psychnotes", "MINDCHART_PSYCHNOTES_PREVIOUS_KEK_FILES", lambda d: d / "old-kek",
        extra=(("MINDCHART_PSYCHNOTES_KEK_FILE", "kek"),)),
    "psychnotes consent-token key not a PEM key": Case(
        "psychnotes", "MINDCHART_PSYCHNOTES_SIGNING_KEY_FILE",
        lambda d: write(d / "signing.pem", SECRET_BYTES)),
    "records signing key missing": Case("records", "MINDCHART_RECORDS_SIGNING_KEY_FILE",
                                        lambda d: d / "absent.pem"),
    "records CDex key on the wrong curve": Case(
        "records", "MINDCHART_RECORDS_CDEX_CLIENT_KEY_FILE", lambda d: p256_pem(d / "cdex.pem")),
    "gateway KEK missing": Case("gateway", "MINDCHART_GATEWAY_SIGNING_KEK_FILE",
                                lambda d: d / "absent-kek"),
    "gateway previous KEK wrong length": Case(
        "gateway", "MINDCHART_GATEWAY_SIGNING_PREVIOUS_KEK_FILES",
        lambda d: write(d / "old-kek", SECRET_BYTES), extra=(("MINDCHART_GATEWAY_SIGNING_KEK_FILE", "kek"),)),
    "gateway signing key not a PEM key": Case(
        "gateway", "MINDCHART_GATEWAY_SIGNING_KEY_FILE", lambda d: write(d / "signing.pem", SECRET_BYTES)),
    "gateway audit-chain key missing": Case("gateway", "MINDCHART_GATEWAY_AUDIT_CHAIN_KEY_FILE",
                                            lambda d: d / "absent-chain-key"),
    "gateway datastore URL secret missing": Case("gateway", "MINDCHART_GATEWAY_MONGO_URL_FILE",
                                                 lambda d: d / "absent-url"),
    "workspace client secret missing": Case("workspace", "MINDCHART_WORKSPACE_CLIENT_SECRET_FILE",
                                            lambda d: d / "absent-secret"),
}


def service_env(data_dir: Path) -> dict[str, str]:
    """The process environment without any MINDCHART_ setting of the caller's, a data dir of its
    own, and every datastore on a closed port (nothing here may reach one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINDCHART_")}
    closed = f"mongodb://127.0.0.1:{free_port()}/?directConnection=true"
    env |= {"MINDCHART_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    for name in SERVICES:
        env |= {f"MINDCHART_{name.upper()}_MONGO_URL": closed,
                f"MINDCHART_{name.upper()}_MONGO_TIMEOUT_SECONDS": "1"}
    return env


def start(service: str, env: dict[str, str], port: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", f"{service}.app:create_app", "--host",
         "127.0.0.1", "--port", str(port or free_port()), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_refused_in_one_line(process: subprocess.Popen[str], setting: str, path: str,
                               secret: bytes = SECRET_BYTES) -> str:
    out, err = process.communicate(timeout=120)
    assert process.returncode not in (0, None), err
    assert "Traceback" not in err + out, err
    lines = [line for line in err.splitlines() if "refusing to start" in line]
    assert len(lines) == 1, err
    assert setting in lines[0] and path in lines[0], lines[0]
    assert secret.decode() not in err + out  # what the file holds is never said
    return lines[0]


IN_A_PROCESS = ("psychnotes KEK missing", "records signing key missing",
                "gateway previous KEK wrong length", "workspace client secret missing")


def case_env(case: Case, data_dir: Path) -> tuple[dict[str, str], Path]:
    bad = case.make(data_dir)
    env = service_env(data_dir)
    if case.setting.endswith("_MONGO_URL_FILE"):
        env.pop(case.setting.removesuffix("_FILE"))
    for setting, file_name in case.extra:
        env[setting] = str(kek_file(data_dir / file_name))
    env[case.setting] = case.value(bad)
    return env, bad


def test_each_service_process_refuses_a_bad_key_file_in_one_line(tmp_path: Path) -> None:
    started = {}
    for name in IN_A_PROCESS:
        data_dir = tmp_path / uuid.uuid4().hex[:8]
        data_dir.mkdir()
        env, bad = case_env(CASES[name], data_dir)
        started[name] = (start(CASES[name].service, env), CASES[name], bad)
    try:
        for name, (process, case, bad) in started.items():
            try:
                assert_refused_in_one_line(process, case.setting, str(bad))
            except (AssertionError, subprocess.TimeoutExpired) as failed:
                raise AssertionError(f"{name}: {failed}") from None
    finally:
        for process, _, _ in started.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.mark.parametrize("name", [n for n in CASES if n not in IN_A_PROCESS])
def test_create_app_from_the_environment_refuses_a_bad_key_file_in_one_line(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    env, bad = case_env(case, tmp_path)
    for variable in [k for k in os.environ if k.startswith("MINDCHART_")]:
        monkeypatch.delenv(variable)
    for variable, value in env.items():
        if variable.startswith("MINDCHART_"):
            monkeypatch.setenv(variable, value)
    create_app = importlib.import_module(f"{case.service}.app").create_app
    with pytest.raises(SystemExit) as refused:
        create_app()
    said = str(refused.value.code)
    assert said.startswith("refusing to start: ") and "\n" not in said, said
    assert case.setting in said and str(bad) in said, said
    assert SECRET_BYTES.decode() not in said


def test_production_without_its_key_files_refuses_in_one_line(tmp_path: Path) -> None:
    env = service_env(tmp_path) | {
        "MINDCHART_ENV": "production",
        "MINDCHART_PSYCHNOTES_MONGO_URL": "mongodb://psychnotes:Q8v-x2LmP0rT9zK@mongo.internal:27017/"}
    line = assert_refused_in_one_line(start("psychnotes", env), "MINDCHART_PSYCHNOTES_KEK_FILE",
                                      "is not set")
    assert "MINDCHART_PSYCHNOTES_SIGNING_KEY_FILE" in line
    assert not (tmp_path / "keys").exists()  # refused before generating anything


def test_psychnotes_given_a_kek_that_wraps_none_of_its_data_keys_refuses_in_one_line(
        live: RunningStack, tmp_path: Path) -> None:
    right, wrong = kek_file(tmp_path / "right-kek"), kek_file(tmp_path / "wrong-kek")
    keyring = psychnotes_keys.load_keyring(psychnotes_keys.PsychnotesSettings(kek_file=right))
    db_name = f"psychnotes_refusal_{uuid.uuid4().hex[:8]}"
    client = live.db("psychnotes").client
    note_id = uuid.uuid4().hex
    binding = vault.Binding("DocumentReference", note_id, 1, "refusal-patient")
    client[db_name].notes.insert_one({"_id": note_id, "vid": 1, "patient": "refusal-patient",
                                      "sealed": vault.seal(keyring, {"id": note_id}, binding)})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **live.config.service_env("psychnotes"),
           "MINDCHART_PSYCHNOTES_DB_NAME": db_name}
    try:
        line = assert_refused_in_one_line(
            start("psychnotes", env | {"MINDCHART_PSYCHNOTES_KEK_FILE": str(wrong)}),
            "MINDCHART_PSYCHNOTES_KEK_FILE", keyring.current_id)
        assert psychnotes_keys.kek_id(keyfiles.read_kek(wrong)) in line
        # The same vault with the right KEK as a previous one starts: only unknown KEKs refuse.
        port = free_port()
        rotating = start("psychnotes", env | {"MINDCHART_PSYCHNOTES_KEK_FILE": str(wrong),
                                              "MINDCHART_PSYCHNOTES_PREVIOUS_KEK_FILES": str(right)},
                         port)
        try:
            wait_ready(f"http://127.0.0.1:{port}", rotating, "psychnotes with both KEKs", within=90,
                       exited=lambda: rotating.communicate()[1])
        finally:
            rotating.terminate()
            rotating.communicate(timeout=30)
    finally:
        client.drop_database(db_name)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_an_unreadable_kek_file_is_named(tmp_path: Path) -> None:
    bad = kek_file(tmp_path / "kek")
    bad.chmod(0)
    env = service_env(tmp_path) | {"MINDCHART_PSYCHNOTES_KEK_FILE": str(bad)}
    line = assert_refused_in_one_line(start("psychnotes", env), "MINDCHART_PSYCHNOTES_KEK_FILE", str(bad))
    assert "permission denied" in line
