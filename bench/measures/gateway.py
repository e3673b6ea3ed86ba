"""1. Gateway overhead: `GET /fhir/DocumentReference/{id}` through the gateway vs straight to
records, same token (records verifies it itself), same concurrency. Target: through-gateway
throughput ≥ 0.8 x direct."""

from __future__ import annotations

from bench.measures.context import Context
from bench.reads import Sides, compare_reads
from bench.report import Result

KEY = "1-gateway-overhead"
TITLE = "1 gateway overhead (read via gateway ÷ direct)"
TARGET = 0.8
READ_PATH = "/fhir/DocumentReference/demo-note-1"


async def run(ctx: Context) -> Result:
    stack = ctx.stack
    profile = {"gateway": stack.pid("gateway")}
    if "datastore-gateway" in stack.runner.processes:  # py-spy reads the embedded server too
        profile["gateway-db"] = stack.pid("datastore-gateway")
    return await compare_reads(ctx, Result(KEY, TITLE), READ_PATH, TARGET, Sides(
        baseline="direct", candidate="gateway",
        urls={"gateway": stack.gateway_url, "direct": stack.direct_url("records")},
        pids=stack.pids(), datastores=stack.datastores("records", "gateway"), profile=profile))
