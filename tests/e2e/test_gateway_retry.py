"""The gateway retries a request once on a fresh connection when the backend closed the kept-alive
connection it was sent on, but only a request that cannot apply twice: GET, and PUT with If-Match.
A POST or an unconditional PUT gets 503 and is sent once (RFC 9112 §9.3.1).

Between a second gateway process and the real records service sits a TCP relay that, when told,
closes a connection just as the next request arrives on it: the race of a backend closing an idle
connection while the gateway sends on it, made to happen every time.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.actors import BackendAuth, BackendClient
from tests.conftest import RunningStack, free_port
from tests.replicas import Replica, running

_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"PATCH ", b"DELETE ")


class ClosingRelay:
    """Relays TCP to records. While `close_next` > 0, a request arriving on a connection that has
    already carried one is not relayed: the connection is closed instead (FIN, or RST with
    `reset=True`). `seen` lists every request head as (connection number, head, relayed?)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.close_next = 0
        self.reset = False
        self.seen: list[tuple[int, bytes, bool]] = []
        self._connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def attempts(self, marker: str) -> list[tuple[int, bool]]:
        return [(conn, relayed) for conn, head, relayed in self.seen if marker.encode() in head]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        number, requests = self._connections, 0
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump_back() -> None:
            while chunk := await up_reader.read(65536):
                writer.write(chunk)
                await writer.drain()
            writer.close()

        back = asyncio.create_task(pump_back())
        try:
            while chunk := await reader.read(65536):
                if chunk.startswith(_METHODS):
                    requests += 1
                    head = chunk.split(b"\r\n\r\n", 1)[0]
                    if requests > 1 and self.close_next > 0:
                        self.close_next -= 1
                        self.seen.append((number, head, False))
                        if self.reset:
                            writer.transport.abort()  # RST: the gateway sees a connection reset
                        else:
                            writer.close()
                        return
                    self.seen.append((number, head, True))
                up_writer.write(chunk)
                await up_writer.drain()
        except ConnectionError:
            pass
        finally:
            back.cancel()
            up_writer.close()
            writer.close()


@pytest.fixture(scope="module")
def relay(live: RunningStack) -> Iterator[ClosingRelay]:
    running = ClosingRelay(live.config.http_ports["records"])
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def relayed_gateway(live: RunningStack, relay: ClosingRelay) -> Iterator[str]:
    """A second gateway on the same datastore and public URL, whose records URL is the relay."""
    relayed = Replica("gateway", "gateway-relayed",
                      {"MINDCHART_GATEWAY_RECORDS_URL": f"http://127.0.0.1:{relay.port}"})
    with running(live, relayed):
        yield relayed.url


@pytest.fixture(scope="module")
def fhir(relayed_gateway: str, writer: BackendClient) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{relayed_gateway}/fhir", timeout=30,
                      auth=BackendAuth(writer, "system/*.cruds"),
                      headers={"Content-Type": "application/fhir+json",
                               "Accept": "application/fhir+json"}) as client:
        yield client


def _patient(family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}]}


def _closing_next(relay: ClosingRelay, fhir: httpx.Client, *, reset: bool = False) -> None:
    """A warm connection in the gateway's pool, which the relay closes when it is next used."""
    assert fhir.get("/metadata").status_code == 200
    relay.reset, relay.close_next = reset, 1


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_read_on_a_closed_connection_is_answered(relay: ClosingRelay, fhir: httpx.Client,
                                                 reset: bool) -> None:
    family = f"retry-{uuid.uuid4().hex[:8]}"
    created = fhir.post("/Patient", json=_patient(family))
    assert created.status_code == 201, created.text
    path = f"/Patient/{created.json()['id']}"
    _closing_next(relay, fhir, reset=reset)
    read = fhir.get(path, headers={"X-Request-ID": family})  # relayed upstream: the relay's marker
    assert read.status_code == 200, read.text
    assert read.json()["id"] == created.json()["id"]
    attempts = relay.attempts(family)
    assert [relayed for _, relayed in attempts] == [False, True]  # closed once, then relayed
    assert attempts[0][0] != attempts[1][0]  # on another (fresh) connection
    assert relay.close_next == 0


def test_conditional_update_is_retried_and_applied_once(relay: ClosingRelay, fhir: httpx.Client) -> None:
    family = f"retry-put-{uuid.uuid4().hex[:8]}"
    created = fhir.post("/Patient", json=_patient(family)).json()
    _closing_next(relay, fhir)
    updated = fhir.put(f"/Patient/{created['id']}", json={**_patient(family + "-2"), "id": created["id"]},
                       headers={"If-Match": 'W/"1"', "X-Request-ID": family})
    assert updated.status_code == 200, updated.text
    assert updated.json()["meta"]["versionId"] == "2"
    assert [relayed for _, relayed in relay.attempts(family)] == [False, True]
    history = fhir.get(f"/Patient/{created['id']}/_history").json()
    assert history["total"] == 2


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_a_write_that_could_apply_twice_is_not_retried(relay: ClosingRelay, fhir: httpx.Client,
                                                        method: str) -> None:
    """POST, and PUT without If-Match: the backend may have applied it, so the gateway answers
    503 and sends it once. Here it never reached records, so nothing was stored."""
    family = f"retry-{method.lower()}-{uuid.uuid4().hex[:8]}"
    existing = fhir.post("/Patient", json=_patient("kept")).json()
    _closing_next(relay, fhir)
    if method == "POST":
        answer = fhir.post("/Patient", json=_patient(family), headers={"X-Request-ID": family})
    else:
        answer = fhir.put(f"/Patient/{existing['id']}", json={**_patient(family), "id": existing["id"]},
                          headers={"X-Request-ID": family})
    assert answer.status_code == 503, answer.text
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert [relayed for _, relayed in relay.attempts(family)] == [False]  # sent once, never again
    assert fhir.get("/Patient", params={"family": family}).json().get("total", 0) == 0
    assert fhir.get(f"/Patient/{existing['id']}").json()["meta"]["versionId"] == "1"
