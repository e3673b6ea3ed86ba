"""The `Group` resource type (insurer member lists: `member.entity` → Patient) for records.

TEMPORARY HOME: `records/resources.py` is where declarations belong; this module registers the
Group declaration into `records.resources.RESOURCES` at import time (records.export imports it,
and records.app imports records.export before `create_app` runs `ensure_indexes`), so create, read,
search, history, indexes and the CapabilityStatement all follow from it. Move the `ResourceDef`
below into resources.py and delete this module; nothing else changes.

A Group is in the Patient compartment of each member (R4 compartmentdefinition-patient: `member`),
so a patient-scoped caller sees only groups it belongs to.
"""

from __future__ import annotations

from records.resources import RESOURCES, SEARCH_PARAM_BASE, ResourceDef, SearchParam


def _p(name: str, kind: str, path: str, target: str | None = None) -> SearchParam:
    return SearchParam(name, kind, (path,), target, f"{SEARCH_PARAM_BASE}/Group-{name}")  # type: ignore[arg-type]


GROUP = ResourceDef(
    "Group",
    (
        _p("identifier", "token", "identifier"),
        _p("type", "token", "type"),
        _p("code", "token", "code"),
        _p("actual", "token", "actual"),
        _p("member", "reference", "member.entity", target="Patient"),
        _p("managing-entity", "reference", "managingEntity"),
    ),
    patient_compartment=("member.entity",),
)

RESOURCES.setdefault("Group", GROUP)
