"""The floor: the least a server on this datastore can do to answer a read. A bare ASGI app under
uvicorn with PyMongo's AsyncMongoClient that returns the stored JSON bytes (`raw`) of a records
document by id: no framework, no token check, no FHIR work. Records' read throughput is compared
with this (issue 8, measurement 2).

Run by bench/harness.py: `uvicorn --factory bench.floor_app:create_app`, configured by
BENCH_FLOOR_MONGO_URL and BENCH_FLOOR_DB_NAME.
"""

from __future__ import annotations

import os
from typing import Any

from pymongo import AsyncMongoClient
from starlette.types import Receive, Scope, Send

PREFIX = "/fhir/"
FHIR_JSON = [(b"content-type", b"application/fhir+json")]


def create_app() -> Any:
    url = os.environ["BENCH_FLOOR_MONGO_URL"]
    db_name = os.environ.get("BENCH_FLOOR_DB_NAME", "mindchart_records")
    state: dict[str, Any] = {}

    async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
                    state["client"], state["db"] = client, client[db_name]
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["client"].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path: str = scope["path"]
        if path == "/healthz":
            await respond(send, 200, b"ok", [])
            return
        # GET /fhir/<Type>/<id>
        parts = path[len(PREFIX):].split("/") if path.startswith(PREFIX) else []
        if scope["method"] != "GET" or len(parts) != 2:
            await respond(send, 404, b"", [])
            return
        doc = await state["db"][parts[0]].find_one({"_id": parts[1]}, {"raw": 1})
        if doc is None or doc.get("raw") is None:
            await respond(send, 404, b"", [])
            return
        await respond(send, 200, bytes(doc["raw"]), FHIR_JSON)

    return app
