"""What records declares about CDex in its CapabilityStatement, and the OperationDefinitions of
its review operations (served at `[base]/OperationDefinition/{id}` with the lifecycle's).

Supported (Da Vinci CDex 2.1, CapabilityStatement data-source-server and, for attachments sent
to payers, data-source-client): direct query (US Core search, `_sort`/`_count`, Patient search
and `Patient/$match`); task-based data requests (`data-request-code`, `data-request-query`),
answered after a person's review, polled by the payer; attachment requests
(`attachment-request-code`) answered with `$submit-attachment` to the payer's registered
endpoint; signed answers (Bundle.signature, JWS). Not supported: Questionnaire-based requests
(`data-request-questionnaire`, `attachment-request-questionnaire`), Subscription notifications
of Task changes (payers poll).
"""

from __future__ import annotations

from typing import Any

CDEX = "http://hl7.org/fhir/us/davinci-cdex"
SUPPORTED = ("Da Vinci CDex 2.1 data source: direct query (US Core search with _sort/_count, "
             "Patient search and Patient/$match); task-based data requests (data-request-code, "
             "data-request-query) and attachment requests (attachment-request-code), each reviewed "
             "by a practitioner or records administrator before anything is released "
             "($candidates, $approve, $refuse); answers as a signed searchset Bundle contained in "
             "the Task; approved attachments sent by records with $submit-attachment to the payer's "
             "registered endpoint. Not supported: Questionnaire-based requests, Task "
             "subscriptions (poll the Task).")


def _operation(code: str, title: str, description: str, base_url: str,
               parameters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "OperationDefinition", "id": f"Task-{code}",
        "url": f"{base_url}/OperationDefinition/Task-{code}",
        "name": title.replace(" ", "").replace("-", "").replace("'", ""), "title": title,
        "status": "active", "kind": "operation", "description": description, "code": code,
        "resource": ["Task"], "system": False, "type": False, "instance": True,
        "parameter": parameters,
    }


def operation_definitions(base_url: str) -> dict[str, dict[str, Any]]:
    task_out = {"name": "return", "use": "out", "min": 1, "max": "1", "type": "Task",
                "documentation": "The Task after the decision"}
    definitions = [
        _operation("candidates", "Candidates of a CDex request",
                   "What the request would release: the member's signed notes and Observations "
                   "matching its data-code or data-query inputs, each marked restricted when "
                   "labelled R or V. Psychotherapy notes and unsigned notes are never candidates. "
                   "For practitioner and admin users.", base_url,
                   [{"name": "candidate", "use": "out", "min": 0, "max": "*",
                     "documentation": "reference, restricted (boolean), resource",
                     "part": [{"name": "restricted", "use": "out", "min": 1, "max": "1",
                               "type": "boolean"}]}]),
        _operation("approve", "Approve a CDex request",
                   "Releases the chosen candidates as a signed searchset Bundle contained in the "
                   "Task (data requests: completed; attachment requests: sent with "
                   "$submit-attachment, then completed or failed). Restricted candidates only with "
                   "includeRestricted. Each release is a disclosure in the patient's accounting.",
                   base_url,
                   [{"name": "release", "use": "in", "min": 1, "max": "*", "type": "Reference"},
                    {"name": "includeRestricted", "use": "in", "min": 0, "max": "1",
                     "type": "boolean"}, task_out]),
        _operation("refuse", "Refuse a CDex request",
                   "Ends the request rejected with the reason as statusReason; nothing is released.",
                   base_url,
                   [{"name": "reason", "use": "in", "min": 1, "max": "1", "type": "string"}, task_out]),
    ]
    return {d["id"]: d for d in definitions}


def declare(statement: dict[str, Any], base_url: str) -> dict[str, Any]:
    statement.setdefault("instantiates", []).extend([
        f"{CDEX}/CapabilityStatement/data-source-server",
        f"{CDEX}/CapabilityStatement/data-source-client"])
    statement.setdefault("implementationGuide", []).append(
        f"{CDEX}/ImplementationGuide/hl7.fhir.us.davinci-cdex")
    for rest in statement.get("rest", []):
        for resource in rest.get("resource", []):
            if resource.get("type") == "Patient":
                resource.setdefault("operation", []).append(
                    {"name": "match", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-match"})
            elif resource.get("type") == "Task":
                resource["documentation"] = SUPPORTED
                resource["interaction"] = [i for i in resource.get("interaction", [])
                                           if i.get("code") in ("read", "vread", "search-type",
                                                                "history-instance", "create")]
                resource.setdefault("operation", []).extend(
                    {"name": d["code"], "definition": d["url"]}
                    for d in operation_definitions(base_url).values())
    return statement
