"""1. Gateway overhead: `GET /fhir/DocumentReference/{id}` through the gateway vs straight to
records, same token (records verifies it itself), same concurrency. Target: through-gateway
throughput ≥ 0.8 x direct."""

from __future__ import annotations

from bench import cost, load, sides
from bench.measures.context import Context
from bench.report import Result, Row

KEY = "1-gateway-overhead"
TITLE = "1 gateway overhead (read via gateway ÷ direct)"
TARGET = 0.8
READ_PATH = "/fhir/DocumentReference/demo-note-1"


async def run(ctx: Context) -> Result:
    result = Result(KEY, TITLE)
    token = ctx.stack.token()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    bases = {"gateway": ctx.stack.gateway_url, "direct": ctx.stack.direct_url("records")}
    clients = {side: load.loopback_client(url, concurrency=ctx.plan.concurrency, headers=headers)
               for side, url in bases.items()}
    try:
        bodies = {side: await c.get(READ_PATH) for side, c in clients.items()}
        if any(r.status_code != 200 for r in bodies.values()):
            return result.failed(", ".join(f"{s} answered {r.status_code}" for s, r in bodies.items()))
        if bodies["gateway"].content != bodies["direct"].content:
            return result.failed("the gateway and records returned different bytes")

        def make(side: str) -> load.Operation:
            client = clients[side]

            async def read(n: int) -> int:
                return (await client.get(READ_PATH)).status_code
            return read

        pooled = await sides.compare(["direct", "gateway"], make, ctx.plan)
        stores = ctx.stack.datastores("records", "gateway")
        costs = {side: await cost.per_request(make(side), datastores=stores, pids=ctx.stack.pids(),
                                              n=ctx.plan.cost_requests)
                 for side in ("direct", "gateway")}
        ratio = pooled["gateway"].throughput / pooled["direct"].throughput
        met = ratio >= TARGET
        result.parameters = {"path": READ_PATH, "bytes": len(bodies["direct"].content),
                             **ctx.plan.as_dict()}
        result.figures = {side: {**r.summary(), "cost": costs[side].to_json()} for side, r in pooled.items()}
        row = Row(result.title,
                  f"gateway {sides.describe(pooled['gateway'])}; direct {sides.describe(pooled['direct'])}",
                  ratio, f"≥ {TARGET}", met,
                  [f"Per read via the gateway: {costs['gateway'].describe()}.",
                   f"Per direct read: {costs['direct'].describe()}.",
                   cost.server_ratio("via the gateway", costs["gateway"], "direct", costs["direct"])])
        if not met:
            async def again() -> load.LoadResult:
                return await load.drive(make("gateway"), load.Bounds(
                    ctx.plan.concurrency, ctx.plan.max_requests, ctx.plan.profile_seconds + 1))
            targets = {"gateway": ctx.stack.pid("gateway")}
            if "datastore-gateway" in ctx.stack.runner.processes:
                targets["gateway-db"] = ctx.stack.pid("datastore-gateway")
            _, profiles = await ctx.profiled(targets, "1-gateway", again)
            result.profiles = [p.to_json() for p in profiles]
            row.notes.extend(f"Profile of {label} under gateway reads: {p.describe()}."
                             for label, p in zip(targets, profiles, strict=True))
        result.rows = [row]
        return result
    finally:
        for client in clients.values():
            await client.aclose()
