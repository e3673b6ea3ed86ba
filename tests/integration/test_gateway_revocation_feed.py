"""The revocation feed's long poll (gateway/revocations.py) with two replicas' lists on one real
datastore (SecantusDB): a held request is answered when its replica learns of a revocation (its
own at once, another replica's only once it refreshes from the datastore), a cursor of another
process resumes from the stamp, a draining server and a stale list never answer "nothing new"
after holding. The refresh loop is driven by hand here (`refresh()`), as `run()` does each second."""

from __future__ import annotations

import asyncio
import time
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


def _as_if_refreshing_failed(listed: revocations.RevocationList) -> None:
    """The list's last successful refresh an hour ago: what a datastore frozen or unreachable for
    longer than `stale_after` leaves behind (each refresh fails after the datastore timeout)."""
    listed._fresh_at = time.monotonic() - 3600


async def test_a_stale_list_refuses_rather_than_answer_nothing_new(replicas: Any) -> None:
    a, _ = replicas
    cursor = (await a.changes(cursor=None, since=None, wait=0)).cursor
    _as_if_refreshing_failed(a)
    with pytest.raises(errors.Unavailable):  # asked without a wait: 503 at once
        await a.changes(cursor=cursor, since=None, wait=0)
    # A hold that ends while the list is still stale: 503, never an empty "nothing new".
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(a.changes(cursor=cursor, since=None, wait=0.3), 5)


async def test_requests_held_through_staleness_are_answered_when_the_list_is_fresh_again(
        replicas: Any) -> None:
    """Issue 16: a backend's request held while the gateway's datastore was frozen left the
    backend stale (every token refused 503) until the hold ended, up to 20 s after the thaw. Now
    the first refresh that succeeds again answers every held request at once."""
    a, b = replicas
    cursor = (await a.changes(cursor=None, since=None, wait=0)).cursor
    held_before = asyncio.create_task(a.changes(cursor=cursor, since=None, wait=20))
    assert not await _settled(held_before)  # up to date: held
    _as_if_refreshing_failed(a)  # the datastore froze while it was held
    held_during = asyncio.create_task(a.changes(cursor=cursor, since=None, wait=20))
    assert not await _settled(held_before) and not await _settled(held_during)
    await a.refresh()  # the datastore is back: the first refresh that succeeds
    for held in (held_before, held_during):
        answer = await asyncio.wait_for(held, 5)
        assert answer.revoked == [] and answer.cursor == cursor  # vouched for: nothing new
    # And what changed meanwhile is delivered with that first answer.
    held = asyncio.create_task(a.changes(cursor=cursor, since=None, wait=20))
    assert not await _settled(held)
    _as_if_refreshing_failed(a)
    await b.revoke_jti("during-the-outage", LATER)  # another replica's, in the datastore
    assert not await _settled(held)
    await a.refresh()
    assert _ids(await asyncio.wait_for(held, 5)) == {"jti:during-the-outage"}
