"""`make run`'s `mindchart run`, as a developer meets it: start it, follow the instructions it
prints (the curl commands run in bash as printed; the SMART app sign-in in headless chromium),
then Ctrl-C. Nothing may be left running, and a second start seeds nothing twice."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import needs_chromium
from tests.conftest import free_port

SERVICES = ("gateway", "records", "psychnotes")
READY = "Ctrl-C stops everything."

pytestmark = needs_chromium


class Run:
    """`mindchart run` in its own process group (as a terminal runs it), its output collected."""

    def __init__(self, env: dict[str, str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mindchart"), "run"], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def welcome(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.process.poll() is None, "mindchart run exited:\n" + "\n".join(self.output)
                continue
            self.output.append(line)
            if line.strip() == READY:
                return "\n".join(self.output)
        raise AssertionError("no welcome within the timeout:\n" + "\n".join(self.output))

    def interrupt(self) -> int:
        """Ctrl-C in a terminal: SIGINT to the whole foreground process group. -1 if it had
        already stopped by itself (the caller shows the output)."""
        stopped_by_itself = self.process.poll() is not None
        if not stopped_by_itself:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            finally:
                if self.process.poll() is None:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
        time.sleep(0.5)  # the reader thread takes the last lines
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return -1 if stopped_by_itself else self.process.returncode


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ports = {f"MINDCHART_{name.upper()}_{kind}": str(free_port())
             for name in SERVICES for kind in ("PORT", "DB_PORT")}
    gateway = f"http://127.0.0.1:{ports['MINDCHART_GATEWAY_PORT']}"
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MINDCHART_")}, **ports,
            "MINDCHART_DATA_DIR": str(tmp_path_factory.mktemp("make-run-var")),
            "MINDCHART_GATEWAY_PUBLIC_URL": gateway}


def section(welcome: str, start: str, end: str) -> str:
    return welcome.split(start, 1)[1].split(end, 1)[0].strip()


def bash(script: str) -> str:
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def listening(port: str) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", int(port))) == 0


def follow_smart_sign_in(welcome: str, browser: Any, password: str) -> dict[str, Any]:
    steps = section(welcome, "Sign in to a SMART app", READY)
    authorize_url = re.search(r"1\. open (\S+)", steps)
    redirect = re.search(r"goes to\s+(\S+?)\?code=", steps)
    assert authorize_url and redirect, steps
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    arrived: list[str] = []

    def callback(route: Any) -> None:  # nothing listens there: the developer copies the code
        arrived.append(route.request.url)
        route.fulfill(status=200, content_type="text/html", body="<h1>code received</h1>")

    page.route(f"{redirect.group(1)}**", callback)
    page.goto(authorize_url.group(1))
    page.get_by_label("Username").fill("patient")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Allow access?").wait_for()
    page.get_by_role("button", name="Allow").click()
    page.get_by_role("heading", name="code received").wait_for()
    context.close()
    code = httpx.URL(arrived[0]).params["code"]
    exchange = steps.split("3. ", 1)[1].replace("CODE=<the code>", f"CODE={code}")
    return dict(json.loads(bash(exchange)))


def test_make_run_as_a_developer_meets_it(env: dict[str, str], browser: Any) -> None:
    first = Run(env)
    try:
        welcome = first.welcome()
        assert "demo resources created now: 0" not in welcome  # a fresh data dir is seeded

        note = json.loads(bash(section(welcome, "Get a token and read a progress note:", "Sign in to")))
        assert note["resourceType"] == "DocumentReference" and note["id"] == "demo-note-1"

        credentials = Path(env["MINDCHART_DATA_DIR"]) / "demo" / "credentials.json"
        assert str(credentials) in welcome
        passwords = json.loads(credentials.read_text())["users"]
        tokens = follow_smart_sign_in(welcome, browser, passwords["patient"])
        assert tokens["token_type"] == "Bearer" and tokens["patient"]
        fhir = f"{env['MINDCHART_GATEWAY_PUBLIC_URL']}/fhir"
        mine = httpx.get(f"{fhir}/Patient/{tokens['patient']}", timeout=30,
                         headers={"Authorization": f"Bearer {tokens['access_token']}"})
        assert mine.status_code == 200, mine.text
        # The note lifecycle in the demo data: a draft, a signed note with its addendum, a note
        # written by the trainee and co-signed by their supervisor (README "Progress notes").
        def notes(**params: str) -> list[dict[str, Any]]:
            found = httpx.get(f"{fhir}/DocumentReference", params=params, timeout=30,
                              headers={"Authorization": f"Bearer {tokens['access_token']}"})
            assert found.status_code == 200, found.text
            return [e["resource"] for e in found.json().get("entry", [])]
        by_id = {n["id"]: n for n in notes(patient=tokens["patient"], _count="50")}
        assert by_id["demo-note-4"]["docStatus"] == "preliminary"
        assert by_id["demo-note-5"]["docStatus"] == "final"
        assert by_id["demo-note-7"]["docStatus"] == "final"
        assert by_id["demo-note-7"]["author"] == [{"reference": "Practitioner/demo-trainee"}]
        assert by_id["demo-note-7"]["authenticator"] == {"reference": "Practitioner/demo-therapist"}
        with_addendum = notes(_id="demo-note-5", _revinclude="DocumentReference:relatesto")
        assert [n["id"] for n in with_addendum] == ["demo-note-5", "demo-note-6"]
        assert with_addendum[1]["docStatus"] == "final"
        # One open amendment request (45 CFR 164.526), the patient's own, owned by the author.
        requests = httpx.get(f"{fhir}/Task", timeout=30, params={
            "code": "https://mindchart.dev/fhir/CodeSystem/amendment|amendment-request"},
            headers={"Authorization": f"Bearer {tokens['access_token']}"})
        assert requests.status_code == 200, requests.text
        (request,) = [e["resource"] for e in requests.json()["entry"]]
        assert request["status"] == "requested" and request["for"] == {"reference": f"Patient/{tokens['patient']}"}
        assert request["focus"] == {"reference": "DocumentReference/demo-note-5"}
        assert request["owner"] == {"reference": "Practitioner/demo-therapist"}
    finally:
        assert first.interrupt() == 0, "\n".join(first.output)
    ports = [v for k, v in env.items() if k.endswith("PORT")]
    assert not [p for p in ports if listening(p)], "a service still answers after Ctrl-C"
    with pytest.raises(ProcessLookupError):  # no process of the group survived
        os.killpg(first.process.pid, 0)

    second = Run(env)
    try:
        assert "demo resources created now: 0" in second.welcome()
    finally:
        assert second.interrupt() == 0, "\n".join(second.output)
