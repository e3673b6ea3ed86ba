"""The gateway's HTML pages for the SMART authorization flow: sign-in, patient picker, approval.

Plain server-rendered forms: usable without JavaScript, labelled controls, one `h1` per page,
errors announced with role="alert" (WCAG 2.2: 1.3.1, 3.3.1, 4.1.2). Every value is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

from starlette.responses import HTMLResponse

# Pages carry a one-form secret (the CSRF token of the flow, whose id is only in an HttpOnly
# cookie): never cache them, never frame them.
PAGE_HEADERS = {
    "Cache-Control": "no-store", "Pragma": "no-cache", "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}
_STYLE = """body{font-family:system-ui,sans-serif;max-width:36rem;margin:2rem auto;padding:0 1rem;
line-height:1.5}label{display:block;margin-top:.75rem}input[type=text],input[type=password],
input[type=search]{width:100%;padding:.4rem;font-size:1rem}button{margin-top:1rem;padding:.5rem 1rem;
font-size:1rem}.error{color:#a00;border:1px solid #a00;padding:.5rem}fieldset{margin-top:1rem}
.scope{display:flex;gap:.5rem;align-items:baseline}.scope label{display:inline;margin:0}"""

SCOPE_WORDS = {
    "openid": "Confirm who you are to the app",
    "fhirUser": "Tell the app which person record is yours",
    "profile": "Share your profile",
    "launch": "Open with the record that is currently open",
    "launch/patient": "Work with one patient's record",
    "launch/encounter": "Work with the current session (encounter)",
    "offline_access": "Keep access after you sign out (until revoked)",
    "online_access": "Keep access while you are signed in",
}
_ACTIONS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def describe_scope(word: str) -> str:
    if word in SCOPE_WORDS:
        return SCOPE_WORDS[word]
    context, _, rest = word.partition("/")
    kind, _, perms = rest.partition(".")
    perms = perms.split("?")[0]
    letters = {"read": "rs", "write": "cud", "*": "cruds"}.get(perms, perms)
    verbs = ", ".join(_ACTIONS[c] for c in "cruds" if c in letters)
    what = "all record types" if kind == "*" else kind
    whose = {"patient": "of the selected patient", "user": "that you may see",
             "system": "of the whole system"}.get(context, "")
    return f"{verbs.capitalize()} {what} {whose}".strip()


def _page(title: str, body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)} - Mindchart</title><style>{_STYLE}</style></head>"
            f"<body><main>{body}</main></body></html>")
    return HTMLResponse(html, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def _error(message: str | None) -> str:
    return f'<p class="error" role="alert" id="error">{escape(message)}</p>' if message else ""


def error_page(title: str, message: str, status: int = 400) -> HTMLResponse:
    return _page(title, f"<h1>{escape(title)}</h1>{_error(message)}"
                        "<p>Return to the app you came from and start again.</p>", status)


def sign_in(csrf: str, client_name: str, *, action: str, error: str | None = None,
            username: str = "", status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    described = ' aria-describedby="error"' if error else ""
    body = f"""<h1>Sign in to Mindchart</h1>
<p><strong>{escape(client_name)}</strong> is asking to use your Mindchart account.</p>
{_error(error)}
<form method="post" action="{escape(action)}">
<input type="hidden" name="session" value="{escape(csrf)}">
<label for="username">Username</label>
<input type="text" id="username" name="username" autocomplete="username" required
 value="{escape(username)}"{described}>
<label for="password">Password</label>
<input type="password" id="password" name="password" autocomplete="current-password" required{described}>
<button type="submit">Sign in</button>
</form>"""
    return _page("Sign in", body, status, headers)


def patient_picker(csrf: str, client_name: str, patients: list[dict[str, str]], *, action: str,
                   query: str = "", error: str | None = None, more: bool = False) -> HTMLResponse:
    """`more`: records holds further matches than the `patients` shown, so the page says so
    and asks for a (narrower) name rather than pretending the list is whole."""
    if patients:
        options = "\n".join(
            f'<div class="scope"><input type="radio" name="patient" id="p-{escape(p["id"])}" '
            f'value="{escape(p["id"])}"{" checked" if i == 0 else ""}>'
            f'<label for="p-{escape(p["id"])}">{escape(p["label"])}</label></div>'
            for i, p in enumerate(patients))
        choose = f"""<form method="post" action="{escape(action)}">
<input type="hidden" name="session" value="{escape(csrf)}">
<fieldset><legend>Patients</legend>
{options}
</fieldset>
<button type="submit" name="choose" value="1">Continue with this patient</button>
</form>"""
        if more:
            hint = "Not every match is shown: narrow the name." if query.strip() else \
                "Not every patient is shown: find one by name."
            choose = f'<p role="status">{hint}</p>\n{choose}'
    else:
        choose = "<p>No patients match.</p>"
    body = f"""<h1>Choose a patient</h1>
<p><strong>{escape(client_name)}</strong> will work with the record of the patient you choose.</p>
{_error(error)}
<form method="post" action="{escape(action)}" role="search">
<input type="hidden" name="session" value="{escape(csrf)}">
<label for="name">Find by name</label>
<input type="search" id="name" name="name" value="{escape(query)}">
<button type="submit" name="search" value="1">Search</button>
</form>
{choose}"""
    return _page("Choose a patient", body)


def approve(csrf: str, client_name: str, requested: list[str], *, action: str,
            user_label: str, patient_label: str | None) -> HTMLResponse:
    rows = "\n".join(
        f'<div class="scope"><input type="checkbox" name="scope" id="s-{i}" value="{escape(w)}" checked>'
        f'<label for="s-{i}">{escape(describe_scope(w))} <code>{escape(w)}</code></label></div>'
        for i, w in enumerate(requested))
    patient = (f"<p>Patient: <strong>{escape(patient_label)}</strong></p>" if patient_label else "")
    body = f"""<h1>Allow access?</h1>
<p>Signed in as <strong>{escape(user_label)}</strong>.</p>
<p><strong>{escape(client_name)}</strong> asks for the access below.
Untick anything you do not want to allow.</p>
{patient}
<form method="post" action="{escape(action)}">
<input type="hidden" name="session" value="{escape(csrf)}">
<fieldset><legend>Requested access</legend>
{rows}
</fieldset>
<button type="submit" name="decision" value="approve">Allow</button>
<button type="submit" name="decision" value="deny">Deny</button>
</form>"""
    return _page("Allow access", body)


def patient_label(resource: dict[str, Any]) -> str:
    names = resource.get("name") or [{}]
    name = names[0]
    text = name.get("text") or " ".join([*name.get("given", []), name.get("family", "")]).strip()
    born = resource.get("birthDate")
    label = text or f"Patient {resource.get('id')}"
    return f"{label} (born {born})" if born else label
