"""Every records database query, and nothing else.

Per resource type: a current-version collection `<Type>` and a history collection
`<Type>_history`. A document keeps the resource as the exact JSON bytes we serve (`raw`), so reads
never re-validate or re-model, beside the search values extracted at write time (`sp`) and the
patient compartment (`c`), and for a DocumentReference the amendment marker (`appended`, the
ids of what 45 CFR 164.526 appended to the note: records/amendments/store.py). History entries
carry `sp` and `c` too, so the access policy narrows history exactly as it narrows search. A new
version and its history entry are written in one transaction; optimistic concurrency compares
`vid`.

How queries stay index-bound on the embedded SecantusDB (DESIGN.md), measured with explain(): its
planner uses an index only when the *whole* filter matches one (a single field, or a compound
index with exactly those fields); any `$and`, extra clause or `$elemMatch` means COLLSCAN, and a
`hint()` scans the entire index. So every query of patient data (read, vread, history, search,
`_sort`, count, includes, `$everything`, export streams) runs in two phases through `select`,
`count` or `stream` below:

1. The datastore is sent only the *driving* conjunct (`query.driving_clause`: `_id`, then
   patient/subject/target, then the compartment `c`, then other equalities, then ranges) as the
   whole filter, with no hint: an IXSCAN that examines only those candidates (a patient's notes,
   say), never the collection. Equality, `$in` and ranges are IXSCANs; an `$elemMatch` of bounds
   drives as the plain range (a superset); ranges on `_id` scan, so they never drive.
2. The whole filter (access policy, parameters, `deleted`, keyset cursor) is evaluated on those
   candidates in Python by `mindchart_core.matcher` (MongoDB semantics, strict: an operator it does
   not implement raises; tests/integration/test_records_matcher.py checks it against the datastore
   on hundreds of records' own filters). Ordering and paging happen on that bounded set.

Candidates are capped at `MAX_CANDIDATES`: a driver matching more, or a filter with no driver at
all, is sent to the datastore whole (correct everywhere; a scan on SecantusDB, planned well by real
MongoDB). Export streams never cap: they filter the driver's cursor on the fly, in bounded memory.
Candidates driven by an id or a patient's compartment are read whole in one round trip (measured
faster); other candidates are read without `raw` (the stored JSON), which is then fetched for the
page's matches only, by `_id`, and re-checked against the filter.

Only indexes that can drive phase 1 exist (`index_specs`: `c`, `sp.lastUpdated_lo`, references,
strings, identifier/code tokens, date `_lo`s); `ensure_indexes` drops any other on records'
collections, so deployments shed the retired ones (status, category, `_security`, `_tag`, `_x`,
`_hi`, compounds), which cost writes and could never drive a query here.

Measured 2026-11-22 on SecantusDB 0.7.0b3 (2 shared cores, so ±50% run to run), p50 through
ResourceStore.search for patient bench-p3 (10 notes), notes + one Observation each loaded in
records' shape (bench.dataset's builders with `stored_document`), before (hinted `$and`, ~20
indexes per collection) → after (two phases, this index set):

    DocumentReference?patient&category        1k: 95 → 5-8 ms      20k: 3137 → 3-7 ms
    DocumentReference?patient&category&date   1k: 100 → 7-9 ms     20k: 2573 → 4-8 ms
    Observation?patient&code                  1k: 83 → 6-8 ms      20k: 2624 → 3-6 ms
    read by id (patient-scoped token)         1k: 41-46 → 1-2 ms   20k: 1074-1306 → 1.1 ms
    bulk insert, note + Observation           79-88 → 134-248 notes/s (the index diet)

(system and patient-scoped tokens alike; the 20k "before" rows ran with other load on the
machine, where this morning's quieter probe measured 1846 ms for a hinted search).

Paging is keyset, not offset: the default order is `_id` (next page = `_id > last`), and `_sort`
orders the matches in memory on values extracted at write time and pages by (sort key, id); it
refuses more than `MAX_SORT_CANDIDATES` matches rather than sorting a whole collection. A
cursor names the row a page ended at, so writes between pages neither repeat nor skip rows that
were already there. We chose this over an index-ordered `sp.lastUpdated_lo` scan because
SecantusDB cannot return index order for a compound filter anyway, and `_id` order is stable
under updates (lastUpdated moves a row on every write).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from bson.binary import Binary
from bson.objectid import ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError

from mindchart_core import errors, matcher
from records.lifecycle import rules as lifecycle_rules
from records.policy import AccessPolicy
from records.resources import RESOURCES, ResourceDef
from records.search import extract, query
from records.subscriptions import outbox

MAX_SORT_CANDIDATES = 5000  # `_sort` sorts matches in memory; beyond this, narrow the search
MAX_CHAIN_MATCHES = 1000  # records.search.chain: ids one chained parameter may resolve to
MAX_INCLUDES = 1000  # resources added to one page by _include/_revinclude
CONFLICT_RETRY_SECONDS = 15.0  # how long a conditional interaction waits out concurrent ones
Session = AsyncClientSession | None
T = TypeVar("T")


class _Raced(Exception):
    """The version a write expected was replaced by a concurrent writer before it committed."""


def _transient(exc: PyMongoError) -> bool:
    """A write conflict with a concurrent transaction, worth running again (MongoDB labels it
    TransientTransactionError). An unreachable datastore carries the label too: that is a 503."""
    return exc.has_error_label("TransientTransactionError") and not isinstance(exc, ConnectionFailure)
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredResource:
    resource_type: str
    id: str
    version: int
    last_updated: datetime
    raw: bytes | None  # None for a deletion
    sp: dict[str, Any] | None = None
    method: str = "PUT"  # for history entries: POST, PUT or DELETE
    history_id: str | None = None  # for history entries: the version document's id (paging)
    # A note's amendment marker (APPENDED below): the ids of the statements of disagreement and
    # rebuttals appended to it, () for none, None when not known (a document stored before the
    # marker existed and not yet backfilled): then records/amendments/appended.py asks.
    appended: tuple[str, ...] | None = None

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
    marker = doc.get(APPENDED)
    return StoredResource(
        resource_type=resource_type,
        id=doc["id"] if "id" in doc else doc["_id"],
        version=int(doc["vid"]),
        last_updated=doc["ts"].replace(tzinfo=UTC),
        raw=bytes(raw) if raw is not None else None,
        sp=doc.get("sp"),
        method=doc.get("method", "PUT"),
        history_id=str(doc["_id"]) if "id" in doc else None,
        appended=tuple(marker) if isinstance(marker, list) else None,
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


# Token parameters selective enough to drive a query; the others (status, category, gender, ...)
# match most of a collection, so as drivers they would only overflow MAX_CANDIDATES.
DRIVING_TOKENS = frozenset({"identifier", "code"})


def index_specs(definition: ResourceDef) -> list[list[tuple[str, int]]]:
    """Every index of a current-version collection: the single-field indexes a phase-1 query can
    be driven by (query.driving_clause), and bulk export's `slot` (records/export/store.py
    `slot_sliced`), nothing else. ensure_indexes drops any other it finds."""
    specs: list[list[tuple[str, int]]] = [[("c", ASCENDING)], [("sp.lastUpdated_lo", ASCENDING)],
                                          [(SLOT, ASCENDING)]]
    for param in definition.params:
        if param.type in ("reference", "string") or (param.type == "token" and param.name in DRIVING_TOKENS):
            specs.append([(f"sp.{param.name}", ASCENDING)])
        elif param.type == "date":
            specs.append([(f"sp.{param.name}_lo", ASCENDING)])
    return specs


HISTORY_INDEXES: list[tuple[list[tuple[str, int]], bool]] = [
    ([("id", ASCENDING), ("vid", ASCENDING)], True),  # vread; one entry per version
    ([("ts", ASCENDING)], False),
    ([("c", ASCENDING), ("ts", ASCENDING)], False),  # its `c` prefix drives compartment history
]
HISTORY_DRIVERS = frozenset({"id", "c", "ts"})  # leading fields of HISTORY_INDEXES


@functools.cache
def indexed_fields(resource_type: str) -> frozenset[str]:
    """Fields with a single-field index on a current-version collection (phase-1 drivers)."""
    specs = index_specs(RESOURCES[resource_type])
    return frozenset({"_id"} | {spec[0][0] for spec in specs if len(spec) == 1})


async def ensure_indexes(db: AsyncDatabase[dict[str, Any]]) -> None:
    """Create the indexes of `index_specs`/`HISTORY_INDEXES` and drop any other index on records'
    own resource collections (so deployments shed retired ones); `_id_` is never touched."""
    for definition in RESOURCES.values():
        wanted = [(spec, False) for spec in index_specs(definition)]
        for name, specs in ((definition.type, wanted), (f"{definition.type}_history", HISTORY_INDEXES)):
            collection = db[name]
            keys = {tuple(spec) for spec, _ in specs}
            async for index in await collection.list_indexes():
                if index["name"] != "_id_" and tuple(index["key"].items()) not in keys:
                    try:
                        await collection.drop_index(index["name"])
                    except OperationFailure:  # another replica starting up dropped it first
                        _log.info("index %s.%s was already dropped", name, index["name"])
            for spec, unique in specs:
                await collection.create_index(spec, unique=unique)


# -- the two-phase query executor ------------------------------------------------------------------
#
# Phase 1 sends the datastore only the driving conjunct (an index-matched IXSCAN, no hint) and
# reads at most `cap` candidates; phase 2 evaluates the whole filter on them in Python
# (mindchart_core.matcher), then orders and pages that bounded set. A filter with no driver, or a
# driver matching more than `cap` documents, goes to the datastore whole instead.

MAX_CANDIDATES = 5000
# Drivers whose candidates come with `raw` in the same round trip: an id, or one patient's
# compartment. Measured on SecantusDB (2k notes), one trip beat two (candidates without `raw`,
# then `raw` of the matches by `_id`) for a patient with 10 notes (3.6-4.0 vs 6.4-7.8 ms) and with
# 400 (73-95 vs 112-156 ms). Other drivers (a code, a date range) select across patients, so their
# candidates come without `raw`, which is then read for the matches only.
RAW_IN_PHASE_ONE = frozenset({"_id", "id", "sp.patient", "sp.subject", "sp.target", "c"})
WITHOUT_RAW = {"raw": 0}
# The amendment marker on a DocumentReference's current-version document: the ids of the
# amendment documents appended to the note (records/amendments/store.py writes it in the same
# transaction as each one, and backfills stores older than the marker). A note is stored with an
# empty one; a plain update never touches it. Absent means "not known": readers then ask.
APPENDED = "appended"
Collection = AsyncCollection[dict[str, Any]]


def _predicate(filt: dict[str, Any]) -> Any:
    try:
        return matcher.compile_filter(filt)
    except matcher.UnsupportedFilter as problem:  # correct anyway: the datastore gets it whole
        _log.warning("filter not evaluable in phase 2 (%s); sending it whole", problem)
        return None


async def matching(
    collection: Collection, filt: dict[str, Any], drivers: frozenset[str], *, raw: bool = False,
    cap: int = MAX_CANDIDATES, session: Session = None,
) -> list[dict[str, Any]] | None:
    """Every document matching `filt` (phase 1 + 2), or None when no index bounds the candidates
    to `cap` (the caller then sends `filt` itself). Without `raw`, documents lack it."""
    driver = query.driving_clause(filt, drivers)
    predicate = _predicate(filt) if driver is not None else None
    if driver is None or predicate is None:
        return None
    with_raw = raw and next(iter(driver)) in RAW_IN_PHASE_ONE
    docs = await collection.find(driver, None if with_raw else WITHOUT_RAW, session=session).limit(
        cap + 1).to_list()
    if len(docs) > cap:
        return None
    return [d for d in docs if predicate(d)]


async def _with_raw(collection: Collection, docs: list[dict[str, Any]], filt: dict[str, Any],
                    session: Session) -> list[dict[str, Any]]:
    """The same documents read whole, re-checked against `filt` (one may have changed since)."""
    if not docs or "raw" in docs[0]:
        return docs
    predicate = matcher.compile_filter(filt)
    fetched = await collection.find({"_id": {"$in": [d["_id"] for d in docs]}},
                                    session=session).to_list()
    by_id = {d["_id"]: d for d in fetched if predicate(d)}
    return [by_id[d["_id"]] for d in docs if d["_id"] in by_id]


async def select(
    collection: Collection, filt: dict[str, Any], drivers: frozenset[str], *,
    order: list[tuple[str, int]] | None = None, limit: int | None = None, raw: bool = True,
    session: Session = None,
) -> list[dict[str, Any]]:
    """Documents matching `filt`, ordered by `order` (top-level fields, one direction), at most
    `limit` of them, two-phase whenever an index bounds the candidates."""
    found = await matching(collection, filt, drivers, raw=raw, session=session)
    if found is None:
        cursor = collection.find(filt, None if raw else WITHOUT_RAW, session=session)
        if order:
            cursor = cursor.sort(order)
        return await (cursor.limit(limit) if limit is not None else cursor).to_list()
    if order:
        fields = [name for name, _ in order]
        found.sort(key=lambda d: tuple(d[f] for f in fields), reverse=order[0][1] == DESCENDING)
    if limit is not None:
        found = found[:limit]
    return await _with_raw(collection, found, filt, session) if raw else found


async def count(collection: Collection, filt: dict[str, Any], drivers: frozenset[str]) -> int:
    found = await matching(collection, filt, drivers)
    return len(found) if found is not None else await collection.count_documents(filt)


async def stream(collection: Collection, filt: dict[str, Any], drivers: frozenset[str],
                 batch_size: int) -> AsyncIterator[dict[str, Any]]:
    """Every matching document, whole, in bounded memory whatever their number: the driver's
    cursor filtered on the fly (or the whole filter's cursor when nothing drives it)."""
    driver = query.driving_clause(filt, drivers)
    predicate = _predicate(filt) if driver is not None else None
    if driver is None or predicate is None:
        async for doc in collection.find(filt, batch_size=batch_size):
            yield doc
        return
    async for doc in collection.find(driver, batch_size=batch_size):
        if predicate(doc):
            yield doc


def phase_one(filt: dict[str, Any], drivers: frozenset[str]) -> dict[str, Any]:
    """What the datastore is sent for `filt`: its driving conjunct, or all of it."""
    return query.driving_clause(filt, drivers) or filt


SLOT = "slot"
SLOTS = 1 << 16
MIGRATIONS = "records_migrations"  # one document per one-time migration done on this datastore


def slot_of(resource_id: str) -> int:
    """The document's export slot: the first 16 bits of SHA-256 of its id, so a range of slots
    holds its share of a collection whatever the ids' shape or when they were written (bulk
    export reads a large collection slot range by slot range: records/export/store.py)."""
    return int.from_bytes(hashlib.sha256(resource_id.encode()).digest()[:2], "big")


def stored_document(definition: ResourceDef, resource: dict[str, Any], base_url: str,
                    moment: datetime, version: int = 1, *,
                    compartment: list[str] | None = None) -> dict[str, Any]:
    """The current-version document records stores for `resource` (which carries its `id`) as
    `version`, written at `moment`: the exact JSON bytes served (meta.versionId/lastUpdated set,
    resourceType and id first), the search values `sp`, the patient compartment `c` (derived from
    the resource unless given; `_write` adds compartments joined through referenced targets).
    Raises ValueError/OverflowError for a date outside the searchable range."""
    meta = dict(resource.get("meta", {}))
    meta.update(versionId=str(version), lastUpdated=instant(moment))
    body = {**resource, "meta": meta}
    body = {"resourceType": body.pop("resourceType"), "id": body.pop("id"), **body}
    sp = extract.extract(body, definition, base_url)
    sp.update(query.last_updated_fields(moment))
    # The claimed profiles, for `$meta`'s summary of what is in use (records/meta): always
    # present, so a document without the field is one stored before it (read whole there).
    sp["_profile"] = sorted({p for p in meta.get("profile") or [] if isinstance(p, str)})
    if compartment is None:
        compartment = extract.patient_compartment(body, definition, base_url)
    doc = {"_id": body["id"], "vid": version, "ts": moment, "deleted": False,
           "raw": Binary(orjson.dumps(body)), "sp": sp, "c": compartment, SLOT: slot_of(body["id"])}
    if definition.type == "DocumentReference":
        doc[APPENDED] = []  # a new note has nothing appended; an update leaves this alone (_write)
    return doc


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

    async def atomically(self, work: Callable[[AsyncClientSession], Awaitable[T]], *,
                         within_s: float = CONFLICT_RETRY_SECONDS) -> T:
        """`work` in one transaction, run again (with growing, jittered pauses) while the
        datastore reports a transient conflict with a concurrent transaction (a write conflict:
        MongoDB's TransientTransactionError); 409 if it still conflicts after `within_s`. Requests
        contending for one guard run one after another, so the last of N may conflict N-1 times."""
        deadline = time.monotonic() + within_s
        attempt = 0
        while True:
            try:
                async with self.transaction() as session:
                    return await work(session)
            except PyMongoError as exc:
                if not _transient(exc):
                    raise
                if time.monotonic() > deadline:
                    raise errors.Conflict("Concurrent requests kept conflicting; retry") from None
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(0.25, 0.01 * 2 ** attempt)))  # noqa: S311

    async def _raced_again(self, write: Callable[[], Awaitable[T]], *,
                           within_s: float = CONFLICT_RETRY_SECONDS) -> T:
        """A single create, update or delete, run again from its first read when a concurrent
        writer got there first (a write conflict, or the expected version already replaced).
        The rerun sees the winner's version: with If-Match that is 412 (R4 http.html: version
        conflict management), without it the write applies on top. 409 if it never settles."""
        deadline = time.monotonic() + within_s
        attempt = 0
        while True:
            try:
                return await write()
            except PyMongoError as exc:
                if not _transient(exc):
                    raise
            except _Raced:
                pass
            if time.monotonic() > deadline:
                raise errors.Conflict("Concurrent requests kept conflicting; retry") from None
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(0.25, 0.01 * 2 ** attempt)))  # noqa: S311

    async def claim(self, definition: ResourceDef, criteria: str, session: AsyncClientSession) -> None:
        """Serialize conditional interactions (If-None-Exist, conditional update) on the same
        criteria: each writes this guard document inside its transaction, so two running at once
        conflict (one runs again) and one starting later finds what the earlier one wrote."""
        guard = {"_id": f"{definition.type}?{criteria}"}
        # The guard exists before the transaction writes it (this upsert runs and commits on its
        # own): two transactions both inserting a new guard would not reliably conflict.
        await self.db.conditional_guards.update_one(guard, {"$setOnInsert": {"uses": 0}}, upsert=True)
        await self.db.conditional_guards.update_one(guard, {"$inc": {"uses": 1}}, session=session)

    async def _select(self, definition: ResourceDef, filt: dict[str, Any], *,
                      order: list[tuple[str, int]] | None = None, limit: int | None = None,
                      raw: bool = True, session: Session = None) -> list[dict[str, Any]]:
        """Every query of a current-version collection (two-phase, see `select`)."""
        return await select(self.db[definition.type], filt, indexed_fields(definition.type),
                            order=order, limit=limit, raw=raw, session=session)

    async def _find_one(self, definition: ResourceDef, filt: dict[str, Any], *, raw: bool = False,
                        session: Session = None) -> dict[str, Any] | None:
        docs = await self._select(definition, filt, limit=1, raw=raw, session=session)
        return docs[0] if docs else None

    async def explain_search(self, definition: ResourceDef, request: query.SearchRequest) -> dict[str, Any]:
        """The datastore's plan for a search's phase-1 query (tests check it is an index scan)."""
        sent = phase_one(self._search_filter(definition, request), indexed_fields(definition.type))
        plan: dict[str, Any] = await self.db[definition.type].find(sent, WITHOUT_RAW).explain()
        return plan

    # -- reads ------------------------------------------------------------------------------

    async def read(self, definition: ResourceDef, resource_id: str, *, interaction: str = "read",
                   session: Session = None) -> StoredResource:
        scope = self.policy.filter_for(definition, interaction)
        doc = await self._find_one(definition, _and({"_id": resource_id}, scope), raw=True,
                                   session=session)
        if doc is None:
            raise errors.NotFound(f"{definition.type}/{resource_id} is not known")
        if doc.get("deleted"):
            raise errors.Gone(f"{definition.type}/{resource_id} has been deleted")
        return _stored(definition.type, doc)

    async def vread(self, definition: ResourceDef, resource_id: str, version: int) -> StoredResource:
        scope, current = await self._current(definition, resource_id, "vread")
        # {id, vid} matches the unique compound index exactly: an IXSCAN of one entry.
        doc = await self.db[f"{definition.type}_history"].find_one({"id": resource_id, "vid": version})
        if doc is None or not matcher.matches(scope, doc):
            raise errors.NotFound(f"{definition.type}/{resource_id}/_history/{version} is not known")
        if doc.get("raw") is None:
            raise errors.Gone(f"Version {version} of {definition.type}/{resource_id} is a deletion")
        # What is appended to a note goes with every version of it: the current document's marker.
        return dataclasses.replace(_stored(definition.type, doc), appended=_stored(
            definition.type, current).appended)

    async def _visible(self, definition: ResourceDef, resource_id: str, interaction: str,
                       session: Session = None) -> dict[str, Any]:
        """The policy filter, after checking the resource (maybe deleted) is visible: else 404."""
        scope, _ = await self._current(definition, resource_id, interaction, session)
        return scope

    async def _current(self, definition: ResourceDef, resource_id: str, interaction: str,
                       session: Session = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The policy filter and the current-version document (without `raw`) if visible: else 404."""
        scope = self.policy.filter_for(definition, interaction)
        doc = await self._find_one(definition, _and({"_id": resource_id}, scope), session=session)
        if doc is None:
            raise errors.NotFound(f"{definition.type}/{resource_id} is not known")
        return scope, doc

    async def read_many(self, definition: ResourceDef, ids: list[str],
                        interaction: str = "read") -> list[StoredResource]:
        """Resources by id that the caller may see (for _include); the rest silently absent."""
        try:
            scope = self.policy.filter_for(definition, interaction)
        except errors.Forbidden:
            return []
        docs = await self._select(
            definition, _and({"_id": {"$in": ids[:MAX_INCLUDES]}}, scope, {"deleted": {"$ne": True}}),
            limit=MAX_INCLUDES)
        return [_stored(definition.type, d) for d in docs]

    async def referring(self, definition: ResourceDef, param: str, refs: list[str]) -> list[StoredResource]:
        """Resources whose reference parameter points at any of `refs` (for _revinclude)."""
        try:
            scope = self.policy.filter_for(definition, "search-type")
        except errors.Forbidden:
            return []
        docs = await self._select(
            definition, _and({f"sp.{param}": {"$in": refs}}, scope, {"deleted": {"$ne": True}}),
            limit=MAX_INCLUDES)
        return [_stored(definition.type, d) for d in docs]

    async def chain_values(self, definition: ResourceDef, filt: dict[str, Any], field: str) -> list[str]:
        """`field` (`_id` or an `sp.` reference field) of the `definition` resources matching
        `filt` that the caller may search (records.search.chain's inner step): policy ANDed,
        deleted excluded, at most MAX_CHAIN_MATCHES (400 above it, which counts visible
        resources only)."""
        scope = self.policy.filter_for(definition, "search-type")
        docs = await self._select(definition, _and(filt, scope, {"deleted": {"$ne": True}}),
                                  limit=MAX_CHAIN_MATCHES + 1, raw=False)
        if len(docs) > MAX_CHAIN_MATCHES:
            raise errors.FhirError(
                f"A chained parameter matches more than {MAX_CHAIN_MATCHES} {definition.type} resources: "
                "narrow it", status=400, code="too-costly")
        if field == "_id":
            return [str(d["_id"]) for d in docs]
        name = field.removeprefix("sp.")
        return [v for d in docs for v in (d.get("sp", {}).get(name) or [])]

    def _search_filter(self, definition: ResourceDef, request: query.SearchRequest) -> dict[str, Any]:
        if request.chains:  # records.search.chain.apply resolves them through this store first
            raise errors.Invalid("Chained parameters are not supported here")
        scope = self.policy.filter_for(definition, "search-type")
        return _and(scope, request.filter, {"deleted": {"$ne": True}},
                    lifecycle_rules.hidden_from_search(definition.type, request.applied))

    async def search(self, definition: ResourceDef, request: query.SearchRequest,
                     session: Session = None) -> SearchPage:
        """One page of matches; keyset paging, so links stay stable under concurrent writes."""
        base = self._search_filter(definition, request)
        if request.sort:
            return await self._search_sorted(definition, request, base, session)
        cursor = request.cursor
        backwards = cursor is not None and cursor.backwards
        filt = base
        if cursor is not None:
            filt = _and(base, {"_id": {"$lt" if backwards else "$gt": cursor.id}})
        if request.count == 0:
            return SearchPage([], None, None)
        docs = await self._select(definition, filt, order=[("_id", DESCENDING if backwards else ASCENDING)],
                                  limit=request.count + 1, session=session)
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
        self, definition: ResourceDef, request: query.SearchRequest, filt: dict[str, Any],
        session: Session = None,
    ) -> SearchPage:
        """`_sort`: order the (bounded) candidate set in memory on values extracted at write time."""
        candidates = await self._select(definition, filt, limit=MAX_SORT_CANDIDATES + 1, raw=False,
                                        session=session)
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
        docs = await self._select(definition, _and({"_id": {"$in": [i for _, i in window]}}, filt),
                                  session=session) if window else []
        by_id = {d["_id"]: d for d in docs}
        page = [_stored(definition.type, by_id[i]) for _, i in window if i in by_id]
        next_cursor = previous = None
        if window and start + len(window) < len(keyed):
            next_cursor = query.Cursor(False, window[-1][0], window[-1][1])
        if window and start > 0:
            previous = query.Cursor(True, window[0][0], window[0][1])
        return SearchPage(page, next_cursor, previous, total=len(keyed))

    async def count(self, definition: ResourceDef, request: query.SearchRequest) -> int:
        return await count(self.db[definition.type], self._search_filter(definition, request),
                           indexed_fields(definition.type))

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
        docs = await select(self.db[f"{definition.type}_history"], _and(*clauses), HISTORY_DRIVERS,
                            order=[("ts", DESCENDING), ("_id", DESCENDING)], limit=count + 1)
        entries = [_stored(definition.type, d) for d in docs[:count]]
        nxt = None
        if len(docs) > count and count:
            last = docs[count - 1]
            nxt = query.Cursor(False, [last["ts"].replace(tzinfo=UTC).isoformat()], str(last["_id"]))
        return entries, nxt

    async def system_history(
        self, *, since: datetime | None, count: int, cursor: query.Cursor | None,
    ) -> tuple[list[StoredResource], query.Cursor | None]:
        """R4 http.html §history `GET [base]/_history`: every type's versions the caller may see
        (each type through its own `history-type` policy filter, types it has no scope for left
        out), merged newest first; the cursor is the same (ts, history id) keyset as per type."""
        found: list[tuple[datetime, str, StoredResource]] = []
        cursors: dict[str, query.Cursor | None] = {}
        for definition in RESOURCES.values():
            try:
                entries, nxt = await self.history(definition, None, since=since, count=count, cursor=cursor)
            except errors.Forbidden:
                continue
            cursors[definition.type] = nxt
            found += [(e.last_updated, e.history_id or "", e) for e in entries]
        found.sort(key=lambda t: (t[0], t[1]), reverse=True)
        page = found[:count]
        more = len(found) > count or any(c is not None for c in cursors.values())
        nxt = None
        if page and more and count:
            moment, ident, _ = page[-1]
            nxt = query.Cursor(False, [moment.replace(tzinfo=UTC).isoformat()], ident)
        return [e for _, _, e in page], nxt

    async def meta_in_use(self, definition: ResourceDef) -> list[tuple[list[str], list[str], list[str]]]:
        """(profiles, security tokens, tag tokens) of every current resource of the type the
        caller may search (records/meta `$meta` at type and system level): the values extracted
        at write time, never the stored JSON, except for documents stored before `sp._profile`
        existed, whose profiles are read from `raw`."""
        filt = _and(self.policy.filter_for(definition, "search-type"), {"deleted": {"$ne": True}})
        found: list[tuple[list[str], list[str], list[str]]] = []
        older: list[str] = []
        projection = {"sp._profile": 1, "sp._security": 1, "sp._tag": 1}
        async for doc in self.db[definition.type].find(filt, projection, batch_size=1000):
            sp = doc.get("sp") or {}
            if "_profile" not in sp:
                older.append(doc["_id"])
            found.append((list(sp.get("_profile") or []), list(sp.get("_security") or []),
                          list(sp.get("_tag") or [])))
        for start in range(0, len(older), 500):
            async for doc in self.db[definition.type].find({"_id": {"$in": older[start:start + 500]}},
                                                           {"raw": 1}):
                meta = orjson.loads(bytes(doc["raw"])).get("meta") or {} if doc.get("raw") else {}
                found.append(([p for p in meta.get("profile") or [] if isinstance(p, str)], [], []))
        return found

    # -- writes -----------------------------------------------------------------------------

    async def create(self, definition: ResourceDef, resource: dict[str, Any], *,
                     resource_id: str | None = None, session: Session = None,
                     transition: str | None = None) -> StoredResource:
        if session is None:  # on its own: rerun when a concurrent writer got there first
            return await self._raced_again(
                lambda: self._create(definition, resource, resource_id, transition=transition))
        return await self._create(definition, resource, resource_id, session, transition=transition)

    async def _create(self, definition: ResourceDef, resource: dict[str, Any],
                      resource_id: str | None, session: Session = None, *,
                      transition: str | None = None) -> StoredResource:
        stored, _ = await self._write(definition, resource_id or str(uuid.uuid4()), resource,
                                      expected=None, create=True, session=session, transition=transition)
        return stored

    async def update(
        self, definition: ResourceDef, resource_id: str, resource: dict[str, Any],
        if_match: int | None = None, *, session: Session = None, transition: str | None = None,
    ) -> tuple[StoredResource, bool]:
        """Update, or create with the client's id (update-as-create). Returns (stored, created).
        `transition` names a lifecycle step (records/lifecycle) that may change a locked note;
        plain writes leave it None and meet the lock (lifecycle/rules.py).

        A patient-confined caller never creates by PUT: a free id and another patient's id both
        answer 404, so ids cannot be probed for existence nor squatted (R4 http.html#upsert
        leaves update-as-create to the server)."""
        if session is None:  # on its own: rerun when a concurrent writer got there first
            return await self._raced_again(lambda: self._update(
                definition, resource_id, resource, if_match, transition=transition))
        return await self._update(definition, resource_id, resource, if_match, session,
                                  transition=transition)

    async def _update(
        self, definition: ResourceDef, resource_id: str, resource: dict[str, Any],
        if_match: int | None, session: Session = None, *, transition: str | None = None,
    ) -> tuple[StoredResource, bool]:
        scope = self.policy.filter_for(definition, "update")
        collection = self.db[definition.type]
        current = await collection.find_one({"_id": resource_id}, {"vid": 1}, session=session)
        confined = self.policy.confined_patient(definition, "update")
        if (current is None and confined is not None) or (
                current is not None and scope and await self._find_one(
                    definition, _and({"_id": resource_id}, scope), session=session) is None):
            raise errors.NotFound(f"{definition.type}/{resource_id} is not known")
        if if_match is not None and (current is None or int(current["vid"]) != if_match):
            raise errors.PreconditionFailed("If-Match does not match the current version")
        expected = int(current["vid"]) if current is not None else None
        return await self._write(definition, resource_id, resource, expected=expected,
                                 create=current is None, session=session, transition=transition)

    async def delete(self, definition: ResourceDef, resource_id: str, if_match: int | None = None,
                     *, session: Session = None) -> None:
        """Delete (a version without content). A note's lifecycle may refuse (lifecycle/rules.py)."""
        if session is None:  # on its own: rerun when a concurrent writer got there first
            return await self._raced_again(lambda: self._delete(definition, resource_id, if_match))
        return await self._delete(definition, resource_id, if_match, session)

    async def _delete(self, definition: ResourceDef, resource_id: str, if_match: int | None,
                      session: Session = None) -> None:
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
            await self._lifecycle_check(definition, resource_id, version - 1, None, None, s)
            result = await self.db[definition.type].update_one(
                {"_id": resource_id, "vid": version - 1},
                {"$set": {"vid": version, "ts": moment, "deleted": True, "raw": None}},
                session=s,
            )
            if result.matched_count != 1:
                raise _Raced
            await self.db[f"{definition.type}_history"].insert_one(
                {"id": resource_id, "vid": version, "ts": moment, "raw": None, "method": "DELETE",
                 "c": current.get("c", []), "sp": current.get("sp", {})},
                session=s,
            )

        if session is not None:
            try:
                await run(session)
            except _Raced:  # inside the caller's transaction, which cannot be rerun from here
                raise errors.Conflict("The resource changed while it was being deleted") from None
            return
        await self.atomically(run)  # a transient conflict runs it again (see `_write`)

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

    async def _lifecycle_check(self, definition: ResourceDef, resource_id: str, expected: int | None,
                               body: dict[str, Any] | None, transition: str | None,
                               session: AsyncClientSession) -> None:
        """The note lock (records/lifecycle/rules.py), checked inside the write's transaction on
        the very version it replaces (a concurrent sign makes the write conflict instead)."""
        if transition is not None or definition.type not in lifecycle_rules.GUARDED_TYPES:
            return
        current = None
        if expected is not None:
            doc = await self.db[definition.type].find_one({"_id": resource_id, "vid": expected},
                                                          {"raw": 1}, session=session)
            if doc is not None and doc.get("raw") is not None:
                current = orjson.loads(bytes(doc["raw"]))
        lifecycle_rules.check_write(definition.type, current, body, self.policy.token)
        if definition.type == "DocumentReference" and body is not None:
            targets: dict[str, dict[str, Any] | None] = {}
            for target_id in lifecycle_rules.amended_ids(body):
                scope = self.policy.filter_for(definition, "update" if current else "create")
                doc = await self._find_one(definition, _and({"_id": target_id}, scope), raw=True,
                                           session=session)
                raw = doc.get("raw") if doc else None
                targets[target_id] = orjson.loads(bytes(raw)) if raw is not None else None
            lifecycle_rules.check_relations(body, targets)

    async def _inside_compartment(self, definition: ResourceDef, body: dict[str, Any],
                                  compartment: list[str], patient: str, session: Session) -> None:
        """A patient-confined write stays inside `patient`'s compartment (policy.confined_patient):
        the resource belongs to that patient alone (a Group naming another member, a Provenance
        targeting another's resource are refused), and each reference it holds is to this
        patient or to a resource in their compartment. A reference to another's resource and to
        one that does not exist get the same answer."""
        refused = errors.Forbidden(f"The granted scopes do not permit writing this {definition.type}")
        if definition.patient_compartment and compartment != [patient]:
            raise refused
        for ref in _references(body, self.policy.base_url):
            kind, _, ident = ref.partition("/")
            target = RESOURCES.get(kind)
            if target is None or not target.patient_compartment:
                continue  # Practitioner, Organization...: not patient data
            if kind == "Patient":
                if ident != patient:
                    raise refused
                continue
            found = await self.db[kind].find_one({"_id": ident, "c": patient}, {"_id": 1},
                                                 session=session)
            if found is None:
                raise refused

    async def _write(
        self, definition: ResourceDef, resource_id: str, resource: dict[str, Any],
        *, expected: int | None, create: bool, session: Session, transition: str | None = None,
    ) -> tuple[StoredResource, bool]:
        interaction = "create" if create else "update"
        scope = self.policy.filter_for(definition, interaction)
        version = (expected or 0) + 1
        moment = now()
        body = {**resource, "id": resource_id}
        compartment = await self._compartment(definition, body, session)
        confined = self.policy.confined_patient(definition, interaction)
        if confined is not None:
            await self._inside_compartment(definition, body, compartment, confined, session)
        try:
            stored = stored_document(definition, body, self.policy.base_url, moment, version,
                                     compartment=compartment)
        except (ValueError, OverflowError):  # e.g. a dateTime whose offset leaves year 1..9999
            raise errors.Unprocessable("A date in this resource is outside the searchable range") from None
        doc = {k: v for k, v in stored.items() if k != "_id"}
        if expected is not None:  # the amendment marker is the amendment steps' (APPENDED)
            doc.pop(APPENDED, None)
        raw, sp = bytes(stored["raw"]), stored["sp"]
        collection = self.db[definition.type]

        async def run(s: AsyncClientSession) -> None:
            await self._lifecycle_check(definition, resource_id, expected, body, transition, s)
            # Topic triggers compare versions (records/subscriptions/topics.py): read the one
            # being replaced inside this transaction, for watched types only.
            previous = (await outbox.previous_version(collection, resource_id, s)
                        if expected is not None and outbox.watches(definition.type) else None)
            try:
                if expected is None:
                    await collection.insert_one({"_id": resource_id, **doc}, session=s)
                else:
                    result = await collection.update_one(
                        {"_id": resource_id, "vid": expected}, {"$set": doc}, session=s
                    )
                    if result.matched_count != 1:
                        raise _Raced
            except DuplicateKeyError:
                raise errors.Conflict(f"{definition.type}/{resource_id} was created meanwhile") from None
            # The written version must itself be visible to the writer: a patient-scoped client
            # cannot file a resource into another patient's compartment.
            if scope and await self._find_one(
                definition, _and({"_id": resource_id}, scope), session=s
            ) is None:
                raise errors.InsufficientScope(  # leaving the block aborts the transaction
                    f"The granted scopes do not permit writing this {definition.type}"
                )
            await self.db[f"{definition.type}_history"].insert_one(
                {"id": resource_id, "vid": version, "ts": moment, "raw": stored["raw"],
                 "method": "POST" if expected is None else "PUT", "c": compartment, "sp": sp},
                session=s,
            )
            # The outbox: the event commits or aborts with this write.
            await outbox.record(self.db, s, definition.type, body, previous, version=version,
                                moment=moment, sp=sp, compartment=compartment)

        if session is not None:
            try:
                await run(session)
            except _Raced:  # inside the caller's transaction, which cannot be rerun from here
                raise errors.Conflict("The resource changed meanwhile; retry with its new version") from None
        else:
            # A concurrent transaction (another write, subscription fan-out on the outbox) may
            # make this one conflict transiently: it aborted whole, so it simply runs again.
            await self.atomically(run)
        return StoredResource(definition.type, resource_id, version, moment, raw, sp,
                              "POST" if expected is None else "PUT"), create


def _references(node: Any, base_url: str) -> list[str]:
    """Every `Reference.reference` in a resource (contained resources included), relative
    (`Type/id`); local (`#x`) and `urn:` references are left out."""
    found: list[str] = []
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and not ref.startswith(("#", "urn:")):
            found.append(extract.relative_reference(ref, base_url))
        for value in node.values():
            found.extend(_references(value, base_url))
    elif isinstance(node, list):
        for item in node:
            found.extend(_references(item, base_url))
    return found


__all__ = ["APPENDED", "CONFLICT_RETRY_SECONDS", "HISTORY_DRIVERS", "MAX_CANDIDATES", "MAX_SORT_CANDIDATES",
           "MIGRATIONS", "SLOT", "SLOTS", "ResourceStore", "SearchPage", "StoredResource", "count",
           "ensure_indexes", "index_specs", "indexed_fields", "instant", "matching", "now", "phase_one",
           "select", "slot_of", "stored_document", "stream"]
