"""Every records database query, and nothing else.

Per resource type: a current-version collection `<Type>` and a history collection
`<Type>_history`. A document keeps the resource as the exact JSON bytes we serve (`raw`), so reads
never re-validate or re-model, beside the search values extracted at write time (`sp`) and the
patient compartment (`c`). A new version and its history entry are written in one transaction;
optimistic concurrency compares `vid`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from bson.binary import Binary
from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from mindchart_core import errors
from records.policy import AccessPolicy
from records.resources import RESOURCES, ResourceDef
from records.search import extract, query


@dataclass(frozen=True)
class StoredResource:
    resource_type: str
    id: str
    version: int
    last_updated: datetime
    raw: bytes | None  # None for a deletion

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'


def _stored(resource_type: str, doc: dict[str, Any]) -> StoredResource:
    raw = doc.get("raw")
    return StoredResource(
        resource_type=resource_type,
        id=doc["id"] if "id" in doc else doc["_id"],
        version=int(doc["vid"]),
        last_updated=doc["ts"].replace(tzinfo=UTC),
        raw=bytes(raw) if raw is not None else None,
    )


def now() -> datetime:
    # BSON dates hold milliseconds: truncate so what we return equals what we store.
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def ensure_indexes(db: AsyncDatabase[dict[str, Any]]) -> None:
    for definition in RESOURCES.values():
        current = db[definition.type]
        await current.create_index([("c", ASCENDING)])
        await current.create_index([("sp.lastUpdated_lo", ASCENDING)])
        for param in definition.params:
            field = f"sp.{param.name}_lo" if param.type == "date" else f"sp.{param.name}"
            await current.create_index([(field, ASCENDING)])
        for combo in definition.compound_indexes:
            keys = []
            for name in combo:
                param = definition.param(name)
                is_date = param is not None and param.type == "date"
                keys.append((f"sp.{name}_lo" if is_date else f"sp.{name}", ASCENDING))
            await current.create_index(keys)
        history = db[f"{definition.type}_history"]
        await history.create_index([("id", ASCENDING), ("vid", ASCENDING)], unique=True)
        await history.create_index([("ts", ASCENDING)])


class ResourceStore:
    """The caller's view of the records datastore: every method applies the access policy."""

    def __init__(
        self, client: AsyncMongoClient[dict[str, Any]], db: AsyncDatabase[dict[str, Any]],
        policy: AccessPolicy,
    ) -> None:
        self.client = client
        self.db = db
        self.policy = policy

    # -- reads ------------------------------------------------------------------------------

    async def read(self, definition: ResourceDef, resource_id: str) -> StoredResource:
        scope = self.policy.filter_for(definition, "read")
        doc = await self.db[definition.type].find_one(
            {"$and": [{"_id": resource_id}, scope]}, {"raw": 1, "vid": 1, "ts": 1, "deleted": 1}
        )
        if doc is None:
            raise errors.NotFound(f"{definition.type}/{resource_id} is not known")
        if doc.get("deleted"):
            raise errors.Gone(f"{definition.type}/{resource_id} has been deleted")
        return _stored(definition.type, doc)

    async def vread(self, definition: ResourceDef, resource_id: str, version: int) -> StoredResource:
        await self._visible(definition, resource_id, "vread")
        doc = await self.db[f"{definition.type}_history"].find_one({"id": resource_id, "vid": version})
        if doc is None:
            raise errors.NotFound(f"{definition.type}/{resource_id}/_history/{version} is not known")
        if doc.get("raw") is None:
            raise errors.Gone(f"Version {version} of {definition.type}/{resource_id} is a deletion")
        return _stored(definition.type, doc)

    async def _visible(self, definition: ResourceDef, resource_id: str, interaction: str) -> dict[str, Any]:
        scope = self.policy.filter_for(definition, interaction)
        doc = await self.db[definition.type].find_one(
            {"$and": [{"_id": resource_id}, scope]}, {"vid": 1, "deleted": 1}
        )
        if doc is None:
            raise errors.NotFound(f"{definition.type}/{resource_id} is not known")
        return doc

    async def search(
        self, definition: ResourceDef, request: query.SearchRequest
    ) -> tuple[list[StoredResource], bool]:
        """One page of matches in id order (keyset paging: stable under concurrent writes)."""
        scope = self.policy.filter_for(definition, "search-type")
        clauses = [scope, request.filter, {"deleted": {"$ne": True}}]
        if request.cursor:
            clauses.append({"_id": {"$gt": request.cursor}})
        filt = {"$and": [c for c in clauses if c]}
        if request.count == 0:
            return [], False
        cursor = self.db[definition.type].find(filt, {"raw": 1, "vid": 1, "ts": 1})
        docs = await cursor.sort("_id", ASCENDING).limit(request.count + 1).to_list()
        page = [_stored(definition.type, d) for d in docs[: request.count]]
        return page, len(docs) > request.count

    async def count(self, definition: ResourceDef, request: query.SearchRequest) -> int:
        scope = self.policy.filter_for(definition, "search-type")
        clauses = [scope, request.filter, {"deleted": {"$ne": True}}]
        return await self.db[definition.type].count_documents({"$and": [c for c in clauses if c]})

    # -- writes -----------------------------------------------------------------------------

    async def create(self, definition: ResourceDef, resource: dict[str, Any]) -> StoredResource:
        resource_id = str(uuid.uuid4())
        stored, _ = await self._write(definition, resource_id, resource, expected=None, create=True)
        return stored

    async def update(
        self, definition: ResourceDef, resource_id: str, resource: dict[str, Any],
        if_match: int | None = None,
    ) -> tuple[StoredResource, bool]:
        """Update, or create with the client's id (update-as-create). Returns (stored, created)."""
        scope = self.policy.filter_for(definition, "update")
        current = await self.db[definition.type].find_one({"_id": resource_id}, {"vid": 1, "c": 1, "sp": 1})
        if current is not None:
            visible = await self.db[definition.type].find_one(
                {"$and": [{"_id": resource_id}, scope]}, {"_id": 1}
            )
            if visible is None:
                raise errors.NotFound(f"{definition.type}/{resource_id} is not known")
        if if_match is not None and (current is None or int(current["vid"]) != if_match):
            raise errors.PreconditionFailed("If-Match does not match the current version")
        expected = int(current["vid"]) if current is not None else None
        return await self._write(definition, resource_id, resource, expected=expected,
                                 create=current is None)

    async def delete(self, definition: ResourceDef, resource_id: str) -> None:
        current = await self._visible(definition, resource_id, "delete")
        if current.get("deleted"):
            return
        moment = now()
        version = int(current["vid"]) + 1
        async with self.client.start_session() as session, await session.start_transaction():
            result = await self.db[definition.type].update_one(
                {"_id": resource_id, "vid": version - 1},
                {"$set": {"vid": version, "ts": moment, "deleted": True, "raw": None}},
                session=session,
            )
            if result.matched_count != 1:
                raise errors.Conflict("The resource changed while it was being deleted")
            await self.db[f"{definition.type}_history"].insert_one(
                {"id": resource_id, "vid": version, "ts": moment, "raw": None, "method": "DELETE"},
                session=session,
            )

    async def _write(
        self, definition: ResourceDef, resource_id: str, resource: dict[str, Any],
        *, expected: int | None, create: bool,
    ) -> tuple[StoredResource, bool]:
        interaction = "create" if create else "update"
        scope = self.policy.filter_for(definition, interaction)
        version = (expected or 0) + 1
        moment = now()
        meta = dict(resource.get("meta", {}))
        meta.update(versionId=str(version), lastUpdated=instant(moment))
        body = {**resource, "id": resource_id, "meta": meta}
        body = {"resourceType": body.pop("resourceType"), "id": body.pop("id"), **body}
        raw = orjson.dumps(body)
        sp = extract.extract(body, definition, self.policy.base_url)
        sp.update(query.last_updated_fields(moment))
        doc = {
            "vid": version, "ts": moment, "deleted": False, "raw": Binary(raw), "sp": sp,
            "c": extract.patient_compartment(body, definition, self.policy.base_url),
        }
        collection = self.db[definition.type]
        async with self.client.start_session() as session, await session.start_transaction():
            try:
                if create and expected is None:
                    await collection.insert_one({"_id": resource_id, **doc}, session=session)
                else:
                    result = await collection.update_one(
                        {"_id": resource_id, "vid": expected}, {"$set": doc}, session=session
                    )
                    if result.matched_count != 1:
                        raise errors.Conflict("The resource changed meanwhile; retry with its new version")
            except DuplicateKeyError:
                raise errors.Conflict(f"{definition.type}/{resource_id} was created meanwhile") from None
            # The written version must itself be visible to the writer: a patient-scoped client
            # cannot file a resource into another patient's compartment.
            if scope and await collection.find_one(
                {"$and": [{"_id": resource_id}, scope]}, {"_id": 1}, session=session
            ) is None:
                raise errors.Forbidden(  # leaving the block aborts the transaction
                    f"The granted scopes do not permit writing this {definition.type}"
                )
            await self.db[f"{definition.type}_history"].insert_one(
                {"id": resource_id, "vid": version, "ts": moment, "raw": Binary(raw),
                 "method": "POST" if create and expected is None else "PUT"},
                session=session,
            )
        return StoredResource(definition.type, resource_id, version, moment, raw), create
