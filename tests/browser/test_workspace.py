"""The therapist's workspace in a real browser (Debian's chromium driven by Playwright) against the
real stack: sign in through the gateway, choose a patient, write a DAP note from the template, pin
an intervention, insert a saved phrase, score a PHQ-9, save, reload, sign, add an addendum, write
a private note; then check through the FHIR APIs what landed where. axe-core (from npm, installed
by tests/js/package.json) runs on every page; screenshots of every page go to
var/screenshots/workspace/. Attack tests at the end: tokens never reach the browser, forms need
their CSRF token, one therapist's cookie opens only their own caseload and pins.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.actors import create_user, sensitive
from tests.browser.conftest import needs_chromium
from tests.conftest import RunningStack

JS_DIR = Path(__file__).resolve().parents[1] / "js"
SHOTS = Path(__file__).resolve().parents[2] / "var" / "screenshots" / "workspace"
PASSWORD = sensitive("workspace therapist passphrase 19")
PHRASE = "Patient engaged well and completed the between-session practice."
PRIVATE = sensitive(f"private impression {uuid.uuid4().hex[:8]}: transference shows up around the father")
DATA = "Client reports two panic episodes this week, both at the supermarket."
ASSESSMENT = "Panic symptoms persist but avoidance is decreasing."
PLAN = "Continue graded exposure; review the hierarchy next week."

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def axe_source() -> str:
    npm = shutil.which("npm")
    if not (JS_DIR / "node_modules" / "axe-core" / "axe.min.js").exists():
        if npm is None:
            pytest.skip("npm is not installed (axe-core comes from tests/js/package.json)")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True,
                              text=True, timeout=300, check=False)
        if done.returncode != 0:
            pytest.skip(f"npm ci failed (registry unreachable?): {done.stderr[-300:]}")
    return (JS_DIR / "node_modules" / "axe-core" / "axe.min.js").read_text()


class Visit:
    """One browser context: every page it shows is screenshotted, checked with axe and kept."""

    def __init__(self, browser: Any, axe: str, label: str, **options: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1100, "height": 900}, **options)
        self.page = self.context.new_page()
        self.axe, self.label, self.count = axe, label, 0
        self.html: list[str] = []
        self.csp_errors: list[str] = []
        self.page.on("console", lambda msg: self.csp_errors.append(msg.text)
                     if "Content Security Policy" in msg.text else None)
        self.page.on("pageerror", lambda error: self.csp_errors.append(f"script error: {error}"))
        self.requests: list[str] = []
        self.page.on("request", lambda r: self.requests.append(f"{r.method} {r.url}"))

    def check(self, name: str, *, axe: bool = True) -> None:
        """Screenshot, keep the HTML, and fail on serious/critical axe-core violations."""
        self.page.wait_for_load_state("load")
        self.count += 1
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{self.label}-{self.count:02d}-{name}.png"), full_page=True)
        self.html.append(self.page.content())
        if axe:
            # Evaluated through the DevTools protocol, so the page's CSP (which forbids inline
            # script) does not block the injected library.
            self.page.evaluate(self.axe + "\n;0")
            result = self.page.evaluate("axe.run(document, {resultTypes: ['violations']})")
            bad = [(v["id"], v["impact"], v["help"], [n["target"] for n in v["nodes"]][:3])
                   for v in result["violations"] if v["impact"] in ("serious", "critical")]
            assert not bad, f"axe-core on {name}: {bad}"

    def close(self) -> None:
        self.context.close()

    def __enter__(self) -> Visit:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None:  # what the browser showed when the test failed
            SHOTS.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(SHOTS / f"{self.label}-failed.png"), full_page=True)
            print(self.page.url, self.csp_errors, self.requests[-8:])
        self.close()


def gateway_sign_in(page: Any, username: str, *, patient_name: str | None = None) -> None:
    """The gateway's own pages: sign in, (pick a patient), allow."""
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    if patient_name:
        page.get_by_role("heading", name="Choose a patient").wait_for()
        page.get_by_label("Find by name").fill(patient_name.split()[-1])
        page.get_by_role("button", name="Search").click()
        page.get_by_label(patient_name).check()
        page.get_by_role("button", name="Continue with this patient").click()
    page.get_by_role("heading", name="Allow access?").wait_for()
    page.get_by_role("button", name="Allow").click()


def markdown_of(doc: dict[str, Any]) -> str:
    return base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()


@pytest.fixture(scope="module")
def world(live: RunningStack, writer_http: httpx.Client) -> dict[str, Any]:
    return make_world(live, writer_http)


def make_world(live: RunningStack, writer_http: httpx.Client) -> dict[str, Any]:
    """Two therapists, each with a patient of their own."""
    suffix = uuid.uuid4().hex[:6]
    out: dict[str, Any] = {"suffix": suffix}
    statement = writer_http.get("/metadata").json()
    capabilities = {r["type"] for rest in statement.get("rest", []) for r in rest.get("resource", [])}
    for who, family in (("a", "Quill"), ("b", "Marsh")):
        practitioner = f"ws-dr-{who}-{suffix}"
        writer_http.put(f"/Practitioner/{practitioner}", json={
            "resourceType": "Practitioner", "id": practitioner,
            "name": [{"family": f"Doctor{who.upper()}", "given": ["Sam"]}]}).raise_for_status()
        patient = writer_http.post("/Patient", json={
            "resourceType": "Patient", "name": [{"family": f"{family}{suffix}", "given": ["Robin"]}],
            "birthDate": "1988-03-02"}).json()["id"]
        if "CareTeam" in capabilities:  # psychnotes lets only the patient's care team write notes
            writer_http.post("/CareTeam", json={
                "resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{patient}"},
                "participant": [{"member": {"reference": f"Practitioner/{practitioner}"}}]}).raise_for_status()
        username = f"ws-{who}-{suffix}"
        create_user(live.cli_env, username, PASSWORD, "practitioner", f"Practitioner/{practitioner}")
        out[who] = {"username": username, "practitioner": f"Practitioner/{practitioner}",
                    "patient": patient, "patient_name": f"Robin {family}{suffix}"}
    return out


def sign_in_to_workspace(live: RunningStack, visit: Visit, who: dict[str, Any]) -> None:
    page = visit.page
    page.goto(live.config.workspace_url)
    page.get_by_role("link", name="Sign in with Mindchart").click()
    gateway_sign_in(page, who["username"], patient_name=who["patient_name"])
    page.get_by_role("heading", name=who["patient_name"]).wait_for()


def test_a_therapists_session_end_to_end(live: RunningStack, writer_http: httpx.Client, browser: Any,
                                         axe_source: str, world: dict[str, Any]) -> None:
    with Visit(browser, axe_source, "session") as visit:
        session_walk(live, writer_http, visit, world)


def session_walk(live: RunningStack, writer_http: httpx.Client, visit: Visit, world: dict[str, Any]) -> None:
    a = world["a"]
    page = visit.page
    page.goto(live.config.workspace_url)
    visit.check("home")
    page.get_by_role("link", name="Sign in with Mindchart").click()
    page.get_by_role("heading", name="Sign in").wait_for()
    visit.check("gateway-sign-in", axe=False)  # the gateway's page, not the workspace's
    gateway_sign_in(page, a["username"], patient_name=a["patient_name"])
    page.get_by_role("heading", name=a["patient_name"]).wait_for()
    assert page.url.endswith(f"/patients/{a['patient']}")
    visit.check("patient")

    # A DAP note from the template.
    page.get_by_label("Template").select_option("DAP")
    page.get_by_role("button", name="Start a blank note").click()
    page.get_by_role("heading", name=re.compile("Progress note")).wait_for()
    assert [page.get_by_label(h, exact=True).count() for h in ("Data", "Assessment", "Plan")] == [1, 1, 1]
    assert page.get_by_label("Subjective", exact=True).count() == 0
    page.get_by_label("Date", exact=True).fill("2026-11-30")
    page.get_by_label("Start (UTC)").fill("10:00")
    page.get_by_label("End (UTC)").fill("10:50")
    page.get_by_label("Data", exact=True).fill(DATA)
    page.get_by_label("Assessment", exact=True).fill(ASSESSMENT)
    page.get_by_label("Plan", exact=True).fill(PLAN)
    visit.check("note-new")

    # Pin an intervention: it moves to the top of the list, and the draft is saved with it.
    page.get_by_role("button", name="Pin Exposure").click()
    page.get_by_role("status").filter(has_text="Pinned Exposure.").wait_for()
    first = page.locator("ul.interventions li").first
    assert first.locator("label").inner_text() == "Exposure"
    page.get_by_label("Exposure", exact=True).check()
    page.get_by_label("Cognitive restructuring", exact=True).check()
    assert page.get_by_label("Data", exact=True).input_value() == DATA  # nothing lost by the post

    # A saved phrase, inserted with a click (at the cursor, by app.js).
    page.get_by_label("New phrase").fill(PHRASE)
    page.get_by_role("button", name="Save phrase").click()
    page.get_by_role("status").filter(has_text="Phrase saved.").wait_for()
    page.get_by_label("Insert phrases into").select_option("Assessment")
    page.get_by_role("button", name=f"Insert phrase: {PHRASE}").click()
    assert page.get_by_label("Assessment", exact=True).input_value() == f"{ASSESSMENT} {PHRASE}"
    page.get_by_role("status").filter(has_text="Draft saved at").wait_for(timeout=15000)  # autosave
    assert "50 minutes" in page.locator("#session-summary").inner_text()
    assert "90834" in page.locator("#session-summary").inner_text()

    # PHQ-9 item by item; item 9 above 0 raises the safety prompt.
    page.get_by_text("Score PHQ-9").click()
    answers = [2, 2, 1, 1, 0, 1, 2, 0, 1]
    for n, value in enumerate(answers, start=1):
        page.locator(f"#phq9-{n}-{value}").check()
    page.get_by_role("button", name="Save PHQ-9 score").click()
    page.get_by_role("status").filter(has_text="PHQ-9 saved: total 10 (moderate).").wait_for()
    assert page.get_by_role("heading", name="Safety check needed").is_visible()
    visit.check("note-scored")

    # Save, reload: nothing lost.
    page.get_by_role("button", name="Save draft").click()
    page.wait_for_url(re.compile(r"/notes/[^/?]+\?saved=1$"))
    note_id = page.url.split("/notes/")[1].split("?")[0]
    page.reload()
    assert page.get_by_label("Data", exact=True).input_value() == DATA
    assert page.get_by_label("Assessment", exact=True).input_value() == f"{ASSESSMENT} {PHRASE}"
    assert page.get_by_label("Plan", exact=True).input_value() == PLAN
    assert page.get_by_label("Exposure", exact=True).is_checked()
    assert page.get_by_label("Cognitive restructuring", exact=True).is_checked()
    assert not page.get_by_label("Mindfulness", exact=True).is_checked()
    assert page.get_by_label("Start (UTC)").input_value() == "10:00"
    assert page.get_by_label("End (UTC)").input_value() == "10:50"
    assert "PHQ-9: 10 of 27, moderate" in page.locator("details.screening summary").first.inner_text()
    visit.check("note-reloaded")

    # Signing waits for the safety acknowledgement.
    page.get_by_role("button", name="Sign and lock").click()
    page.get_by_role("alert").filter(has_text="Confirm the safety assessment").wait_for()
    page.get_by_label("I have assessed suicide risk and addressed safety in this session").check()
    page.get_by_label("Safety assessment and plan").fill("Passive ideation, no plan or intent; safety plan reviewed.")
    page.get_by_role("button", name="Sign and lock").click()
    page.wait_for_url(re.compile(r"\?signed=1$"))
    assert page.get_by_text("Signed", exact=True).first.is_visible()
    visit.check("note-signed")

    # An addendum to the signed note.
    page.get_by_label("Text", exact=True).fill("Patient called the next day: sleep improved.")
    page.get_by_role("button", name="Add to the note").click()
    page.get_by_role("heading", name="Addenda and corrections").wait_for()
    assert page.get_by_text("Patient called the next day: sleep improved.").is_visible()

    # The patient page: the signed note, its addendum, and the PHQ-9 chart with its bands.
    page.get_by_role("link", name=f"Back to {a['patient_name']}").click()
    rows = page.locator("table.notes tbody tr")
    assert rows.count() == 2
    assert "Signed" in rows.nth(0).inner_text() + rows.nth(1).inner_text()
    assert page.get_by_role("link", name="Addendum").count() == 1
    chart = page.get_by_role("img", name=re.compile("PHQ-9 totals over time"))
    assert "10 (moderate)" in chart.locator("desc").text_content()
    assert chart.locator("rect").count() == 5  # minimal, mild, moderate, moderately severe, severe
    visit.check("patient-with-chart")
    page.go_back()

    # The private note: a separate grant for the vault, then its own request.
    page.get_by_role("link", name="open the private-notes vault").click()
    gateway_sign_in(page, a["username"])
    page.get_by_label(re.compile("^Private note")).fill(PRIVATE)
    visit.check("private-pane-open")
    page.get_by_role("button", name="Save private note to the vault").click()
    page.get_by_role("status").filter(has_text="Private note saved to the psychotherapy-notes vault.").wait_for()
    assert page.locator(".private-notes").get_by_text(PRIVATE).is_visible()  # read back (consent token)
    visit.check("private-saved")
    assert not visit.csp_errors, visit.csp_errors  # our own pages need nothing the CSP forbids

    # --- what landed where, through the FHIR APIs -------------------------------------------------
    note = writer_http.get(f"/DocumentReference/{note_id}").json()
    text = markdown_of(note)
    assert note["content"][0]["attachment"]["contentType"] == "text/markdown"
    assert re.findall(r"^## (.+)$", text, re.MULTILINE) == ["Data", "Assessment", "Plan", "Interventions", "Safety"]
    assert DATA in text and PHRASE in text and "- Exposure" in text and "- Cognitive restructuring" in text
    assert note["subject"]["reference"] == f"Patient/{a['patient']}"
    assert note["author"] == [{"reference": a["practitioner"]}]
    assert note["type"]["coding"][0]["code"] == "11506-3"
    assert note["category"][0]["coding"][0]["code"] == "clinical-note"
    encounter_ref = note["context"]["encounter"][0]["reference"]
    encounter = writer_http.get(f"/{encounter_ref}").json()
    assert encounter["period"] == {"start": "2026-11-30T10:00:00Z", "end": "2026-11-30T10:50:00Z"}
    assert encounter["length"]["value"] == 50
    assert encounter["type"][0]["coding"][0]["code"] == "90834"
    assert encounter["participant"][0]["individual"]["reference"] == a["practitioner"]

    observations = writer_http.get("/Observation", params={"encounter": encounter_ref, "_count": "100"}).json()
    by_code = {o["resource"]["code"]["coding"][0]["code"]: o["resource"] for o in observations["entry"]}
    panel = by_code["44249-1"]
    assert "value" not in json.dumps({k: v for k, v in panel.items() if k.startswith("value")})
    assert len(panel["hasMember"]) == 10  # nine items and the total
    assert by_code["44261-6"]["valueQuantity"] == {"value": 10, "unit": "{score}",
                                                   "system": "http://unitsofmeasure.org", "code": "{score}"}
    assert by_code["44260-8"]["valueCodeableConcept"]["coding"][0]["code"] == "LA6569-3"  # item 9: 1
    for obs in by_code.values():
        assert obs["category"][0]["coding"][0]["code"] == "survey"
        assert obs["subject"]["reference"] == f"Patient/{a['patient']}"
    members = {m["reference"] for m in panel["hasMember"]}
    assert members == {f"Observation/{o['id']}" for c, o in by_code.items() if c != "44249-1"}

    addenda = writer_http.get("/DocumentReference", params={"patient": a["patient"], "_count": "50"}).json()
    relations = [r for e in addenda["entry"] for r in e["resource"].get("relatesTo", [])]
    assert {"code": "appends", "target": {"reference": f"DocumentReference/{note_id}"}} in relations

    # The private note is in psychnotes only: nowhere in records, not even in its datastore.
    everything = writer_http.get(f"/Patient/{a['patient']}/$everything").text
    assert PRIVATE not in everything and "transference" not in everything
    records_db = live.db("records")
    for name in records_db.list_collection_names():
        for doc in records_db[name].find({}):
            assert "transference" not in json.dumps(doc, default=str)
    vault = live.db("psychnotes").notes.count_documents({"patient": f"Patient/{a['patient']}"})
    assert vault == 1

    # Sign out: the session is gone and the workspace's grants are revoked at the gateway.
    cookie = next(c["value"] for c in visit.context.cookies() if c["name"] == "workspace_session")
    stored = live.db("workspace").sessions.find_one({"_id": hashlib.sha256(cookie.encode()).hexdigest()})
    tokens = [g["access_token"] for g in stored["grants"].values()]
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Signed out").wait_for()
    visit.check("signed-out")
    assert live.db("workspace").sessions.find_one({"_id": hashlib.sha256(cookie.encode()).hexdigest()}) is None
    for token in tokens:
        read = httpx.get(f"{live.fhir}/Patient/{a['patient']}", headers={"Authorization": f"Bearer {token}"})
        assert read.status_code == 401, read.text
    page.goto(f"{live.config.workspace_url}/patients/{a['patient']}")
    page.get_by_role("link", name="Sign in with Mindchart").wait_for()  # back at the front door


def session_cookie(visit: Visit) -> str:
    return next(c["value"] for c in visit.context.cookies() if c["name"] == "workspace_session")


def stored_session(live: RunningStack, cookie: str) -> dict[str, Any]:
    found = live.db("workspace").sessions.find_one({"_id": hashlib.sha256(cookie.encode()).hexdigest()})
    assert found is not None
    return dict(found)


def test_keyboard_alone_reaches_and_works_every_control(live: RunningStack, browser: Any, axe_source: str,
                                                       world: dict[str, Any]) -> None:
    b = world["b"]
    with Visit(browser, axe_source, "keyboard") as visit:
        page = visit.page
        sign_in_to_workspace(live, visit, b)
        # Start a note with the keyboard: focus moves by Tab only, actions by Enter.
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.textContent.trim()") == "Start a blank note":
                break
        page.keyboard.press("Enter")
        page.get_by_role("heading", name=re.compile("Progress note")).wait_for()
        page.keyboard.press("Tab")  # the skip link comes first
        assert page.evaluate("document.activeElement.textContent.trim()") == "Skip to content"
        # Every visible control is a Tab stop (a radio group is one stop; arrows move inside it).
        expected = page.evaluate("""() => {
            const seen = new Set(); let n = 0;
            for (const el of document.querySelectorAll('a[href], button, input:not([type=hidden]), select, textarea, summary')) {
                if (!el.checkVisibility()) continue;
                if (el.type === 'radio') { if (seen.has(el.name)) continue; seen.add(el.name); }
                el.dataset.kb = String(n++);
            }
            return n; }""")
        reached: set[str] = set()
        for _ in range(expected + 10):
            key = page.evaluate("document.activeElement.dataset.kb || ''")
            if key:
                reached.add(key)
            page.keyboard.press("Tab")
        assert len(reached) == expected, f"{expected - len(reached)} controls are not reachable by Tab"
        # Operate: type into a section, pin with Enter, pick a PHQ-9 answer with the arrows.
        page.get_by_label("Data", exact=True).focus()
        page.keyboard.type("Typed with the keyboard only.")
        for _ in range(80):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.getAttribute('aria-label')") == "Pin Mindfulness":
                break
        page.keyboard.press("Enter")
        page.get_by_role("status").filter(has_text="Pinned Mindfulness.").wait_for()
        assert page.locator("ul.interventions li").first.locator("label").inner_text() == "Mindfulness"
        assert page.get_by_label("Data", exact=True).input_value() == "Typed with the keyboard only."
        page.locator("details.screening summary").first.focus()
        page.keyboard.press("Enter")
        page.keyboard.press("Tab")
        page.keyboard.press("ArrowRight")
        assert page.locator("#phq9-1-1").is_checked()
        visit.check("keyboard-note")


def test_no_token_reaches_the_browser(live: RunningStack, browser: Any, axe_source: str,
                                      world: dict[str, Any]) -> None:
    a = world["a"]
    with Visit(browser, axe_source, "tokens") as visit:
        sign_in_to_workspace(live, visit, a)
        page = visit.page
        visit.check("patient", axe=False)
        page.get_by_role("button", name="Start a blank note").click()
        page.get_by_role("heading", name=re.compile("Progress note")).wait_for()
        visit.check("note", axe=False)
        cookies = visit.context.cookies()
        storage = page.evaluate("JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
        session = stored_session(live, session_cookie(visit))
        secrets = [g["access_token"] for g in session["grants"].values()]
        secrets += [g["refresh_token"] for g in session["grants"].values() if g.get("refresh_token")]
        assert secrets and all(len(s) > 20 for s in secrets)
        seen = "\n".join(visit.html) + json.dumps(cookies) + storage
        for secret in secrets:
            assert secret not in seen
        assert not re.search(r"eyJ[\w-]+\.eyJ[\w-]+\.", seen)  # no JWT of any kind
        (workspace_cookie,) = [c for c in cookies if c["name"] == "workspace_session"]
        assert workspace_cookie["httpOnly"] and workspace_cookie["sameSite"] == "Lax"
        assert page.evaluate("document.cookie") == ""  # invisible to scripts


def test_a_form_without_its_csrf_token_is_refused(live: RunningStack, writer_http: httpx.Client,
                                                 browser: Any, axe_source: str, world: dict[str, Any]) -> None:
    a = world["a"]
    with Visit(browser, axe_source, "csrf") as visit:
        sign_in_to_workspace(live, visit, a)
        cookie = session_cookie(visit)
        csrf = stored_session(live, cookie)["csrf"]
    url = f"{live.config.workspace_url}/patients/{a['patient']}/notes"
    form = {"template": "DAP", "section-data": "forged note", "session_date": "2026-11-29", "action": "save"}

    def notes_count() -> int:
        bundle = writer_http.get("/DocumentReference", params={"patient": a["patient"], "_count": "200"}).json()
        return len(bundle.get("entry", []))

    before = notes_count()
    with httpx.Client(cookies={"workspace_session": cookie}, timeout=30) as http:
        for attempt in ({}, {"csrf": "not-the-token"}):
            refused = http.post(url, data={**form, **attempt})
            assert refused.status_code == 403, refused.text
            assert "security token" in refused.text
        assert notes_count() == before  # nothing stored
        logout = http.post(f"{live.config.workspace_url}/logout", data={})
        assert logout.status_code == 403  # not even sign-out without it
        accepted = http.post(url, data={**form, "csrf": csrf})  # the same form with its token
        assert accepted.status_code == 303, accepted.text
    assert notes_count() == before + 1


def test_another_therapists_cookie_opens_only_their_own_caseload(
        live: RunningStack, writer_http: httpx.Client, browser: Any, axe_source: str,
        world: dict[str, Any]) -> None:
    a, b = world["a"], world["b"]
    a_notes = writer_http.get("/DocumentReference", params={"patient": a["patient"]}).json()["entry"]
    a_note = a_notes[0]["resource"]["id"]
    with Visit(browser, axe_source, "other-therapist") as visit:
        sign_in_to_workspace(live, visit, b)
        page = visit.page
        page.goto(f"{live.config.workspace_url}/patients")
        visit.check("b-caseload")
        assert page.get_by_text(b["patient_name"]).is_visible()
        assert page.get_by_text(a["patient_name"]).count() == 0
        for path in (f"/patients/{a['patient']}", f"/patients/{a['patient']}/notes/new",
                     f"/patients/{a['patient']}/notes/{a_note}", f"/patients/{b['patient']}/notes/{a_note}"):
            response = page.goto(f"{live.config.workspace_url}{path}")
            assert response.status == 404, path
            assert a["patient_name"] not in page.content() and "panic" not in page.content()
        # B's pins are B's: Mindfulness (pinned by B with the keyboard) first, A's Exposure not pinned.
        page.goto(f"{live.config.workspace_url}/patients/{b['patient']}/notes/new")
        first = page.locator("ul.interventions li").first.locator("label").inner_text()
        assert first == "Mindfulness"
        assert page.get_by_role("button", name="Unpin Exposure").count() == 0
        assert page.get_by_role("button", name="Pin Exposure").count() == 1
    with Visit(browser, axe_source, "own-pins") as visit:
        sign_in_to_workspace(live, visit, a)
        visit.page.goto(f"{live.config.workspace_url}/patients/{a['patient']}/notes/new")
        assert visit.page.locator("ul.interventions li").first.locator("label").inner_text() == "Exposure"
        assert visit.page.get_by_role("button", name="Unpin Mindfulness").count() == 0


def test_ehr_launch_opens_the_patient(live: RunningStack, browser: Any, axe_source: str,
                                      world: dict[str, Any]) -> None:
    """SMART EHR launch: `mindchart launch create --client workspace ...` prints a link that opens
    the workspace with the patient in context (no picker)."""
    from tests.actors import run_cli

    a = world["a"]
    env = {**live.cli_env, "MINDCHART_GATEWAY_PUBLIC_URL": live.gateway_url}
    made = run_cli(env, "launch", "create", "--client", "workspace", "--patient",
                   f"Patient/{a['patient']}", "--user", a["username"],
                   "--launch-url", f"{live.config.workspace_url}/launch")
    assert made.returncode == 0, made.stderr
    link = json.loads(made.stdout)["launch_url"]
    with Visit(browser, axe_source, "ehr-launch") as visit:
        page = visit.page
        page.goto(link)
        page.get_by_label("Username").fill(a["username"])
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("heading", name="Allow access?").wait_for()  # no patient picker
        page.get_by_role("button", name="Allow").click()
        page.get_by_role("heading", name=a["patient_name"]).wait_for()
        assert page.url.endswith(f"/patients/{a['patient']}")
        # A launch naming another records server is refused, nothing is fetched from it.
        refused = page.goto(f"{live.config.workspace_url}/launch?iss=https://evil.example/fhir&launch=x")
        assert refused.status == 400


def test_two_tabs_never_overwrite_each_other_without_javascript(
        live: RunningStack, writer_http: httpx.Client, browser: Any, axe_source: str,
        world: dict[str, Any]) -> None:
    b = world["b"]
    with Visit(browser, axe_source, "two-tabs", java_script_enabled=False) as visit:
        sign_in_to_workspace(live, visit, b)
        page = visit.page
        page.get_by_role("button", name="Start a blank note").click()
        page.get_by_label("Data", exact=True).fill("first words")
        page.get_by_role("button", name="Save draft").click()
        page.wait_for_url(re.compile(r"\?saved=1$"))
        note_url = page.url.split("?")[0]
        other = visit.context.new_page()
        other.goto(note_url)
        page.get_by_label("Data", exact=True).fill("tab one's version")
        page.get_by_role("button", name="Save draft").click()
        page.get_by_text("Draft (version 2)").wait_for()
        other.get_by_label("Data", exact=True).fill("tab two's stale version")
        other.get_by_role("button", name="Save draft").click()
        other.get_by_role("alert").filter(has_text="changed somewhere else").wait_for()
        assert other.get_by_label("Data", exact=True).input_value() == "tab two's stale version"
        note = writer_http.get(f"/DocumentReference/{note_url.rsplit('/', 1)[1]}").json()
        assert "tab one's version" in markdown_of(note) and "stale" not in markdown_of(note)
