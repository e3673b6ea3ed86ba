"""$meta, $meta-add and $meta-delete (R4 Resource operations, resource-operation-meta*.html).

Checked against R4 4.0.1 (hl7.org/fhir/R4/resource-operation-meta-add.html and the R4
operation-resource-meta*.json definitions):
- `$meta` (Resource-meta): system, type and instance level, `[base]/$meta`,
  `[base]/[Resource]/$meta`, `[base]/[Resource]/[id]/$meta`, and "as a special case" on a
  historical version; OUT `return` 1..1 Meta: at system and type level a summary of the profiles,
  tags and security labels in use, at instance level the version's whole meta. Idempotent (GET).
- `$meta-add` / `$meta-delete` (Resource-meta-add/-delete): instance level only (`system` and
  `type` false, `instance` true); IN `meta` 1..1 Meta, OUT `return` 1..1 Meta ("Resulting meta for
  the resource"). Profiles, tags and security labels are sets: a tag or label is identified by
  system+code (version and display ignored), a profile by its full URL; adding one present
  creates no duplicate, deleting one absent "is not an error". Not idempotent (POST).

Versions. DSTU2 and STU3 said executing $meta-add/-delete "does not cause a new version of the
resource to be created. The meta is updated directly" (and the R4 ballots still did); R4 4.0.1
dropped that comment and the use on historical entries, and R4's Meta says only that changes to it
"might not always be associated with version changes". Records makes each effective change a
new version, like any write, because here the old version must not change: `$sign`'s JWS covers
a note's stored bytes, meta included (records/lifecycle/service.py), so rewriting a signed
version's meta in place would make `$verify-signature` report it tampered. The new version
differs from the one before only in meta.profile/security/tag (and versionId/lastUpdated): the
note's content is as signed, so a locked note accepts it (the store's `transition="meta"`), and
like every write it lands in history, the outbox and the gateway's audit trail (who, when).
A request that changes nothing stores nothing and answers the current meta. Historical
versions are read-only: `$meta` works on them, `$meta-add`/`-delete` answer 400 not-supported.

Who may change what: records/meta/labels.py (security labels: default deny).
"""

from __future__ import annotations

from typing import Any

import orjson
from pymongo.asynchronous.client_session import AsyncClientSession

from mindchart_core import errors, validation
from records.meta import labels
from records.resources import RESOURCES, ResourceDef
from records.store import ResourceStore, StoredResource

CHANGEABLE = ("profile", "security", "tag")
HL7 = "http://hl7.org/fhir/OperationDefinition"
DEFINITIONS = {"meta": f"{HL7}/Resource-meta", "meta-add": f"{HL7}/Resource-meta-add",
               "meta-delete": f"{HL7}/Resource-meta-delete"}
MAX_ITEMS = 100  # profiles, tags or labels one request may name


def parameters(meta: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "return", "valueMeta": meta}]}


def meta_of(stored: StoredResource) -> dict[str, Any]:
    meta: dict[str, Any] = dict(orjson.loads(stored.raw or b"{}").get("meta") or {})
    return meta


def requested_meta(body: Any) -> dict[str, list[Any]]:
    """The IN parameter `meta` (1..1 Meta) of a Parameters body, checked: 400 otherwise."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise errors.Invalid("$meta-add and $meta-delete take a Parameters resource")
    given = [p for p in body.get("parameter") or [] if isinstance(p, dict)]
    metas = [p for p in given if p.get("name") == "meta"]
    if len(metas) != 1 or len(given) != 1 or not isinstance(metas[0].get("valueMeta"), dict):
        raise errors.Invalid("Exactly one parameter 'meta' with a valueMeta is expected",
                             expression=["Parameters.parameter"])
    meta = metas[0]["valueMeta"]
    other = sorted(set(meta) - set(CHANGEABLE) - {"versionId", "lastUpdated"})
    if other:
        raise errors.Invalid(f"Only profile, security and tag change through these operations, not "
                             f"{', '.join(o[:40] for o in other[:5])}",
                             expression=["Parameters.parameter.valueMeta"])
    wanted: dict[str, list[Any]] = {}
    for element in CHANGEABLE:
        items = meta.get(element, [])
        where = [f"Parameters.parameter.valueMeta.{element}"]
        if not isinstance(items, list) or len(items) > MAX_ITEMS:
            raise errors.Invalid(f"meta.{element} must be a list of at most {MAX_ITEMS}", expression=where)
        for item in items:
            if element == "profile":
                if not isinstance(item, str) or not item or len(item) > 1024 or " " in item:
                    raise errors.Invalid("meta.profile holds canonical URLs", expression=where)
            elif not (isinstance(item, dict) and isinstance(item.get("code"), str) and item["code"]
                      and isinstance(item.get("system", ""), str)
                      and (element == "tag" or item.get("system"))):
                raise errors.Invalid(f"meta.{element} holds Codings with a code"
                                     + (" and a system" if element == "security" else ""), expression=where)
        wanted[element] = items
    if not any(wanted.values()):
        raise errors.Invalid("The meta names no profile, tag or security label", expression=[
            "Parameters.parameter.valueMeta"])
    return wanted


def changed(meta: dict[str, Any], wanted: dict[str, list[Any]], *, delete: bool) -> dict[str, Any]:
    """`meta` with the wanted profiles, tags and labels added (no duplicates) or deleted."""
    out = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
    profiles = list(meta.get("profile") or [])
    if delete:
        profiles = [p for p in profiles if p not in wanted["profile"]]
    else:
        profiles += [p for p in dict.fromkeys(wanted["profile"]) if p not in profiles]
    for element in ("security", "tag"):
        current = list(meta.get(element) or [])
        named = {labels.key(c) for c in wanted[element]}
        if delete:
            current = [c for c in current if labels.key(c) not in named]
        else:
            present = {labels.key(c) for c in current}
            for coding in wanted[element]:
                if labels.key(coding) not in present:
                    present.add(labels.key(coding))
                    current.append(dict(coding))
        out[element] = current
    out["profile"] = profiles
    return {k: v for k, v in out.items() if v not in ([], None)}


async def change(store: ResourceStore, definition: ResourceDef, resource_id: str, body: Any, *,
                 delete: bool) -> dict[str, Any]:
    """`$meta-add` / `$meta-delete`: the resulting meta, as a Parameters. Read, checked and written
    in one transaction (a concurrent write makes it run again on the newer version)."""
    wanted = requested_meta(body)

    async def once(session: AsyncClientSession) -> StoredResource:
        # The caller must be allowed to update it: 403 without such a scope, 404 out of view.
        current = await store.read(definition, resource_id, interaction="update", session=session)
        resource = orjson.loads(current.raw or b"{}")
        before = dict(resource.get("meta") or {})
        after = changed(before, wanted, delete=delete)
        labels.check_tags(before.get("tag") or [], after.get("tag") or [])
        labels.check_security(store.policy.token, definition.type, before.get("security") or [],
                              after.get("security") or [])
        if all((before.get(e) or []) == (after.get(e) or []) for e in CHANGEABLE):
            return current  # nothing changes, nothing is stored
        candidate = {**resource, "meta": after}
        if not after:
            candidate.pop("meta")
        validation.validate_resource(candidate, definition.type)
        stored, _ = await store.update(definition, resource_id, candidate, current.version,
                                       session=session, transition="meta")
        return stored

    return parameters(meta_of(await store.atomically(once)))


def summary(in_use: list[tuple[list[str], list[str], list[str]]]) -> dict[str, Any]:
    """A Meta listing every profile, tag and security label of `in_use` (profiles, security
    tokens, tag tokens per resource; tokens are records' `system|code` search forms)."""
    profiles: set[str] = set()
    found: dict[str, set[tuple[str, str]]] = {"security": set(), "tag": set()}
    for profile_list, security, tags in in_use:
        profiles.update(profile_list)
        for element, tokens in (("security", security), ("tag", tags)):
            for token in tokens:
                system, bar, code = token.partition("|")
                if bar and code:
                    found[element].add((system, code))
    meta: dict[str, Any] = {}
    if profiles:
        meta["profile"] = sorted(profiles)
    for element in ("security", "tag"):
        if found[element]:
            meta[element] = [{"system": s, "code": c} if s else {"code": c}
                             for s, c in sorted(found[element])]
    return meta


async def in_use(store: ResourceStore, definition: ResourceDef | None) -> dict[str, Any]:
    """`$meta` at type level (`definition`) or system level (None): what the caller may search."""
    found: list[tuple[list[str], list[str], list[str]]] = []
    for each in [definition] if definition is not None else list(RESOURCES.values()):
        try:
            found += await store.meta_in_use(each)
        except errors.Forbidden:
            if definition is not None:
                raise
    return parameters(summary(found))


__all__ = ["DEFINITIONS", "change", "changed", "in_use", "meta_of", "parameters", "requested_meta",
           "summary"]
