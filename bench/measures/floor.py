"""2. Records vs the floor: records' read throughput vs bench/floor_app.py (bare uvicorn + PyMongo
returning the same stored `raw` bytes, no FHIR work, no token check), same document, same
concurrency. Target: records ≥ 0.6 x the floor."""

from __future__ import annotations

from bench import cost, load, sides
from bench.measures.context import Context
from bench.report import Result, Row

KEY = "2-records-vs-floor"
TITLE = "2 records vs floor (records read ÷ bare PyMongo read)"
TARGET = 0.6
READ_PATH = "/fhir/DocumentReference/demo-note-1"


async def run(ctx: Context) -> Result:
    result = Result(KEY, TITLE)
    token = ctx.stack.token()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    with ctx.stack.floor() as (floor_url, floor_pid):
        bases = {"records": ctx.stack.direct_url("records"), "floor": floor_url}
        clients = {side: load.loopback_client(url, concurrency=ctx.plan.concurrency, headers=headers)
                   for side, url in bases.items()}
        try:
            bodies = {side: await c.get(READ_PATH) for side, c in clients.items()}
            if any(r.status_code != 200 for r in bodies.values()):
                return result.failed(", ".join(f"{s} answered {r.status_code}" for s, r in bodies.items()))
            same = bodies["records"].content == bodies["floor"].content

            def make(side: str) -> load.Operation:
                client = clients[side]

                async def read(n: int) -> int:
                    return (await client.get(READ_PATH)).status_code
                return read

            pooled = await sides.compare(["floor", "records"], make, ctx.plan)
            pids = {**ctx.stack.pids(), "floor": floor_pid}
            costs = {side: await cost.per_request(make(side), datastores=ctx.stack.datastores("records"),
                                                  pids=pids, n=ctx.plan.cost_requests)
                     for side in ("floor", "records")}
            ratio = pooled["records"].throughput / pooled["floor"].throughput
            met = ratio >= TARGET
            result.parameters = {"path": READ_PATH, "bytes": len(bodies["records"].content),
                                 "same_bytes_as_records": same, **ctx.plan.as_dict()}
            result.figures = {side: {**r.summary(), "cost": costs[side].to_json()}
                              for side, r in pooled.items()}
            row = Row(result.title,
                      f"records {sides.describe(pooled['records'])}; floor {sides.describe(pooled['floor'])}"
                      + ("" if same else " (floor bytes differ from records'!)"),
                      ratio, f"≥ {TARGET}", met,
                      [f"Per records read: {costs['records'].describe()}.",
                       f"Per floor read: {costs['floor'].describe()}.",
                       cost.server_ratio("records", costs["records"], "the floor", costs["floor"])])
            if not met or cost.cpu_bound_ratio(costs["records"], costs["floor"]) < TARGET:
                # Also when only the CPU-bound ratio misses: what a separate load generator would see.
                async def again() -> load.LoadResult:
                    return await load.drive(make("records"), load.Bounds(
                        ctx.plan.concurrency, ctx.plan.max_requests, ctx.plan.profile_seconds + 1))
                _, profiles = await ctx.profiled({"records": ctx.stack.pid("records")}, "2-records", again)
                result.profiles = [p.to_json() for p in profiles]
                row.notes.append("Profile of records: " + profiles[0].describe() + ".")
            result.rows = [row]
            return result
        finally:
            for client in clients.values():
                await client.aclose()
