"""8. Two gateway replicas ÷ one, on the same datastores: the same read (`GET
/fhir/DocumentReference/{id}`) at the same total concurrency, against one gateway or spread over
two. Each replica appends to its own audit partition (gateway/partitions.py), so the second adds
no contention; on this 2-core machine it cannot add CPU either, so the target is "no collapse":
throughput ≥ 1.0 x one, and no audit batch retried for its chain position
(`mindchart_gateway_audit_chain_conflicts_total` on both replicas, before and after)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from bench import load, sides
from bench.harness import BenchStack, free_port
from bench.measures.context import Context
from bench.report import Result, Row
from mindchart_cli import stack as mindchart_stack

KEY = "8-gateway-replicas"
TITLE = "8 two gateway replicas ÷ one (same datastores)"
TARGET = 1.0
READ_PATH = "/fhir/DocumentReference/demo-note-1"


def _conflicts(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.search(r"^mindchart_gateway_audit_chain_conflicts_total (\S+)$", text, re.M)
    return float(found[1]) if found else float("nan")


@contextmanager
def second_gateway(stack: BenchStack) -> Iterator[tuple[str, int]]:
    """A second gateway process on the same datastores and public URL, started as the stack
    starts its own (mindchart_cli.stack: the same command line, and the bench's environment on
    top of the service's, so it logs at WARNING and has the same rate limit); its base URL and pid.
    Until 9f70c40 it had neither, and logged every request at INFO."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stack.config.extra_env,
           **stack.config.service_env("gateway"), "MINDCHART_GATEWAY_PORT": str(port)}
    with open(stack.runner.log_dir / "gateway-replica.log", "ab") as log:
        process = subprocess.Popen(mindchart_stack.service_argv("gateway", "127.0.0.1", port),
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError("the second gateway replica exited (gateway-replica.log)")
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the second gateway replica did not become ready")
                time.sleep(0.2)
            yield url, process.pid
        finally:
            process.terminate()
            process.wait(timeout=30)


async def run(ctx: Context) -> Result:
    stack, result = ctx.stack, Result(KEY, TITLE)
    with second_gateway(stack) as (replica, replica_pid):
        return await _measure(ctx, result, [stack.gateway_url, replica],
                              {"gateway": stack.pid("gateway"), "gateway-replica": replica_pid})


async def _measure(ctx: Context, result: Result, urls: list[str], pids: dict[str, int]) -> Result:
    headers = {"Authorization": f"Bearer {ctx.stack.token()}", "Accept": "application/fhir+json"}
    half = max(ctx.plan.concurrency // 2, 1)
    clients = {"one": load.loopback_client(urls[0], concurrency=ctx.plan.concurrency, headers=headers),
               "a": load.loopback_client(urls[0], concurrency=half, headers=headers),
               "b": load.loopback_client(urls[1], concurrency=half, headers=headers)}
    try:
        before = [_conflicts(u) for u in urls]

        def make(side: str) -> load.Operation:
            async def read(n: int) -> int:
                client = clients["one"] if side == "one" else clients["a" if n % 2 else "b"]
                return (await client.get(READ_PATH)).status_code
            return read

        pooled = await sides.compare(["one", "two"], make, ctx.plan)
        conflicts = sum(after - b for after, b in zip([_conflicts(u) for u in urls], before, strict=True))
        ratio = pooled["two"].throughput / pooled["one"].throughput
        met = ratio >= TARGET and conflicts == 0
        profiles: list[Any] = []
        if not met:  # where both replicas spend their time under the two-replica load
            profiles = await ctx.profiled_load(pids, "8-replicas", make("two"))
            result.profiles = [p.to_json() for p in profiles]
    finally:
        for client in clients.values():
            await client.aclose()
    result.parameters = {"path": READ_PATH, **ctx.plan.as_dict()}
    result.figures = {**{side: r.summary() for side, r in pooled.items()}, "chain_conflicts": conflicts}
    result.rows = [Row(TITLE, f"two {sides.describe(pooled['two'])}; one {sides.describe(pooled['one'])}; "
                              f"audit batches retried for their position: {conflicts:g}",
                       ratio, f"≥ {TARGET}, 0 conflicts", met,
                       ["Both replicas share the machine's 2 cores with the stack and the load "
                        "generator: a second replica adds no CPU, only a second audit partition.",
                        *(f"Profile of {label} under the two-replica load: {p.describe()}."
                          for label, p in zip(pids if profiles else {}, profiles, strict=True))])]
    return result
