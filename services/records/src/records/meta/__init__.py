"""Resource meta operations: `$meta` (system, type, instance, historical version), `$meta-add` and
`$meta-delete` (instance) — operations.py (what R4 defines and how records versions it),
labels.py (who may change security labels: default deny), routes.py (HTTP)."""

from __future__ import annotations

from typing import Any

from records.meta.operations import DEFINITIONS
from records.resources import RESOURCES

# Types whose meta changes only through records' own code: Tasks are written by the CDex and
# amendment operations alone (records/policy.py), so $meta-add/-delete can never apply.
READ_ONLY_META = frozenset({"Task"})

DOCUMENTATION = {
    "meta": "Profiles, tags and security labels in use (system, type) or of a resource or version",
    "meta-add": ("Adds profiles, tags, security labels; each change is a new version. Security labels: "
                 "practitioner, admin or compliance users only (user/ scopes); reserved tags refused"),
    "meta-delete": ("Deletes profiles, tags, security labels; each change is a new version. Removing a "
                    "security label: admin or compliance users only (user/ scopes)"),
}


def declare(statement: dict[str, Any]) -> dict[str, Any]:
    """List the operations on every resource and `$meta` at system level (R4 capabilitystatement
    `rest.resource.operation` / `rest.operation`: a name and the OperationDefinition's canonical)."""
    for rest in statement.get("rest", []):
        for resource in rest.get("resource", []):
            if resource.get("type") not in RESOURCES:
                continue  # served by another part of records (subscriptions), not this store
            resource.setdefault("operation", []).extend(
                {"name": code, "definition": url, "documentation": DOCUMENTATION[code]}
                for code, url in DEFINITIONS.items()
                if code == "meta" or resource.get("type") not in READ_ONLY_META)
        rest.setdefault("operation", []).append(
            {"name": "meta", "definition": DEFINITIONS["meta"], "documentation": DOCUMENTATION["meta"]})
    return statement


__all__ = ["declare"]
