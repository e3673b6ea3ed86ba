"""Every records database query, and nothing else.

Per resource type: a current-version collection `<Type>` and a history collection
`<Type>_history`. A document keeps the resource as the exact JSON bytes we serve (`raw`), so reads
never re-validate or re-model, beside the search values extracted at write time (`sp`) and the
patient compartment (`c`). History entries carry `sp` and `c` too, so the access policy narrows
history exactly as it narrows search. A new version and its history entry are written in one
transaction; optimistic concurrency compares `vid`.

How searches stay indexed on the embedded SecantusDB (DESIGN.md), as measured with explain():
its planner uses an index only when the *whole* filter matches one (a single field, or a compound
index with exactly those fields; any `$and` or extra residual clause means COLLSCAN), and `sort()`
never uses one. So every query here carries a `hint()` naming the single-field index of its most
selective conjunct (`_id`, then patient/subject/target, then the compartment `c`, then other
equalities, then ranges — `query.driving_field`): the datastore scans that index and checks the
other clauses (policy, parameters, `deleted`) on FETCH. Ordering then happens on that bounded
candidate set only (a patient's notes, say), never on a collection.

Paging is keyset, not offset: the default order is `_id` (next page = `_id > last`), and `_sort`
orders the candidate set in memory on values extracted at write time and pages by (sort key, id);
it refuses candidate sets above `MAX_SORT_CANDIDATES` rather than sorting a whole collection. A
cursor names the row a page ended at, so writes between pages neither repeat nor skip rows that
were already there. We chose this over an index-ordered `sp.lastUpdated_lo` scan because
SecantusDB cannot return index order for a compound filter anyway, and `_id` order is stable
under updates (lastUpdated moves a row on every write).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from bson.binary import Binary
from bson.objectid import ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from mindchart_core import errors
from records.policy import AccessPolicy
from records.resources import RESOURCES, ResourceDef
from records.search import extract, query

MAX_SORT_CANDIDATES = 5000  # `_sort` sorts matches in memory; beyond this, narrow the search
MAX_INCLUDES = 1000  # resources added to one page by _include/_revinclude
Session = AsyncClientSession | None


@dataclass(frozen=True)
class StoredResource:
    resource_type: str
    id: str
    version: int
    last_updated: datetime
    raw: bytes | None  # None for a deletion
    sp: dict[str, Any] | None = None
    method: str = "PUT"  # for history entries: POST, PUT or DELETE

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'


@dataclass
class SearchPage:
    resources: list[StoredResource]
    next_cursor: query.Cursor | None
    previous_cursor: query.Cursor | None
    total: int | None = None  # known without an extra count


def _stored(resource_type: str, doc: dict[str, Any]) -> StoredResource:
    raw = doc.get("raw")
    return StoredResource(
        resource_type=resource_type,
        id=doc["id"] if "id" in doc else doc["_id"],
        version=int(doc["vid"]),
        last_updated=doc["ts"].replace(tzinfo=UTC),
        raw=bytes(raw) if raw is not None else None,
        sp=doc.get("sp"),
        method=doc.get("method", "PUT"),
    )


def now() -> datetime:
    # BSON dates hold milliseconds: truncate so what we return equals what we store.
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _and(*clauses: dict[str, Any]) -> dict[str, Any]:
    kept = [c for c in clauses if c]
    if not kept:
        return {}
    return kept[0] if len(kept) == 1 else {"$and": kept}


def index_specs(definition: ResourceDef) -> list[list[tuple[str, int]]]:
    """Every index of a current-version collection (also used by tests to check plans)."""
    specs: list[list[tuple[str, int]]] = [[("c", ASCENDING)], [("sp.lastUpdated_lo", ASCENDING)],
                                          [("sp._security", ASCENDING)], [("sp._tag", ASCENDING)]]
    specs.append([("sp.lastUpdated_hi", ASCENDING)])
    for param in definition.params:
        specs.append([(query.sort_field(param), ASCENDING)])
        if param.type == "string":
            specs.append([(f"sp.{param.name}_x", ASCENDING)])
        if param.type == "date":
            specs.append([(f"sp.{param.name}_hi", ASCENDING)])
    for combo in definition.compound_indexes:
        specs.append([(query.sort_field(definition.param(name)), ASCENDING) for name in combo])
    specs.append([("c", ASCENDING), ("sp.lastUpdated_lo", ASCENDING)])
    return specs


@functools.cache
def indexed_fields(resource_type: str) -> frozenset[str]:
    """Fields with a single-field index on a current-version collection (hint candidates)."""
    specs = index_specs(RESOURCES[resource_type])
    return frozenset({"_id"} | {spec[0][0] for spec in specs if len(spec) == 1})


def hint_for(resource_type: str, filt: dict[str, Any]) -> list[tuple[str, int]] | None:
    """The index a query on `<Type>` must scan (SecantusDB picks none for compound filters)."""
    field = query.driving_field(filt, set(indexed_fields(resource_type)))
    return [(field, ASCENDING)] if field else None


def history_hint(filt: dict[str, Any]) -> list[tuple[str, int]] | None:
    field = query.driving_field(filt, {"id", "c", "ts"})
    return {"id": [("id", ASCENDING), ("vid", ASCENDING)], "c": [("c", ASCENDING), ("ts", ASCENDING)],
            "ts": [("ts", ASCENDING)]}.get(field or "")


async def ensure_indexes(db: AsyncDatabase[dict[str, Any]]) -> None:
    for definition in RESOURCES.values():
        current = db[definition.type]
        for spec in index_specs(definition):
            await current.create_index(spec)
        history = db[f"{definition.type}_history"]
        await history.create_index([("id", ASCENDING), ("vid", ASCENDING)], unique=True)
        await history.create_index([("ts", ASCENDING)])
        await history.create_index([("c", ASCENDING), ("ts", ASCENDING)])


class ResourceStore:
    """The caller's view of the records datastore: every method applies the access policy."""

    def __init__(
        self, client: AsyncMongoClient[dict[str, Any]], db: AsyncDatabase[dict[str, Any]],
        policy: AccessPolicy,
    ) -> None:
        self.client = client
        self.db = db
        self.policy = policy

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncClientSession]:
        """One MongoDB transaction: everything written through `session` commits or none does."""
        async with self.client.start_session() as session, await session.start_transaction():
            yield session

    def _find(self, definition: ResourceDef, filt: dict[str, Any], projection: dict[str, Any],
              session: Session = None) -> Any:
        """Every query of a current-version collection: driven by an index whenever one applies."""
        cursor = self.db[definition.type].find(filt, projection, session=session)
        hint = hint_for(definition.type, filt)
        return cursor.hint(hint) if hint else cursor

    async def _find_one(self, definition: ResourceDef, filt: dict[str, Any], projection: dict[str, Any],
                        session: Session = None) -> dict[str, Any] | None:
        docs = await self._find(definition, filt, projection, session).limit(1).to_list()
        return docs[0] if docs else None

    async def explain_search(self, definition: ResourceDef, request: query.SearchRequest) -> dict[str, Any]:
        """The datastore's plan for a search's candidate query (tests check it scans an index)."""
        plan: dict[str, Any] = await self._find(definition, self._search_filter(definition, request),
                                                {"_id": 1}).explain()
        return plan

    # -- reads ------------------------------------------------------------------------------

    async def read(self, definition: ResourceDef, resource_id: str, *, interaction: str = "read",
                   session: Session = None) -> StoredResource:
        scope = self.policy.filter_for(definition, interaction)
        doc = await self._find_one(definition, _and({"_id": resource_id}, scope),
                                   {"raw": 1, "vid": 1, "ts": 1, "deleted": 1}, session)
        if doc is None:
            raise errors.NotFound(f"{definition.type}/{resource_id} is not known")
        if doc.get("deleted"):
            raise errors.Gone(f"{definition.type}/{resource_id} has been deleted")
        return _stored(definition.type, doc)

    async def vread(self, definition: ResourceDef, resource_id: str, version: int) -> StoredResource:
        scope = await self._visible(definition, resource_id, "vread")
        doc = await self.db[f"{definition.type}_history"].find_one(
            _and({"id": resource_id, "vid": version}, scope),
            hint=[("id", ASCENDING), ("vid", ASCENDING)],
        )
        if doc is None:
            raise errors.NotFound(f"{definition.type}/{resource_id}/_history/{version} is not known")
        if doc.get("raw") is None:
            raise errors.Gone(f"Version {version} of {definition.type}/{resource_id} is a deletion")
        return _stored(definition.type, doc)

    async def _visible(self, definition: ResourceDef, resource_id: str, interaction: str,
                       session: Session = None) -> dict[str, Any]:
        """The policy filter, after checking the resource (maybe deleted) is visible: else 404."""
        scope = self.policy.filter_for(definition, interaction)
        doc = await self._find_one(definition, _and({"_id": resource_id}, scope), {"_id": 1}, session)
        if doc is None:
            raise errors.NotFound(f"{definition.type}/{resource_id} is not known")
        return scope

    async def read_many(self, definition: ResourceDef, ids: list[str],
                        interaction: str = "read") -> list[StoredResource]:
        """Resources by id that the caller may see (for _include); the rest silently absent."""
        try:
            scope = self.policy.filter_for(definition, interaction)
        except errors.Forbidden:
            return []
        docs = await self._find(
            definition, _and({"_id": {"$in": ids[:MAX_INCLUDES]}}, scope, {"deleted": {"$ne": True}}),
            {"raw": 1, "vid": 1, "ts": 1, "sp": 1},
        ).to_list(MAX_INCLUDES)
        return [_stored(definition.type, d) for d in docs]

    async def referring(self, definition: ResourceDef, param: str, refs: list[str]) -> list[StoredResource]:
        """Resources whose reference parameter points at any of `refs` (for _revinclude)."""
        try:
            scope = self.policy.filter_for(definition, "search-type")
        except errors.Forbidden:
            return []
        docs = await self._find(
            definition, _and({f"sp.{param}": {"$in": refs}}, scope, {"deleted": {"$ne": True}}),
            {"raw": 1, "vid": 1, "ts": 1, "sp": 1},
        ).limit(MAX_INCLUDES).to_list()
        return [_stored(definition.type, d) for d in docs]

    def _search_filter(self, definition: ResourceDef, request: query.SearchRequest) -> dict[str, Any]:
        scope = self.policy.filter_for(definition, "search-type")
        return _and(scope, request.filter, {"deleted": {"$ne": True}})

    async def search(self, definition: ResourceDef, request: query.SearchRequest) -> SearchPage:
        """One page of matches; keyset paging, so links stay stable under concurrent writes."""
        base = self._search_filter(definition, request)
        if request.sort:
            return await self._search_sorted(definition, request, base)
        cursor = request.cursor
        backwards = cursor is not None and cursor.backwards
        filt = base
        if cursor is not None:
            filt = _and(base, {"_id": {"$lt" if backwards else "$gt": cursor.id}})
        if request.count == 0:
            return SearchPage([], None, None)
        docs = await self._find(definition, filt, {"raw": 1, "vid": 1, "ts": 1, "sp": 1}).sort(
            "_id", DESCENDING if backwards else ASCENDING
        ).limit(request.count + 1).to_list()
        more = len(docs) > request.count
        docs = docs[: request.count]
        if backwards:
            docs.reverse()
        page = [_stored(definition.type, d) for d in docs]
        if not page:
            return SearchPage([], None, None)
        after = query.Cursor(False, [], page[-1].id)
        before = query.Cursor(True, [], page[0].id)
        has_next = more if not backwards else True
        has_previous = (cursor is not None) if not backwards else more
        return SearchPage(page, after if has_next else None, before if has_previous else None)

    async def _search_sorted(
        self, definition: ResourceDef, request: query.SearchRequest, filt: dict[str, Any]
    ) -> SearchPage:
        """`_sort`: order the (bounded) candidate set in memory on values extracted at write time."""
        fields = {query.sort_field(key.param) if key.param else key.name for key in request.sort}
        projection = {f: 1 for f in fields if f != "_id"}
        candidates = await self._find(definition, filt, projection or {"_id": 1}).limit(
            MAX_SORT_CANDIDATES + 1
        ).to_list()
        if len(candidates) > MAX_SORT_CANDIDATES:
            raise errors.FhirError(
                f"More than {MAX_SORT_CANDIDATES} matches to sort: narrow the search or omit _sort",
                status=400, code="too-costly",
            )
        keyed = [(query.sort_key(request.sort, d), str(d["_id"])) for d in candidates]
        def order(a: tuple[list[Any], str], b: tuple[list[Any], str]) -> int:
            return query.compare_keys(request.sort, a, b)

        compare = functools.cmp_to_key(order)
        keyed.sort(key=compare)
        start, stop = 0, len(keyed)
        cursor = request.cursor
        if cursor is not None:
            mark = compare((cursor.keys, cursor.id))
            if cursor.backwards:
                stop = sum(1 for k in keyed if compare(k) < mark)
                start = max(0, stop - request.count)
            else:
                start = sum(1 for k in keyed if compare(k) <= mark)
        window = keyed[start: start + request.count] if request.count else []
        docs = await self._find(
            definition, {"_id": {"$in": [i for _, i in window]}}, {"raw": 1, "vid": 1, "ts": 1, "sp": 1}
        ).to_list() if window else []
        by_id = {d["_id"]: d for d in docs}
        page = [_stored(definition.type, by_id[i]) for _, i in window if i in by_id]
        next_cursor = previous = None
        if window and start + len(window) < len(keyed):
            next_cursor = query.Cursor(False, window[-1][0], window[-1][1])
        if window and start > 0:
            previous = query.Cursor(True, window[0][0], window[0][1])
        return SearchPage(page, next_cursor, previous, total=len(keyed))

    async def count(self, definition: ResourceDef, request: query.SearchRequest) -> int:
        filt = self._search_filter(definition, request)
        hint = hint_for(definition.type, filt)
        if hint is None:
            return await self.db[definition.type].count_documents(filt)
        return await self.db[definition.type].count_documents(filt, hint=hint)

    async def history(
        self, definition: ResourceDef, resource_id: str | None, *, since: datetime | None,
        count: int, cursor: query.Cursor | None,
    ) -> tuple[list[StoredResource], query.Cursor | None]:
        """Versions newest first (R4 http.html §history), narrowed by the same policy as search."""
        if resource_id is not None:
            scope = await self._visible(definition, resource_id, "history-instance")
            clauses = [{"id": resource_id}, scope]
        else:
            clauses = [self.policy.filter_for(definition, "history-type")]
        if since is not None:
            clauses.append({"ts": {"$gte": since}})
        if cursor is not None:
            try:
                moment = datetime.fromisoformat(str(cursor.keys[0]))
            except (IndexError, ValueError):
                raise errors.Invalid("Invalid paging cursor") from None
            oid = ObjectId(cursor.id) if ObjectId.is_valid(cursor.id) else ObjectId("0" * 24)
            clauses.append({"$or": [{"ts": {"$lt": moment}}, {"ts": moment, "_id": {"$lt": oid}}]})
        filt = _and(*clauses)
        cursor_h = self.db[f"{definition.type}_history"].find(filt)
        hint = history_hint(filt)
        if hint:
            cursor_h = cursor_h.hint(hint)
        docs = await cursor_h.sort(
            [("ts", DESCENDING), ("_id", DESCENDING)]
        ).limit(count + 1).to_list()
        entries = [_stored(definition.type, d) for d in docs[:count]]
        nxt = None
        if len(docs) > count and count:
            last = docs[count - 1]
            nxt = query.Cursor(False, [last["ts"].replace(tzinfo=UTC).isoformat()], str(last["_id"]))
        return entries, nxt

    # -- writes -----------------------------------------------------------------------------

    async def create(self, definition: ResourceDef, resource: dict[str, Any], *,
                     resource_id: str | None = None, session: Session = None) -> StoredResource:
        stored, _ = await self._write(definition, resource_id or str(uuid.uuid4()), resource,
                                      expected=None, create=True, session=session)
        return stored

    async def update(
        self, definition: ResourceDef, resource_id: str, resource: dict[str, Any],
        if_match: int | None = None, *, session: Session = None,
    ) -> tuple[StoredResource, bool]:
        """Update, or create with the client's id (update-as-create). Returns (stored, created)."""
        scope = self.policy.filter_for(definition, "update")
        collection = self.db[definition.type]
        current = await collection.find_one({"_id": resource_id}, {"vid": 1}, session=session)
        if current is not None and scope and await self._find_one(
            definition, _and({"_id": resource_id}, scope), {"_id": 1}, session
        ) is None:
            raise errors.NotFound(f"{definition.type}/{resource_id} is not known")
        if if_match is not None and (current is None or int(current["vid"]) != if_match):
            raise errors.PreconditionFailed("If-Match does not match the current version")
        expected = int(current["vid"]) if current is not None else None
        return await self._write(definition, resource_id, resource, expected=expected,
                                 create=current is None, session=session)

    async def delete(self, definition: ResourceDef, resource_id: str, if_match: int | None = None,
                     *, session: Session = None) -> None:
        await self._visible(definition, resource_id, "delete", session)
        current = await self.db[definition.type].find_one(
            {"_id": resource_id}, {"vid": 1, "deleted": 1, "c": 1, "sp": 1}, session=session
        )
        if current is None:
            raise errors.NotFound(f"{definition.type}/{resource_id} is not known")
        if if_match is not None and int(current["vid"]) != if_match:
            raise errors.PreconditionFailed("If-Match does not match the current version")
        if current.get("deleted"):
            return
        moment = now()
        version = int(current["vid"]) + 1

        async def run(s: AsyncClientSession) -> None:
            result = await self.db[definition.type].update_one(
                {"_id": resource_id, "vid": version - 1},
                {"$set": {"vid": version, "ts": moment, "deleted": True, "raw": None}},
                session=s,
            )
            if result.matched_count != 1:
                raise errors.Conflict("The resource changed while it was being deleted")
            await self.db[f"{definition.type}_history"].insert_one(
                {"id": resource_id, "vid": version, "ts": moment, "raw": None, "method": "DELETE",
                 "c": current.get("c", []), "sp": current.get("sp", {})},
                session=s,
            )

        if session is not None:
            await run(session)
            return
        async with self.transaction() as own:
            await run(own)

    async def _compartment(self, definition: ResourceDef, body: dict[str, Any],
                           session: Session) -> list[str]:
        ids = set(extract.patient_compartment(body, definition, self.policy.base_url))
        for path in definition.compartment_from_targets:
            for node in extract.walk(body, path):
                for ref in extract.reference_of(node, self.policy.base_url):
                    kind, _, ident = ref.partition("/")
                    if kind in RESOURCES and kind != "Patient" and ident:
                        target = await self.db[kind].find_one({"_id": ident}, {"c": 1}, session=session)
                        ids.update(target.get("c", []) if target else [])
        return sorted(ids)

    async def _write(
        self, definition: ResourceDef, resource_id: str, resource: dict[str, Any],
        *, expected: int | None, create: bool, session: Session,
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
        try:
            sp = extract.extract(body, definition, self.policy.base_url)
        except (ValueError, OverflowError):  # e.g. a dateTime whose offset leaves year 1..9999
            raise errors.Unprocessable("A date in this resource is outside the searchable range") from None
        sp.update(query.last_updated_fields(moment))
        compartment = await self._compartment(definition, body, session)
        doc = {"vid": version, "ts": moment, "deleted": False, "raw": Binary(raw), "sp": sp,
               "c": compartment}
        collection = self.db[definition.type]

        async def run(s: AsyncClientSession) -> None:
            try:
                if expected is None:
                    await collection.insert_one({"_id": resource_id, **doc}, session=s)
                else:
                    result = await collection.update_one(
                        {"_id": resource_id, "vid": expected}, {"$set": doc}, session=s
                    )
                    if result.matched_count != 1:
                        raise errors.Conflict("The resource changed meanwhile; retry with its new version")
            except DuplicateKeyError:
                raise errors.Conflict(f"{definition.type}/{resource_id} was created meanwhile") from None
            # The written version must itself be visible to the writer: a patient-scoped client
            # cannot file a resource into another patient's compartment.
            if scope and await self._find_one(
                definition, _and({"_id": resource_id}, scope), {"_id": 1}, s
            ) is None:
                raise errors.Forbidden(  # leaving the block aborts the transaction
                    f"The granted scopes do not permit writing this {definition.type}"
                )
            await self.db[f"{definition.type}_history"].insert_one(
                {"id": resource_id, "vid": version, "ts": moment, "raw": Binary(raw),
                 "method": "POST" if expected is None else "PUT", "c": compartment, "sp": sp},
                session=s,
            )

        if session is not None:
            await run(session)
        else:
            async with self.transaction() as own:
                await run(own)
        return StoredResource(definition.type, resource_id, version, moment, raw, sp,
                              "POST" if expected is None else "PUT"), create


__all__ = ["MAX_SORT_CANDIDATES", "ResourceStore", "SearchPage", "StoredResource", "ensure_indexes",
           "hint_for", "index_specs", "indexed_fields", "instant", "now"]
