"""SMART App Launch 2.2 scopes (v2 and v1), parsed once and used by every service.

Grammar (SMART 2.2 §scopes-and-launch-context): `(patient|user|system)/(Type|*).[c][r][u][d][s]`
optionally followed by `?param=value&...` (granular scopes). v1 `.read`/`.write`/`.*` map to
`rs`/`cud`/`cruds`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

CONTEXTS = ("patient", "user", "system")
# Types a wildcard (`system/*.rs`, `user/*.cruds`) never reaches: they are not clinical data, so
# SMART 2.2's "wildcards include future resource types" does not carry over to them. AuditEvent
# is the audit trail (which therapist read whose psychotherapy notes, 45 CFR 164.312(b)); Consent
# is the patient's 164.508 authorization, whose readers psychnotes names one by one. Each needs a
# scope that names it (`system/AuditEvent.rs`), and the audit routes check the caller's role too.
NOT_IN_WILDCARDS = frozenset({"AuditEvent", "Consent"})
V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
_CLINICAL = re.compile(
    r"^(?P<ctx>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]{1,63})"
    r"\.(?P<perm>read|write|\*|c?r?u?d?s?)(?:\?(?P<query>.+))?$"
)

# interaction -> permission letter (SMART 2.2 §scopes: r covers read, vread, instance history)
INTERACTION_LETTER = {
    "create": "c",
    "read": "r",
    "vread": "r",
    "history-instance": "r",
    "update": "u",
    "patch": "u",
    "delete": "d",
    "search-type": "s",
    "search-system": "s",
    "history-type": "s",
    "history-system": "s",
    "operation": "r",
}


def names(scope_type: str, resource_type: str) -> bool:
    """Whether a scope's type (`*` or a name) reaches `resource_type` (NOT_IN_WILDCARDS)."""
    if scope_type == "*":
        return resource_type != "*" and resource_type not in NOT_IN_WILDCARDS
    return scope_type == resource_type


@dataclass(frozen=True)
class ClinicalScope:
    context: str
    resource_type: str  # "*" for any
    permissions: frozenset[str]
    params: tuple[tuple[str, str], ...] = ()
    text: str = ""

    def covers(self, resource_type: str, interaction: str) -> bool:
        letter = INTERACTION_LETTER.get(interaction)
        return (
            letter is not None
            and letter in self.permissions
            and names(self.resource_type, resource_type)
        )


@dataclass(frozen=True)
class ScopeSet:
    """A parsed scope string. Unknown scopes are kept verbatim so they can be re-issued."""

    clinical: tuple[ClinicalScope, ...] = ()
    other: frozenset[str] = field(default_factory=frozenset)

    def __str__(self) -> str:
        words = [s.text for s in self.clinical] + sorted(self.other)
        return " ".join(words)

    @property
    def words(self) -> list[str]:
        return str(self).split()

    def has(self, word: str) -> bool:
        return word in self.other

    def contexts(self) -> set[str]:
        return {s.context for s in self.clinical}

    def matching(
        self, resource_type: str, interaction: str, contexts: tuple[str, ...] = CONTEXTS
    ) -> list[ClinicalScope]:
        """Every granted scope that covers this interaction (several may, each narrowing)."""
        return [
            s for s in self.clinical
            if s.context in contexts and s.covers(resource_type, interaction)
        ]

    def allows(self, resource_type: str, interaction: str) -> bool:
        return bool(self.matching(resource_type, interaction))


def parse_clinical(word: str) -> ClinicalScope | None:
    match = _CLINICAL.match(word)
    if match is None:
        return None
    perm = match["perm"]
    letters = V1_PERMISSIONS.get(perm, perm)
    if not letters:
        return None
    params: tuple[tuple[str, str], ...] = ()
    if match["query"]:
        params = tuple(parse_qsl(match["query"], keep_blank_values=False))
        if not params:
            return None
    return ClinicalScope(
        context=match["ctx"],
        resource_type=match["type"],
        permissions=frozenset(letters),
        params=params,
        text=word,
    )


def parse(scope: str | None) -> ScopeSet:
    clinical: list[ClinicalScope] = []
    other: set[str] = set()
    for word in (scope or "").split():
        parsed = parse_clinical(word)
        if parsed is not None:
            clinical.append(parsed)
        elif "/" in word and word.split("/")[0] in CONTEXTS:
            continue  # malformed clinical scope: never granted
        else:
            other.add(word)
    return ScopeSet(clinical=tuple(clinical), other=frozenset(other))


def within(requested: ClinicalScope, allowed: ScopeSet) -> bool:
    """True when one registered scope grants everything `requested` asks for."""
    for grant in allowed.clinical:
        if grant.context != requested.context:
            continue
        if requested.resource_type == "*":
            if grant.resource_type != "*":
                continue
        elif not names(grant.resource_type, requested.resource_type):
            continue
        if not requested.permissions <= grant.permissions:
            continue
        if grant.params and set(grant.params) - set(requested.params):
            continue  # a narrower grant cannot yield a wider scope
        return True
    return False


def cap(requested: ScopeSet, allowed: ScopeSet) -> ScopeSet:
    """The part of `requested` that `allowed` (a client's registration) permits."""
    return ScopeSet(
        clinical=tuple(s for s in requested.clinical if within(s, allowed)),
        other=frozenset(w for w in requested.other if w in allowed.other),
    )
