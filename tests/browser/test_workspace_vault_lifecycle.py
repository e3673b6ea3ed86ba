"""The demo psychotherapy notes (make run's seed) as the therapist meets them in the workspace: the
vault pane of a session note lists their earlier private notes with where each stands in the
lifecycle (addendum, correction, replaced, signed); the one entered in error is not listed.
Screenshot: var/screenshots/workspace/vault-lifecycle-01-vault-pane.png."""

from __future__ import annotations

import uuid
from typing import Any

from mindchart_cli import seed
from tests.actors import create_user
from tests.browser.conftest import needs_chromium
from tests.browser.test_workspace import (  # noqa: F401 (fixtures)
    PASSWORD,
    Visit,
    axe_source,
    gateway_sign_in,
    sign_in_to_workspace,
)
from tests.conftest import RunningStack
from tests.e2e.test_psychnotes_demo_seed import seed_demo

pytestmark = needs_chromium


def test_the_vault_pane_shows_each_private_note_in_its_lifecycle(live: RunningStack, browser: Any,
                                                                 axe_source: str) -> None:  # noqa: F811
    seed_demo(live)
    username = f"demo-th-{uuid.uuid4().hex[:6]}"  # signs in as the demo therapist
    create_user(live.cli_env, username, PASSWORD, "practitioner", f"Practitioner/{seed.DEMO_THERAPIST}")
    with Visit(browser, axe_source, "vault-lifecycle") as visit:
        sign_in_to_workspace(live, visit, {"username": username, "patient_name": "Alex Doe"})
        page = visit.page
        page.goto(f"{live.config.workspace_url}/patients/{seed.DEMO_PATIENT}/notes/demo-note-1")
        page.get_by_role("link", name="open the private-notes vault").click()
        gateway_sign_in(page, username)
        page.get_by_role("heading", name="Your earlier private notes for this patient").wait_for()
        visit.check("vault-pane")
        listed = []
        for item in page.locator(".private-notes li").all():
            state = item.locator(".hint").inner_text().partition(" · ")[2]
            listed.append((state, item.locator("p").inner_text()))
    assert [state for state, _ in listed] == [
        "Correction · Signed", "Private note · Replaced", "Addendum · Signed", "Private note · Signed"]
    assert "sister's visit" in listed[0][1] and "brother's visit" in listed[1][1]
    assert not any("another client" in text for _, text in listed)  # entered in error: left out
