"""Datastore operations per request: `serverStatus.opcounters` of each datastore read before and
after `n` requests made one at a time. Explains a ratio: on a 2-core machine every round trip to
a datastore costs CPU that the services and the load generator share."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pymongo import MongoClient

from bench import load

KINDS = ("insert", "query", "update", "delete", "getmore", "command")


def opcounters(url: str) -> Counter[str]:
    client: MongoClient[dict[str, Any]]
    with MongoClient(url, serverSelectionTimeoutMS=3000) as client:
        counters = client.admin.command("serverStatus").get("opcounters", {})
    return Counter({k: int(counters.get(k, 0)) for k in KINDS})


async def per_request(datastores: dict[str, str], operation: load.Operation, n: int = 100,
                      first: int = 10**7) -> dict[str, dict[str, float]]:
    """{datastore label: {operation kind: count per request}} (the `command` count includes the
    few opcounter reads and driver heartbeats of the window: a fraction of one per request)."""
    before = {label: opcounters(url) for label, url in datastores.items()}
    await load.drive(operation, load.Bounds(1, n, 120.0), first=first)
    after = {label: opcounters(url) for label, url in datastores.items()}
    return {label: {kind: round((after[label][kind] - before[label][kind]) / n, 2) for kind in KINDS
                    if after[label][kind] != before[label][kind]}
            for label in datastores}


def describe(counts: dict[str, dict[str, float]]) -> str:
    parts = []
    for label, kinds in counts.items():
        total = sum(kinds.values())
        detail = ", ".join(f"{v:g} {k}" for k, v in kinds.items())
        parts.append(f"{label} {total:.1f} ({detail})" if detail else f"{label} 0")
    return "datastore ops per request: " + "; ".join(parts)
