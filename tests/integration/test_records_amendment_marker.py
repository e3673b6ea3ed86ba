"""The amendment marker (records/amendments/store.py, issue 16): a note's statement of
disagreement and rebuttal are found through a marker written in the same transaction as each of
them, so reading a note with nothing appended asks the datastore nothing more, and a note with
something appended asks once; a store written before the marker still shows everything, and its
one-time backfill (safe to run twice at once) marks every note. Driven through records' real
store and amendment steps on an embedded datastore, datastore commands counted by PyMongo's
command monitoring."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from mindchart_core import scopes, tokens
from records import service, store
from records.amendments import appended
from records.amendments import service as amendments
from records.amendments import store as marker_store
from records.policy import AccessPolicy
from records.resources import RESOURCES
from tests.commands import Commands
from tests.integration.conftest import fresh_database
from tests.records_resources import access_token, progress_note

BASE = "http://127.0.0.1:8000/fhir"
NOTES = RESOURCES["DocumentReference"]
AUTHOR = "Practitioner/marker-author"


@pytest.fixture
async def world(mongo_url: str) -> AsyncIterator[dict[str, Any]]:
    finds = Commands("find", "aggregate", "count", "getMore")
    async with fresh_database(mongo_url, "records_marker", [finds]) as db:
        yield await world_in(db, finds)


async def world_in(db: Any, finds: Commands) -> dict[str, Any]:
    client = db.client
    await store.ensure_indexes(db)
    system = store.ResourceStore(client, db, AccessPolicy(access_token("system/*.cruds", audience=BASE), BASE))
    patient = store.ResourceStore(client, db, AccessPolicy(access_token(
        "patient/Task.crs patient/DocumentReference.rs", "p1", audience=BASE), BASE))
    author = store.ResourceStore(client, db, AccessPolicy(tokens.AccessToken(
        subject="marker-author", client_id="app", scope=scopes.parse(
            "user/Task.rus user/DocumentReference.cruds"), audience=BASE, jti="j",
        expires_at=int(time.time()) + 300, fhir_user=f"{BASE}/{AUTHOR}"), BASE))
    signed = {"docStatus": "final", "author": [{"reference": AUTHOR}]}
    disputed = await system.create(NOTES, progress_note("p1", **signed))
    plain = await system.create(NOTES, progress_note("p1", **signed))
    return {"db": db, "system": system, "patient": patient, "author": author, "finds": finds,
            "disputed": disputed, "plain": plain}


async def dispute(w: dict[str, Any], *, rebut: bool = True) -> tuple[str, str | None]:
    """The patient files a request about the disputed note, the author denies it, the patient
    disagrees and (optionally) the author rebuts: the ids of the two appended documents."""
    task = await amendments.file(w["patient"], {
        "resourceType": "Task", "description": "The note says I missed two sessions; I did not.",
        "focus": {"reference": f"DocumentReference/{w['disputed'].id}"}}, BASE)
    await amendments.deny(w["author"], task.id, "accurate-and-complete", "The log shows no visit.")
    statement = await amendments.disagree(w["patient"], task.id, "I was there; my bus ticket shows it.")
    rebuttal = await amendments.rebut(w["author"], task.id, "The ticket is for the day after.") \
        if rebut else None
    return statement.id, rebuttal.id if rebuttal else None


async def stored_marker(w: dict[str, Any], note_id: str) -> Any:
    doc = await w["db"][NOTES.type].find_one({"_id": note_id}, {store.APPENDED: 1})
    return doc.get(store.APPENDED, "absent")


async def links(w: dict[str, Any], note_id: str) -> tuple[dict[str, str], list[str]]:
    """The Link header a read of the note answers, and the datastore queries the read made."""
    with w["finds"].recording() as sent:
        note = await w["system"].read(NOTES, note_id)
        header = await appended.link_header(w["system"], note, BASE)
    return header, [e.command_name for e in sent]


async def test_a_read_costs_no_query_for_nothing_appended_and_one_for_something(world: dict[str, Any]) -> None:
    w = world
    assert await stored_marker(w, w["plain"].id) == []  # stored with an empty marker
    header, finds = await links(w, w["plain"].id)
    assert header == {} and finds == ["find"]  # the read itself, nothing more

    statement, rebuttal = await dispute(w)
    assert await stored_marker(w, w["disputed"].id) == sorted([statement, rebuttal])
    header, finds = await links(w, w["disputed"].id)
    assert finds == ["find", "find"]  # the read, then both appended documents in one query
    assert header == {"Link": ", ".join(
        f'<{BASE}/DocumentReference/{i}>; rel="related"; title="{kind}"'
        for i, kind in sorted([(statement, appended.STATEMENT), (rebuttal, appended.REBUTTAL)]))}

    # A search page: the note's material as include entries, one query for the whole page.
    async def search(*params: tuple[str, str]) -> tuple[list[tuple[str, str]], list[str]]:
        request = service.parse_search(NOTES, list(params), BASE, strict=True)
        with w["finds"].recording() as sent:
            bundle = orjson.loads(await service.search_bundle(w["system"], NOTES, request, BASE))
        finds = [e.command_name for e in sent]
        return [(e["resource"]["id"], e["search"]["mode"]) for e in bundle.get("entry", [])], finds

    entries, finds = await search(("_id", w["disputed"].id))
    assert finds == ["find", "find"]
    assert entries == [(w["disputed"].id, "match"), *sorted((i, "include") for i in (statement, rebuttal))]
    entries, finds = await search(("_id", w["plain"].id))
    assert entries == [(w["plain"].id, "match")] and finds == ["find"]
    entries, finds = await search(("patient", "p1"))  # the page holds the appended ones too
    assert len(entries) == 4 and finds == ["find", "find"]

    # A new version of the note (a lifecycle step) keeps its marker; vread carries it.
    body = {**progress_note("p1", docStatus="final", author=[{"reference": AUTHOR}],
                            description="typo fixed"), "id": w["disputed"].id}
    await w["system"].update(NOTES, w["disputed"].id, body, transition="lifecycle")
    assert await stored_marker(w, w["disputed"].id) == sorted([statement, rebuttal])
    first = await w["system"].vread(NOTES, w["disputed"].id, 1)
    assert first.appended == tuple(sorted([statement, rebuttal]))
    # What the caller may not see stays out: another patient's token finds neither note.
    other = store.ResourceStore(w["db"].client, w["db"], AccessPolicy(access_token(
        "patient/DocumentReference.rs", "p2", audience=BASE), BASE))
    assert await appended.material(other, [first]) == []


async def test_a_store_from_before_the_marker_shows_everything_and_is_backfilled_once(
        world: dict[str, Any]) -> None:
    w = world
    statement, _ = await dispute(w, rebut=False)
    notes = w["db"][NOTES.type]
    await notes.update_many({}, {"$unset": {store.APPENDED: ""}})  # as written before the marker
    header, finds = await links(w, w["disputed"].id)
    assert f"DocumentReference/{statement}>" in header["Link"] and len(finds) >= 2  # asked, as before
    header, _ = await links(w, w["plain"].id)
    assert header == {}

    # A rebuttal filed before the backfill marks the note with the older statement too.
    task = (await w["db"]["Task"].find_one({}))["_id"]
    rebuttal = (await amendments.rebut(w["author"], task, "The ticket is for the day after.")).id
    assert await stored_marker(w, w["disputed"].id) == sorted([statement, rebuttal])
    await notes.update_many({}, {"$unset": {store.APPENDED: ""}})

    # Two replicas starting at once: both backfill, the result is the same as one.
    internal = amendments.internal_store_of(w["db"].client, w["db"], BASE)
    done = await asyncio.gather(marker_store.backfill(internal), marker_store.backfill(internal))
    assert max(done) == 4  # the two notes, the statement and the rebuttal
    assert await stored_marker(w, w["disputed"].id) == sorted([statement, rebuttal])
    assert await stored_marker(w, w["plain"].id) == []
    assert await stored_marker(w, statement) == []
    assert await marker_store.backfill(internal) == 0  # once per datastore
    assert await w["db"][marker_store.MIGRATIONS].find_one({"_id": marker_store.BACKFILL})
    header, finds = await links(w, w["plain"].id)
    assert header == {} and finds == ["find"]
    header, finds = await links(w, w["disputed"].id)
    assert len(finds) == 2 and f"DocumentReference/{rebuttal}>" in header["Link"]

