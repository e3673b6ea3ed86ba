"""2. Records vs the floor: records' read throughput vs bench/floor_app.py (bare uvicorn + PyMongo
returning the same stored `raw` bytes, no FHIR work, no token check), same document, same
concurrency. Target: records ≥ 0.6 x the floor."""

from __future__ import annotations

from bench.measures.context import Context
from bench.reads import Sides, compare_reads
from bench.report import Result

KEY = "2-records-vs-floor"
TITLE = "2 records vs floor (records read ÷ bare PyMongo read)"
TARGET = 0.6
READ_PATH = "/fhir/DocumentReference/demo-note-1"


async def run(ctx: Context) -> Result:
    stack = ctx.stack
    with stack.floor() as (floor_url, floor_pid):
        return await compare_reads(ctx, Result(KEY, TITLE), READ_PATH, TARGET, Sides(
            baseline="floor", candidate="records",
            urls={"records": stack.direct_url("records"), "floor": floor_url},
            pids={**stack.pids(), "floor": floor_pid}, datastores=stack.datastores("records"),
            profile={"records": stack.pid("records")}))
