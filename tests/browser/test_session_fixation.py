"""Issue 12, High 4: session fixation on the sign-in pages, as the attack ran, in Chromium.

The attacker starts an authorization flow for their own app (their PKCE verifier), then lures the
victim to a page of theirs that posts the flow's form to the real gateway, so the victim signs in
on the real sign-in page *inside the attacker's flow*; the attacker approves from their own
browser and redeems the code: the victim's tokens. The flow is now bound to the browser that
started it (HttpOnly SameSite cookie + a CSRF token per form, both rotated at sign-in), so the
lure lands on "Sign-in expired" and the attacker's approval gets no code."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tests.actors import APP_REDIRECT, create_user, pkce_pair, register_app, sensitive
from tests.browser.conftest import needs_chromium
from tests.conftest import RunningStack

pytestmark = needs_chromium
PASSWORD = sensitive("fixation victim passphrase 12")
SHOTS = Path("/tmp/sec-shots")


def test_a_victim_cannot_be_signed_in_to_an_attackers_flow(live: RunningStack, browser: Any) -> None:
    suffix = uuid.uuid4().hex[:6]
    victim, app = f"fixation-victim-{suffix}", f"attacker-app-{suffix}"
    create_user(live.cli_env, victim, PASSWORD, "patient", f"Patient/fix-{suffix}")
    register_app(live.cli_env, app, "openid fhirUser patient/*.rs")
    _, challenge = pkce_pair()  # the attacker's own PKCE pair
    authorize = f"{live.gateway_url}/oauth/authorize?" + urlencode({
        "response_type": "code", "client_id": app, "redirect_uri": APP_REDIRECT,
        "scope": "openid fhirUser patient/*.rs", "state": "x" * 32, "aud": live.fhir,
        "code_challenge": challenge, "code_challenge_method": "S256"})

    attacker = browser.new_context()
    codes: list[str] = []
    attacker.route(f"{APP_REDIRECT}**", lambda route: (codes.append(route.request.url), route.fulfill(
        status=200, content_type="text/html", body="<h1>code</h1>")))
    theirs = attacker.new_page()
    theirs.goto(authorize)
    assert theirs.title().startswith("Sign in")
    token = re.search(r'name="session" value="([^"]+)"', theirs.content()).group(1)  # type: ignore[union-attr]
    assert any(c["name"] == "mindchart_authorize" and c["httpOnly"] and c["sameSite"] == "Strict"
               for c in attacker.cookies())

    lure = f"""<html><body><h1>Win a prize</h1>
<form method="post" action="{live.gateway_url}/oauth/authorize/login">
<input type="hidden" name="session" value="{token}"><input type="hidden" name="username" value="">
<input type="hidden" name="password" value=""></form>
<script>document.forms[0].submit()</script></body></html>"""
    victim_context = browser.new_context()
    victim_context.route("https://attacker.example/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body=lure))
    page = victim_context.new_page()
    page.goto("https://attacker.example/prize")
    page.wait_for_url(f"{live.gateway_url}/oauth/authorize/login")
    page.screenshot(path=str(SHOTS / "fixation-victim.png"))
    # Before the fix this was the real sign-in form, bound to the attacker's flow.
    assert page.get_by_role("heading", name="Sign-in expired").is_visible()
    assert page.get_by_label("Password").count() == 0

    # The attacker tries to approve "the victim's" sign-in from their own browser: no code.
    approval = attacker.request.post(f"{live.gateway_url}/oauth/authorize/approve", form={
        "session": token, "decision": "approve", "scope": "patient/*.rs"}, max_redirects=0)
    assert approval.status != 303 and "Sign-in expired" in approval.text()
    assert codes == []

    # The attacker's own sign-in rotates the flow: the token they saw before no longer works.
    theirs.get_by_label("Username").fill(victim)
    theirs.get_by_label("Password").fill(PASSWORD)
    theirs.get_by_role("button", name="Sign in").click()
    theirs.get_by_role("heading", name="Allow access?").wait_for()
    theirs.screenshot(path=str(SHOTS / "fixation-rotated.png"))
    fresh = re.search(r'name="session" value="([^"]+)"', theirs.content()).group(1)  # type: ignore[union-attr]
    assert fresh != token
    stale = attacker.request.post(f"{live.gateway_url}/oauth/authorize/approve", form={
        "session": token, "decision": "approve", "scope": "patient/*.rs"}, max_redirects=0)
    assert stale.status != 303
    attacker.close()
    victim_context.close()
