"""Runs schemathesis-generated requests at the live stack and judges every answer.

For each operation of an OpenAPI document (tests/resilience/fuzz_schemas.py) hypothesis draws
cases twice: schema-conforming ("positive") and schema-violating ("negative") ones, each sent over
real HTTP with an identity drawn from the ones given (valid tokens of a patient, a practitioner, a
backend client; or none). An answer is a problem when it is a 5xx, when an error is not in the
shape its endpoint promises, or when it shows a stack trace or a secret. Problems are collected,
not raised at once, so every run reports its full counts.

Budget: `MINDCHART_FUZZ_EXAMPLES` examples per operation and mode (default 1; `make soak` 5, and every resource type).
derandomize=True makes CI reproducible; deadline=None because a request's time is not the
property under test.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.resilience.conftest import SOAK

EXAMPLES = int(os.environ.get("MINDCHART_FUZZ_EXAMPLES") or (5 if SOAK else 1))

# FHIR R4 valueset-issue-severity and valueset-issue-type (operationoutcome.html): issue[] is 1..*,
# each with severity and code 1..1.
SEVERITIES = {"fatal", "error", "warning", "information"}
ISSUE_CODES = {
    "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown",
    "expired", "forbidden", "suppressed", "processing", "not-supported", "duplicate",
    "multiple-matches", "not-found", "deleted", "too-long", "code-invalid", "extension",
    "too-costly", "business-rule", "conflict", "transient", "lock-error", "no-store", "exception",
    "timeout", "incomplete", "throttled", "informational",
}
# RFC 6749 §5.2: error and error_description are ASCII %x20-21 / %x23-5B / %x5D-7E.
OAUTH_TEXT = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]*$")
OAUTH_JSON_ENDPOINTS = ("/oauth/token", "/oauth/introspect", "/oauth/revoke")
STACK_TRACE = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\.py\", line \d+")


@dataclass
class Identity:
    """Who a case is sent as: `token()` gives a fresh access token (None: no Authorization)."""

    name: str
    token: Callable[[], str] | None = None
    _cached: tuple[float, dict[str, str]] | None = None

    @property
    def headers(self) -> dict[str, str]:
        if self.token is None:
            return {}
        if self._cached is None or time.monotonic() - self._cached[0] > 120:  # tokens live 5 min
            self._cached = (time.monotonic(), {"Authorization": f"Bearer {self.token()}"})
        return self._cached[1]


@dataclass
class Tally:
    target: str
    cases: int = 0
    operations: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {"operations": self.operations, "cases": self.cases,
                "2xx": sum(n for s, n in self.statuses.items() if s < 300),
                "4xx": sum(n for s, n in self.statuses.items() if 400 <= s < 500),
                "5xx": len(self.server_errors), "malformed_errors": len(self.malformed),
                "seconds": round(self.seconds)}


def content_type(response: schemathesis.Response) -> str:
    return (response.headers.get("content-type") or [""])[0]


def operation_outcome_problem(response: schemathesis.Response) -> str | None:
    """None when the body is a FHIR OperationOutcome with issue[] of severity and code."""
    if not content_type(response).startswith("application/fhir+json"):
        return f"content-type {content_type(response)!r}"
    try:
        body = response.json()
    except ValueError:
        return "not JSON"
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return "not an OperationOutcome"
    issues = body.get("issue")
    if not isinstance(issues, list) or not issues:
        return "OperationOutcome without issue[]"
    for issue in issues:
        if not isinstance(issue, dict) or issue.get("severity") not in SEVERITIES \
                or issue.get("code") not in ISSUE_CODES:
            return f"issue without a valid severity and code: {issue!r}"[:200]
    return None


def oauth_error_problem(response: schemathesis.Response) -> str | None:
    """None when the body is an RFC 6749 §5.2 error response."""
    if not content_type(response).startswith("application/json"):
        return f"content-type {content_type(response)!r}"
    try:
        body = response.json()
    except ValueError:
        return "not JSON"
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not body["error"]:
        return "no error member"
    for member in ("error", "error_description"):
        if member in body and not (isinstance(body[member], str) and OAUTH_TEXT.match(body[member])):
            return f"{member} outside RFC 6749's character set"
    return None


def judge(path: str, response: schemathesis.Response, secrets: Sequence[str], *,
          html_errors: bool = False) -> str | None:
    """The problem with this answer, if any. `html_errors`: a browser-facing service (workspace),
    whose errors are pages."""
    text = response.content.decode("utf-8", "replace")
    if STACK_TRACE.search(text):
        return "stack trace in the body"
    leaked = [s for s in secrets if s in text]
    if leaked:
        return f"secret in the body: {leaked[0][:20]}..."
    if response.status_code < 400 or html_errors:
        return None
    if path.startswith(OAUTH_JSON_ENDPOINTS):
        return oauth_error_problem(response)
    if path.startswith("/oauth/authorize") and content_type(response).startswith("text/html"):
        return None  # RFC 6749 §4.1.2.1: a bad client or redirect_uri is told to the user, not redirected
    if path.startswith("/oauth/") and content_type(response).startswith("application/json"):
        return oauth_error_problem(response)
    return operation_outcome_problem(response)


def fuzz(target: str, document: dict[str, Any], base_url: str, identities: Sequence[Identity], *,
         secrets: Sequence[str] = (), examples: int = EXAMPLES, html_errors: bool = False,
         modes: Sequence[GenerationMode] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)) -> Tally:
    """Every operation of `document`, in each generation mode, against `base_url`."""
    schema = schemathesis.openapi.from_dict(document)
    tally = Tally(target)
    session = requests.Session()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        tally.operations += 1
        for mode in modes:
            run = _cases(tally, operation, mode, session, base_url, identities, secrets, examples,
                         html_errors)
            try:
                run()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    raise  # an operation without parameters has no invalid form: fine for negative
    tally.seconds = time.monotonic() - started
    return tally


def _cases(tally: Tally, operation: Any, mode: GenerationMode, session: requests.Session, base_url: str,
           identities: Sequence[Identity], secrets: Sequence[str], examples: int,
           html_errors: bool) -> Callable[[], None]:
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), who=st.sampled_from(list(identities)))
    def send(case: Any, who: Identity) -> None:
        tally.cases += 1
        where = f"{who.name} {mode.value} {operation.label}"
        try:
            response = case.call(base_url=base_url, session=session, headers=who.headers, timeout=60,
                                 allow_redirects=False)
        except requests.RequestException as exc:  # no answer at all: as bad as a 5xx
            tally.server_errors.append(f"{where}: {exc!r}: {case.as_curl_command()}")
            return
        tally.statuses[response.status_code] += 1
        where += f" -> {response.status_code}"
        if response.status_code >= 500:
            tally.server_errors.append(f"{where}: {case.as_curl_command()}\n{response.content[:300]!r}")
        elif problem := judge(case.formatted_path, response, secrets, html_errors=html_errors):
            tally.malformed.append(f"{where}: {problem}: {case.as_curl_command()}\n"
                                   f"{response.content[:300]!r}")

    return send


__all__ = ["EXAMPLES", "Identity", "Tally", "fuzz", "judge", "oauth_error_problem",
           "operation_outcome_problem"]
