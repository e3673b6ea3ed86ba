"""Issue 12: what an outside review opened in the audit trail, the records write paths and the
token endpoints, each as the attack it was, through the gateway. Each test failed on the code
before the fix (the psychotherapy-note findings are in test_psychnotes_attacks.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from tests.actors import BackendClient, register_backend, run_cli
from tests.conftest import RunningStack


def audit_routes(live: RunningStack, token: str) -> list[int]:
    headers = {"Authorization": f"Bearer {token}"}
    return [httpx.get(f"{live.gateway_url}{path}", headers=headers, timeout=30).status_code
            for path in ("/audit/AuditEvent?_count=1", "/audit/Patient/anyone/$disclosures")]


# -- Critical 3: the audit trail is not reachable through a wildcard or a scope string alone ------

def test_a_wildcard_backend_is_never_granted_the_audit_trail(live: RunningStack, tmp_path: Path) -> None:
    """A backend registered with system/*.rs asked for system/AuditEvent.rs and got it, then read
    /audit/AuditEvent and every patient's accounting. A wildcard never names AuditEvent."""
    wildcard = BackendClient(f"wild-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, wildcard, "system/*.rs", tmp=tmp_path)
    refused = wildcard.token_request("system/AuditEvent.rs")
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope", refused.text
    mixed = wildcard.token_request("system/Patient.rs system/AuditEvent.rs")
    assert mixed.status_code == 200 and mixed.json()["scope"] == "system/Patient.rs"
    assert audit_routes(live, mixed.json()["access_token"]) == [403, 403]
    everything = wildcard.token("system/*.rs")
    assert audit_routes(live, everything) == [403, 403]


def test_the_audit_routes_check_the_callers_registration_and_role(live: RunningStack,
                                                                  tmp_path: Path) -> None:
    """A scope naming AuditEvent is not enough: the client must hold the admin or compliance role
    in its registration, read again on each request (a role taken away ends access at once)."""
    siem = BackendClient(f"siem-{uuid.uuid4().hex[:6]}", live.gateway_url)
    register_backend(live.cli_env, siem, "system/AuditEvent.rs", tmp=tmp_path)
    assert audit_routes(live, siem.token("system/AuditEvent.rs")) == [403, 403]
    register_backend(live.cli_env, siem, "system/AuditEvent.rs", tmp=tmp_path, roles=("compliance",))
    token = siem.token("system/AuditEvent.rs")
    assert audit_routes(live, token) == [200, 200]
    register_backend(live.cli_env, siem, "system/AuditEvent.rs", tmp=tmp_path)  # role removed
    assert audit_routes(live, token) == [403, 403]
    result = run_cli(live.cli_env, "client", "create", "--id", siem.client_id, "--auth",
                     "private_key_jwt", "--jwks", str(tmp_path / f"{siem.client_id}.jwks.json"),
                     "--scope", "system/Patient.rs", "--role", "compliance")
    assert result.returncode == 0, result.stderr
    assert audit_routes(live, token) == [403, 403]  # no longer registered for the trail
