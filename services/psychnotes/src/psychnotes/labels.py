"""Security labels every psychotherapy note carries, whatever the client sent.

V (very restricted) + PSYTHPN (psychotherapy note) + NOAUTH (no disclosure without the subject's
authorization): shared/STANDARDS.md §7, HL7 v3 Confidentiality / ActCode.
"""

from __future__ import annotations

from typing import Any

CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

PSYCHOTHERAPY_NOTE_LABELS: list[dict[str, Any]] = [
    {"system": CONFIDENTIALITY, "code": "V", "display": "very restricted"},
    {"system": ACT_CODE, "code": "PSYTHPN", "display": "psychotherapy note information sensitivity"},
    {"system": ACT_CODE, "code": "NOAUTH", "display": "no disclosure without subject authorization"},
]


def label(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource's labels (meta.security) and the document's (securityLabel) set by the server."""
    meta = {k: v for k, v in resource.get("meta", {}).items() if k != "security"}
    meta["security"] = [dict(c) for c in PSYCHOTHERAPY_NOTE_LABELS]
    out = {**resource, "meta": meta}
    if resource.get("resourceType") == "DocumentReference":
        out["securityLabel"] = [{"coding": [dict(c)]} for c in PSYCHOTHERAPY_NOTE_LABELS]
    return out
