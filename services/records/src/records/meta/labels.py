"""Who may change a resource's meta through $meta-add / $meta-delete: records' policy, default deny.

Security labels are not content, but they drive disclosure: `$export` withholds resources
labelled R or V (records/export), CDex releases nothing labelled PSYTHPN and only with care
what is R or V (records/cdex/review.py), and subscription notifications carry them. So:

- tags and profiles: whoever may `update` the resource (the store's policy filter decides, as for
  any write: a patient-confined caller only inside their own compartment, nobody for a Task);
- adding a security label (it only restricts disclosure): a signed-in practitioner
  (`fhirUser` Practitioner/PractitionerRole) or an `admin` / `compliance` user, under a `user/`
  scope that permits `update` on the type;
- removing a security label (it loosens disclosure): only an `admin` or `compliance` user under
  such a `user/` scope;
- nobody else: backend (`system/`) clients, patient-context tokens and patient users are refused
  (403) any change of `meta.security`.

Whatever the caller, a resource keeps at most one confidentiality code (HL7 v3-Confidentiality,
shared/STANDARDS.md §7: "Confidentiality, exactly one"; 422 otherwise: delete the old one first),
and records' own tags (the awaiting-co-signature tag set by `$sign`, the CDex requester tag set
on Tasks, the SUBSETTED tag of subsetted answers) are never added or removed this way (422).
"""

from __future__ import annotations

from typing import Any

from mindchart_core import errors
from mindchart_core.note_lifecycle import AWAITING_COSIGNATURE
from mindchart_core.tokens import AccessToken
from records.policy import TASK_CLIENT_TAG

CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
LABEL_STEWARDS = frozenset({"admin", "compliance"})  # the gateway's roles (gateway/admin.py ROLES)
RESERVED_TAG_SYSTEMS = frozenset({AWAITING_COSIGNATURE, TASK_CLIENT_TAG})
SUBSETTED = ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "SUBSETTED")

Key = tuple[str | None, str | None]


def key(coding: dict[str, Any]) -> Key:
    """R4 Resource-meta-add: the identity of a tag or security label is system+code."""
    return coding.get("system"), coding.get("code")


def _user_update(token: AccessToken, resource_type: str) -> bool:
    return any(s.context == "user" for s in token.scope.matching(resource_type, "update"))


def check_security(token: AccessToken, resource_type: str, before: list[dict[str, Any]],
                   after: list[dict[str, Any]]) -> None:
    old, new = {key(c) for c in before}, {key(c) for c in after}
    added, removed = new - old, old - new
    if not added and not removed:
        return
    user = token.fhir_user_ref or ""
    steward = bool(LABEL_STEWARDS & set(token.roles))
    clinician = user.startswith(("Practitioner/", "PractitionerRole/"))
    if not _user_update(token, resource_type) or user.startswith("Patient/"):
        raise errors.Forbidden("Security labels are changed only by a signed-in practitioner, "
                               "administrator or compliance officer (user/ scopes)")
    if removed and not steward:
        raise errors.Forbidden("Removing a security label loosens disclosure: only an administrator "
                               "or compliance officer may")
    if added and not (steward or clinician):
        raise errors.Forbidden("Only a practitioner, administrator or compliance officer may add "
                               "security labels")
    if sum(1 for system, _ in new if system == CONFIDENTIALITY) > 1:
        raise errors.Unprocessable(
            "A resource carries one confidentiality code (v3-Confidentiality): $meta-delete the "
            "current one before adding another", expression=["Parameters.parameter.valueMeta.security"])


def check_tags(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    old, new = {key(c) for c in before}, {key(c) for c in after}
    for system, code in old ^ new:
        if system in RESERVED_TAG_SYSTEMS or (system, code) == SUBSETTED:
            raise errors.Unprocessable(f"The tag {system}|{code} is records' own and changes only "
                                       "through the operation that sets it",
                                       expression=["Parameters.parameter.valueMeta.tag"])


__all__ = ["CONFIDENTIALITY", "LABEL_STEWARDS", "RESERVED_TAG_SYSTEMS", "check_security", "check_tags",
           "key"]
