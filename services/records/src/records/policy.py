"""Who may see what in records: the one policy point, applied inside the store.

The policy turns a verified access token into a MongoDB filter that every query of patient data is
ANDed with, so search, read, history and includes cannot leak by forgetting a check (medplum
repo.ts, HAPI IConsentService). A resource outside the filter does not exist for the caller: 404.

- `patient/` scopes: only the compartment of the patient in the token's launch context.
- `user/` scopes: a patient user sees their own compartment; a practitioner or admin user sees
  every patient of this (single) practice.
- `system/` scopes: what the client was registered for (capped when the token was issued).
- Granular scopes (`?category=...`) narrow each scope to resources matching their parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mindchart_core import errors
from mindchart_core.scopes import ClinicalScope
from mindchart_core.tokens import AccessToken
from records.resources import ResourceDef
from records.search import query

NOTHING: dict[str, Any] = {"_id": {"$in": []}}


@dataclass(frozen=True)
class AccessPolicy:
    token: AccessToken
    base_url: str

    def _compartment_of_caller(self, scope: ClinicalScope) -> str | bool | None:
        """Patient id the scope is confined to; True for no confinement; None for nothing."""
        if scope.context == "system":
            return True
        if scope.context == "patient":
            return self.token.patient or None
        user = self.token.fhir_user_ref or ""
        if user.startswith("Patient/"):
            return user.split("/", 1)[1]
        if user.startswith(("Practitioner/", "PractitionerRole/")) or "admin" in self.token.roles:
            return True
        return None

    def _scope_filter(self, definition: ResourceDef, scope: ClinicalScope) -> dict[str, Any] | None:
        confinement = self._compartment_of_caller(scope)
        if confinement is None:
            return None
        clauses: list[dict[str, Any]] = []
        if isinstance(confinement, str) and definition.patient_compartment:
            clauses.append({"c": confinement})
        for name, value in scope.params:
            param = definition.param(name)
            if param is None:
                return None  # a granular scope we cannot evaluate grants nothing (default deny)
            _, _, modifier = name.partition(":")
            clauses.append(query.param_clause(param, modifier, value, self.base_url))
        if not clauses:
            return {}
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    def filter_for(self, definition: ResourceDef, interaction: str) -> dict[str, Any]:
        """The filter this caller's data access is confined to, or 403 if no scope covers it."""
        matching = self.token.scope.matching(definition.type, interaction)
        if not matching:
            raise errors.Forbidden(
                f"The granted scopes do not permit {interaction} on {definition.type}"
            )
        alternatives = [f for s in matching if (f := self._scope_filter(definition, s)) is not None]
        if not alternatives:
            return NOTHING
        if any(not f for f in alternatives):
            return {}
        return alternatives[0] if len(alternatives) == 1 else {"$or": alternatives}
