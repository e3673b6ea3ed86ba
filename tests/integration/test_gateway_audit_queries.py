"""The audit trail's reads stay bounded by what they ask for as the trail grows (gateway.audit_store):
checked with explain() executionStats on the real embedded datastore, not with timing.

A trail of 200 records about other patients and 5 about ours (3 requests, 2 disclosures), written
through the real chain. Every `find` the accounting and a patient's AuditEvent search send to
`audit_events` (captured by command monitoring) must examine our 5 records at most, where the old
single `$and` query examined the whole trail; a search without a driver reads about one page
(windows of `recorded`). Each answer must equal what the datastore returns for the whole filter
sorted newest first by (recorded, id); `ensure_indexes` keeps only the declared indexes; `verify`
reads by (partition, seq) alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import ASCENDING
from starlette.requests import Request

from gateway import audit, audit_routes, audit_store, chain, chain_verify, store
from mindchart_core import audit as audit_shape
from tests.commands import Commands
from tests.integration.conftest import fresh_database

OURS = "Patient/ours"
OTHERS = 200


def rest_record(patient: str, client_id: str, request_id: str, status: int = 200) -> dict[str, Any]:
    scope = {"type": "http", "method": "GET", "path": f"/fhir/{patient}", "query_string": b"",
             "client": ("127.0.0.1", 1),
             "state": {"request_id": request_id,
                       "caller": {"client_id": client_id, "subject": f"user-{client_id}"}}}
    return audit.build_record(scope, status, 1.0, "gateway")


def disclosure_record(patient: str, client_id: str, request_id: str) -> dict[str, Any]:
    header = audit_shape.encode_disclosures([audit_shape.Disclosure(
        patient=patient, entities=[f"DocumentReference/{request_id}"], purpose_of_use=["TREAT"],
        basis="Consent/c1", recipient_client_id=client_id)])
    records, problem = audit.disclosure_records([header.encode()], request_id, "gateway")
    assert problem is None
    return records[0]


@pytest.fixture(scope="module")
async def trail(mongo_url: str) -> AsyncIterator[tuple[Any, Commands]]:
    capture = Commands("find")
    async with fresh_database(mongo_url, "gateway_audit", [capture]) as db:
        await written_trail(db)
        yield db, capture


async def written_trail(db: Any) -> None:
    await store.ensure_indexes(db)
    writer = chain.AuditChain(db)
    for i in range(OTHERS):
        other = f"Patient/other-{i % 20}"
        make = disclosure_record if i % 4 == 0 else rest_record
        await writer.append(make(other, f"app-{i % 3}", f"o{i}"))
        if i % 40 == 7:  # ours, spread through the trail
            n = i // 40
            await writer.append((disclosure_record if n % 2 else rest_record)(OURS, "app-1", f"ours{n}"))
    assert await db.audit_events.count_documents({"patient": OURS}) == 5
    # A running gateway moves its partition's head document within chain.HEAD_SECONDS of a write;
    # this writer has no background task, so move it as that task would.
    await writer.move_head()


async def examined(db: Any, filt: dict[str, Any], limit: int = 0) -> int:
    find: dict[str, Any] = {"find": "audit_events", "filter": filt}
    if limit:
        find["limit"] = limit
    plan = await db.command({"explain": find, "verbosity": "executionStats"})
    return int(plan["executionStats"]["totalDocsExamined"])


def audit_finds(capture: Commands) -> list[dict[str, Any]]:
    """The `find` commands sent to audit_events in the last recording."""
    return [e.command for e in capture.sent if e.command["find"] == "audit_events"]


async def captured(db: Any, capture: Commands, work: Any) -> tuple[Any, list[dict[str, Any]]]:
    """What `work` returns, and the filter of every find it sent to audit_events."""
    with capture.recording():
        result = await work
    return result, [dict(find.get("filter") or {}) for find in audit_finds(capture)]


def search_request(query: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/audit/AuditEvent",
                    "query_string": query.encode(), "headers": []})


async def test_accounting_examines_the_patients_records_not_the_trail(trail: Any) -> None:
    db, capture = trail
    own, sent = await captured(db, capture, audit_store.own_disclosures(db, OURS, [], None, 1001))
    filt = audit_store.disclosure_filter(OURS, [], None)
    expected = await db.audit_events.find(filt).sort([("recorded", -1), ("_id", -1)]).to_list()
    assert [e["id"] for e in own] == [r["_id"] for r in expected] and len(own) == 2
    assert own == [r["event"] for r in expected]
    assert sent, "the accounting sent no find"
    for sent_filter in sent:
        assert await examined(db, sent_filter) <= 5, sent_filter
    # The single query the accounting used to send examines every record of the trail.
    assert await examined(db, filt) >= OTHERS + 5


async def test_accounting_pages_and_dates_match_the_datastore(trail: Any) -> None:
    db, _ = trail
    newest = await audit_store.own_disclosures(db, OURS, [], None, 1)
    assert len(newest) == 1
    rest = await audit_store.own_disclosures(db, OURS, [], audit_shape.accounting_key(newest[0]), 10)
    assert [e["id"] for e in newest + rest] == [e["id"] for e in await audit_store.own_disclosures(
        db, OURS, [], None, 10)]
    window = audit_shape.recorded_range(f"ge{(datetime.now(UTC) + timedelta(days=1)).date()}")
    assert window is not None
    assert await audit_store.own_disclosures(db, OURS, [window], None, 10) == []


async def test_patient_search_examines_the_patients_records(trail: Any) -> None:
    db, capture = trail
    filt, count, before = audit_routes.search_filter(search_request("patient=ours&_count=2"))
    (page, cursor), sent = await captured(db, capture, audit_store.search(db, filt, count, before))
    for sent_filter in sent:
        assert await examined(db, sent_filter) <= 5, sent_filter
    # One clause, on `patient`, which has no index of its own: phase 1 sends the `entities`
    # equality it implies (every record's entities hold its patient), bound by that index.
    assert filt == {"patient": OURS} and {"entities": OURS} in sent
    assert cursor is not None
    encoded = audit_shape.accounting_cursor({"recorded": cursor[0].isoformat(), "id": cursor[1]})
    filt, count, before = audit_routes.search_filter(
        search_request(f"patient=ours&outcome=0&_count=2&_cursor={encoded}"))
    assert cursor is not None and before == cursor
    (second, _), sent = await captured(db, capture, audit_store.search(db, filt, count, before))
    for sent_filter in sent:
        assert await examined(db, sent_filter) <= 5, sent_filter
    assert await examined(db, filt) >= OTHERS + 5
    order = [audit_store.order_key(r) for r in page + second]
    assert order == sorted(order, reverse=True) and len(set(order)) == 4


@pytest.mark.parametrize("query", [
    "", "_count=7", "outcome=0", "agent=app-2", "agent=app-2&outcome=0", "entity=Patient/other-3",
    "patient=other-4&agent=app-1", "patient=ours&entity=Patient/ours", "date=ge2020-01-01",
    "date=ge2020-01-01&date=le2099-01-01&agent=app-0", "date=lt2020-01-01", "_cursor={middle}",
    "_cursor={middle}&_count=5&agent=app-1", "outcome=4", "patient=nobody",
])
async def test_search_answers_what_the_datastore_answers(trail: Any, query: str) -> None:
    db, _ = trail
    newest = await db.audit_events.find({}).sort([("recorded", -1), ("_id", -1)]).to_list()
    middle = newest[len(newest) // 2]
    query = query.format(middle=audit_shape.accounting_cursor(
        {"recorded": middle["recorded"].isoformat(), "id": middle["_id"]}))
    filt, count, before = audit_routes.search_filter(search_request(query))
    page, cursor = await audit_store.search(db, filt, count, before)
    expected = await db.audit_events.find(filt).sort([("recorded", -1), ("_id", -1)]).limit(count + 1).to_list()
    assert [r["_id"] for r in page] == [r["_id"] for r in expected[:count]]
    assert cursor == (audit_store.order_key(expected[count - 1]) if len(expected) > count else None)


async def test_search_without_a_driver_reads_about_a_page(trail: Any) -> None:
    db, capture = trail
    filt, count, before = audit_routes.search_filter(search_request("_count=10"))
    (page, _), sent = await captured(db, capture, audit_store.search(db, filt, count, before))
    assert len(page) == 10
    limits = [int(find.get("limit") or 0) for find in audit_finds(capture)]  # find_one: 1
    reads = [await examined(db, f, limit) for f, limit in zip(sent, limits, strict=True)]
    assert sum(reads) <= 2 * (count + 1) + 16, reads


async def test_verify_reads_the_chain_by_position_only(trail: Any) -> None:
    db, capture = trail
    result, sent = await captured(db, capture, chain_verify.verify(db))
    assert result["ok"] is True and result["checked"] == OTHERS + 5
    assert sent and all(set(f) == {"partition", "seq"} for f in sent), sent
    for sent_filter in sent:
        plan = await db.command({"explain": {"find": "audit_events", "filter": sent_filter},
                                 "verbosity": "queryPlanner"})
        assert "COLLSCAN" not in str(plan["queryPlanner"]["winningPlan"]), sent_filter


async def test_ensure_indexes_keeps_only_the_declared_audit_indexes(trail: Any) -> None:
    db, _ = trail
    await db.audit_events.create_index([("client_id", ASCENDING)])
    await db.audit_events.create_index([("kind", ASCENDING)])
    await db.audit_events.create_index([("patient", ASCENDING), ("recorded", ASCENDING)])
    await db.audit_events.create_index([("seq", ASCENDING)], unique=True)  # the single chain's
    await store.ensure_indexes(db)
    await store.ensure_indexes(db)  # idempotent (and so tolerant of a replica doing the same)
    indexes = await (await db.audit_events.list_indexes()).to_list()
    keys = sorted(tuple(ix["key"].items()) for ix in indexes)
    assert keys == sorted([(("_id", 1),)] + [tuple((f, 1) for f in fields) for fields, _ in store.AUDIT_INDEXES])
    assert [dict(ix["key"]) for ix in indexes if ix.get("unique")] == [{"partition": 1, "seq": 1}]
