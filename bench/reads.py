"""Two targets serving the same read, side by side (measurements 1 and 2): same path, same token,
same concurrency. Both must answer 200 with identical bytes; then throughput is compared in
alternating rounds, the cost of one request is counted on each side, and where the candidate
misses its target (or only its CPU-bound ratio does) the processes behind it are profiled."""

from __future__ import annotations

from dataclasses import dataclass

from bench import cost, load, sides
from bench.measures.context import Context
from bench.report import Result, Row


@dataclass(frozen=True)
class Sides:
    baseline: str  # e.g. "direct": the side the candidate is measured against
    candidate: str  # e.g. "gateway"
    urls: dict[str, str]  # side -> base URL
    pids: dict[str, int]  # every process whose CPU counts
    datastores: dict[str, str]  # label -> MongoDB URL whose operations count
    profile: dict[str, int]  # label -> pid sampled under candidate load on a miss


async def compare_reads(ctx: Context, result: Result, path: str, target: float, on: Sides) -> Result:
    headers = {"Authorization": f"Bearer {ctx.stack.token()}", "Accept": "application/fhir+json"}
    clients = {side: load.loopback_client(url, concurrency=ctx.plan.concurrency, headers=headers)
               for side, url in on.urls.items()}
    try:
        bodies = {side: await client.get(path) for side, client in clients.items()}
        if any(r.status_code != 200 for r in bodies.values()):
            return result.failed(", ".join(f"{s} answered {r.status_code}" for s, r in bodies.items()))
        if bodies[on.baseline].content != bodies[on.candidate].content:
            return result.failed(f"{on.candidate} and {on.baseline} returned different bytes")

        def make(side: str) -> load.Operation:
            client = clients[side]

            async def read(n: int) -> int:
                return (await client.get(path)).status_code
            return read

        pooled = await sides.compare([on.baseline, on.candidate], make, ctx.plan)
        costs = {side: await cost.per_request(make(side), datastores=on.datastores, pids=on.pids,
                                              n=ctx.plan.cost_requests)
                 for side in (on.baseline, on.candidate)}
        ratio = pooled[on.candidate].throughput / pooled[on.baseline].throughput
        met = ratio >= target
        result.parameters = {"path": path, "bytes": len(bodies[on.baseline].content), **ctx.plan.as_dict()}
        result.figures = {side: {**r.summary(), "cost": costs[side].to_json()} for side, r in pooled.items()}
        row = Row(result.title,
                  f"{on.candidate} {sides.describe(pooled[on.candidate])}; "
                  f"{on.baseline} {sides.describe(pooled[on.baseline])}",
                  ratio, f"≥ {target}", met,
                  [f"Per {on.candidate} read: {costs[on.candidate].describe()}.",
                   f"Per {on.baseline} read: {costs[on.baseline].describe()}.",
                   cost.server_ratio(on.candidate, costs[on.candidate], on.baseline, costs[on.baseline])])
        # Also when only the CPU-bound ratio misses: what a separate load generator would see.
        if not met or cost.cpu_bound_ratio(costs[on.candidate], costs[on.baseline]) < target:
            profiles = await ctx.profiled_load(on.profile, result.key.split("-")[0] + "-" + on.candidate,
                                               make(on.candidate))
            result.profiles = [p.to_json() for p in profiles]
            row.notes.extend(f"Profile of {label} under {on.candidate} reads: {p.describe()}."
                             for label, p in zip(on.profile, profiles, strict=True))
        result.rows = [row]
        return result
    finally:
        for client in clients.values():
            await client.aclose()
