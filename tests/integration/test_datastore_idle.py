"""A service's datastore connection left idle past the datastore's own idle cut-off: the next
write transaction still succeeds.

SecantusDB closes a client connection that sends nothing for `client_idle_timeout_s` (300 s by
default, secantus/server.py). PyMongo's async pool does not notice the close until it sends the
next command on that connection (AutoReconnect, "connection is already closed"), and a command
inside a transaction is not retried, so a psychnotes instance idle for five minutes answered its
next note write `503 transient` (tests/resilience/test_fuzz.py's seed write, on a clean-clone
CI run, after the minutes test_faults.py spent on the resilience stack). The services' clients
(mindchart_core.service_app.datastore_client) now close pooled connections idle longer than
`mongo_max_idle_seconds` before reuse (PyMongo maxIdleTimeMS), which stays below the datastore's
cut-off. Here the cut-off is one second, so the idle wait is short.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from secantus.server import SecantusDBServer

from mindchart_core.service_app import datastore_client
from mindchart_core.settings import ServiceSettings
from psychnotes import store
from tests.conftest import free_port

DATASTORE_IDLE_CUTOFF_S = 1.0  # the datastore drops a connection idle this long
SERVICE_MAX_IDLE_S = 0.5  # the service's mongo_max_idle_seconds: below the cut-off, as in production


@pytest.fixture(scope="module")
def impatient_datastore() -> Iterator[str]:
    """An in-memory SecantusDB that drops idle client connections after one second."""
    server = SecantusDBServer(port=free_port(), storage_path=":memory:",
                              client_idle_timeout_s=DATASTORE_IDLE_CUTOFF_S)
    server.start()
    try:
        yield f"mongodb://127.0.0.1:{server.port}/?directConnection=true"
    finally:
        server.stop()


def note(patient: str) -> tuple[dict[str, str | int], dict[str, str | bool]]:
    note_id = uuid.uuid4().hex
    return ({"_id": note_id, "vid": 1, "patient": patient},
            {"_id": uuid.uuid4().hex, "permit": True, "entities": f"DocumentReference/{note_id}"})


async def test_a_note_write_after_the_datastore_dropped_idle_connections_succeeds(
        impatient_datastore: str) -> None:
    settings = ServiceSettings(mongo_url=impatient_datastore, mongo_max_idle_seconds=SERVICE_MAX_IDLE_S)
    client = datastore_client(settings, "psychnotes")
    db = client[f"psychnotes_idle_{uuid.uuid4().hex[:8]}"]
    try:
        await store.insert_note(db, *note("Patient/a"))
        # Idle past the datastore's cut-off: it has closed every connection this pool holds.
        await asyncio.sleep(DATASTORE_IDLE_CUTOFF_S * 2)
        doc, decision = note("Patient/a")
        await store.insert_note(db, doc, decision)  # AutoReconnect (a 503) without maxIdleTimeMS
        assert await db.notes.count_documents({"_id": doc["_id"]}) == 1
        assert await db.decisions.count_documents({"_id": decision["_id"]}) == 1
    finally:
        await client.drop_database(db.name)
        await client.close()
