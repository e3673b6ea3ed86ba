"""Who may see what in records: the one policy point, applied inside the store.

The policy turns a verified access token into a MongoDB filter that every query of patient data is
ANDed with, so search, read, history and includes cannot leak by forgetting a check (medplum
repo.ts, HAPI IConsentService). A resource outside the filter does not exist for the caller: 404.

- `patient/` scopes: only the compartment of the patient in the token's launch context.
- `user/` scopes: a patient user sees their own compartment; a practitioner or admin user sees
  every patient of this (single) practice.
- `system/` scopes: what the client was registered for (capped when the token was issued).
- Granular scopes (`?category=...`) narrow each scope to resources matching their parameters.
- `Task` (Da Vinci CDex requests, records/cdex; amendment requests, records/amendments): a payer
  client (role `payer`) sees only the Tasks it posted (tagged with its client id when records
  stored them); practitioner and admin users see all of them (the review queue); a patient
  (patient-context token, or a patient user) sees only the amendment requests whose `for` is
  them (45 CFR 164.526); nobody else sees any. Tasks are written only by records' own CDex and
  amendment code (tokens `CDEX_CLIENT`, `AMENDMENTS_CLIENT`), never by a REST create, update,
  patch, delete or transaction entry, so a Task's status and output change only through the
  review or the amendment operations.
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
PAYER_ROLE = "payer"
# Records' own CDex code acts under this client id, which no registration can take (the gateway
# allows only letters, digits, '.', '_' and '-' in client ids).
CDEX_CLIENT = "urn:mindchart:records:cdex"
AMENDMENTS_CLIENT = "urn:mindchart:records:amendments"  # records/amendments, likewise
INTERNAL_TASK_WRITERS = frozenset({CDEX_CLIENT, AMENDMENTS_CLIENT})
# Task.code of a patient's amendment request (records/amendments/requests.py documents it).
AMENDMENT_REQUEST = "https://mindchart.dev/fhir/CodeSystem/amendment|amendment-request"
# meta.tag naming the payer client that posted a Task (set by records, never by the payer).
TASK_CLIENT_TAG = "https://mindchart.dev/fhir/CodeSystem/cdex-requester-client"
TASK_WRITES = frozenset({"create", "update", "patch", "delete"})


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

    def _task_filter(self, scope: ClinicalScope, interaction: str) -> dict[str, Any] | None:
        if self.token.client_id in INTERNAL_TASK_WRITERS:
            return {}
        if interaction in TASK_WRITES:
            return None
        confinement = self._compartment_of_caller(scope)
        if isinstance(confinement, str) and (scope.context == "patient" or (
                self.token.fhir_user_ref or "").startswith("Patient/")):
            return {"$and": [{"sp.patient": {"$in": [f"Patient/{confinement}"]}},
                             {"sp.code": {"$in": [AMENDMENT_REQUEST]}}]}
        if scope.context == "system" and PAYER_ROLE in self.token.roles:
            return {"sp._tag": f"{TASK_CLIENT_TAG}|{self.token.client_id}"}
        user = self.token.fhir_user_ref or ""
        if scope.context == "user" and (
                user.startswith(("Practitioner/", "PractitionerRole/")) or "admin" in self.token.roles):
            return {}
        return None

    def _scope_filter(self, definition: ResourceDef, scope: ClinicalScope,
                      interaction: str = "read") -> dict[str, Any] | None:
        if definition.type == "Task":
            return self._task_filter(scope, interaction)
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

    def confined_patient(self, definition: ResourceDef, interaction: str) -> str | None:
        """The patient this caller's `interaction` is confined to, when every scope granting it
        is confined to that one patient (patient/ scopes, a patient user); else None.

        A write by such a caller must fall entirely inside that patient's compartment: the
        resource's own compartment is that patient alone, and every reference it carries points
        inside it (store._inside_compartment). 45 CFR 164.524 gives a patient access to their own
        designated record set, not the power to file into another's."""
        confinements = {self._compartment_of_caller(s)
                        for s in self.token.scope.matching(definition.type, interaction)}
        if len(confinements) == 1:
            only = confinements.pop()
            return only if isinstance(only, str) else None
        return None

    def filter_for(self, definition: ResourceDef, interaction: str) -> dict[str, Any]:
        """The filter this caller's data access is confined to, or 403 if no scope covers it."""
        matching = self.token.scope.matching(definition.type, interaction)
        if not matching:
            raise errors.InsufficientScope(
                f"The granted scopes do not permit {interaction} on {definition.type}"
            )
        alternatives = [f for s in matching
                        if (f := self._scope_filter(definition, s, interaction)) is not None]
        if not alternatives:
            return NOTHING
        if any(not f for f in alternatives):
            return {}
        return alternatives[0] if len(alternatives) == 1 else {"$or": alternatives}
