"""The revocation feed's long poll (gateway/revocations.py) with two replicas' lists on one real
datastore (SecantusDB): a held request is answered when its replica learns of a revocation (its
own at once, another replica's only once it refreshes from the datastore), a cursor of another
process resumes from the stamp, a draining server and a stale list never answer "nothing new"
after holding. The refresh loop is driven by hand here (`refresh()`), as `run()` does each second."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway import revocations, store
from mindchart_core import errors, http_limits
from tests.integration.conftest import fresh_database

LATER = datetime.now(UTC) + timedelta(hours=1)


@pytest.fixture
async def replicas(mongo_url: str) -> AsyncIterator[tuple[revocations.RevocationList, revocations.RevocationList]]:
    async with fresh_database(mongo_url, "revocation_feed") as database:
        await store.ensure_indexes(database)
        a, b = revocations.RevocationList(database), revocations.RevocationList(database)
        await a.refresh()
        await b.refresh()
        yield a, b


def _ids(answer: revocations.Changes) -> set[str]:
    return {entry["id"] for entry in answer.revoked}


async def _settled(task: asyncio.Task[Any]) -> bool:
    await asyncio.sleep(0.05)  # let the event loop run whatever would answer it
    return task.done()


async def test_a_held_request_is_answered_when_its_replica_learns(replicas: Any) -> None:
    a, b = replicas
    first = await a.changes(cursor=None, since=None, wait=0)
    assert first.revoked == [] and first.cursor.startswith(a.epoch + ".")

    held = asyncio.create_task(a.changes(cursor=first.cursor, since=None, wait=20))
    assert not await _settled(held)  # up to date: held
    await b.revoke_jti("at-b", LATER)  # in the datastore and in B's memory, not yet in A's
    assert not await _settled(held)
    await a.refresh()  # A's next refresh: the held request answers at once
    answer = await asyncio.wait_for(held, 5)
    assert _ids(answer) == {"jti:at-b"} and answer.newest is not None

    held = asyncio.create_task(a.changes(cursor=answer.cursor, since=None, wait=20))
    assert not await _settled(held)
    await a.revoke_jti("at-a", LATER)  # A's own revocation: no refresh needed
    again = await asyncio.wait_for(held, 5)
    assert _ids(again) == {"jti:at-a"}  # only what the cursor had not seen
    await a.refresh()  # the same revocation read back from the datastore is not news
    assert (await a.changes(cursor=again.cursor, since=None, wait=0)).revoked == []


async def test_a_cursor_of_another_process_resumes_from_the_stamp(replicas: Any) -> None:
    a, b = replicas
    await a.revoke_jti("before", LATER)
    await b.refresh()
    from_a = await a.changes(cursor=None, since=None, wait=0)
    assert from_a.newest is not None
    # The backend moves to B with A's cursor: B cannot tell exactly what it has, so it goes by
    # the stamp: held while nothing is newer than it, then answered with the overlap (what A
    # sent comes again, harmlessly) and B's own cursor.
    since = datetime.fromisoformat(from_a.newest)
    moved = asyncio.create_task(b.changes(cursor=from_a.cursor, since=since, wait=20))
    assert not await _settled(moved)
    await b.revoke_jti("after", LATER)
    answer = await asyncio.wait_for(moved, 5)
    assert _ids(answer) == {"jti:before", "jti:after"} and answer.cursor.startswith(b.epoch + ".")
    assert (await b.changes(cursor=answer.cursor, since=since, wait=0)).revoked == []
    # Without a wait (an older backend polling once a second) the stamp answers at once.
    assert _ids(await b.changes(cursor=None, since=since, wait=0)) == {"jti:before", "jti:after"}


async def test_a_draining_server_answers_held_requests_at_once(replicas: Any) -> None:
    a, _ = replicas
    cursor = (await a.changes(cursor=None, since=None, wait=0)).cursor
    held = asyncio.create_task(a.changes(cursor=cursor, since=None, wait=20))
    assert not await _settled(held)
    http_limits.draining().set()  # what LimitedHttpToolsProtocol.shutdown does
    try:
        answer = await asyncio.wait_for(held, 5)
        assert answer.revoked == [] and answer.cursor == cursor
    finally:
        http_limits.draining().clear()


async def test_a_stale_list_refuses_rather_than_answer_nothing_new(replicas: Any) -> None:
    a, _ = replicas
    cursor = (await a.changes(cursor=None, since=None, wait=0)).cursor
    a.stale_after = 0.0  # as if refreshing had failed for longer than allowed
    with pytest.raises(errors.Unavailable):
        await a.changes(cursor=cursor, since=None, wait=0)
    a.stale_after = 60.0
    held = asyncio.create_task(a.changes(cursor=cursor, since=None, wait=20))
    assert not await _settled(held)
    a.stale_after = 0.0
    a._wake()  # what the refresh loop does when a failed refresh leaves the list stale
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(held, 5)
