"""What one request costs, measured over `n` requests made one at a time: the datastore
operations it causes (`serverStatus.opcounters` of each datastore before and after) and the CPU
each process spends on it (utime + stime from /proc). On a 2-core machine shared by the load
generator, three services and three datastores, throughput is about 2 CPU-seconds divided by the
total CPU per request, so these explain a ratio."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from bench import load

KINDS = ("insert", "query", "update", "delete", "getmore", "command")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
DRIVER = "load generator"


@dataclass
class Cost:
    requests: int
    datastore_ops: dict[str, dict[str, float]]  # datastore -> operation kind -> per request
    cpu_ms: dict[str, float]  # process -> CPU milliseconds per request
    elapsed_s: float = 0.0  # wall time of the n requests

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "datastore_ops_per_request": self.datastore_ops,
                "cpu_ms_per_request": self.cpu_ms, "elapsed_s": round(self.elapsed_s, 3)}

    def background_ms(self, label: str, over: Cost) -> float:
        """CPU per request of `over` that process `label` spends on work of its own whatever the
        requests (timers, polls it answers): its CPU rate during these requests, which did not go
        through it, times `over`'s wall time per request."""
        if self.elapsed_s <= 0 or over.requests <= 0:
            return 0.0
        rate = self.cpu_ms.get(label, 0.0) * self.requests / self.elapsed_s  # ms per second
        return rate * over.elapsed_s / over.requests

    @property
    def server_cpu_ms(self) -> float:
        """CPU per request of everything but the load generator."""
        return sum(ms for label, ms in self.cpu_ms.items() if label != DRIVER)

    def describe(self) -> str:
        ops = []
        for label, kinds in self.datastore_ops.items():
            detail = ", ".join(f"{v:g} {k}" for k, v in kinds.items())
            ops.append(f"{label} {sum(kinds.values()):.1f}" + (f" ({detail})" if detail else ""))
        cpu = ", ".join(f"{label} {ms:.1f}" for label, ms in self.cpu_ms.items())
        total = sum(self.cpu_ms.values())
        return f"datastore operations {'; '.join(ops)}; CPU ms {cpu} (total {total:.1f})"


def opcounters(url: str) -> Counter[str]:
    client: MongoClient[dict[str, Any]]
    with MongoClient(url, serverSelectionTimeoutMS=3000) as client:
        counters = client.admin.command("serverStatus").get("opcounters", {})
    return Counter({k: int(counters.get(k, 0)) for k in KINDS})


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


async def per_request(operation: load.Operation, *, datastores: dict[str, str], pids: dict[str, int],
                      n: int = 100, first: int = 10**7) -> Cost:
    """The `command` count includes a few opcounter reads and driver heartbeats of the window."""
    ops_before = {label: opcounters(url) for label, url in datastores.items()}
    cpu_before = {label: cpu_seconds(pid) for label, pid in pids.items()}
    driver_before, wall_before = time.process_time(), time.perf_counter()
    await load.drive(operation, load.Bounds(1, n, 120.0), first=first)
    driver, elapsed = time.process_time() - driver_before, time.perf_counter() - wall_before
    cpu = {label: cpu_seconds(pid) - cpu_before[label] for label, pid in pids.items()}
    ops_after = {label: opcounters(url) for label, url in datastores.items()}
    ops = {label: {kind: round((ops_after[label][kind] - ops_before[label][kind]) / n, 2) for kind in KINDS
                   if ops_after[label][kind] != ops_before[label][kind]}
           for label in datastores}
    cpu_ms = {label: round(1000 * seconds / n, 2) for label, seconds in cpu.items() if seconds > 0}
    cpu_ms[DRIVER] = round(1000 * driver / n, 2)
    return Cost(n, ops, cpu_ms, elapsed)


def cpu_bound_ratio(slow: Cost, fast: Cost) -> float:
    """The ratio the throughputs would tend to if the load generator ran elsewhere: here its CPU
    per request is paid on both sides and pulls the measured ratio towards 1."""
    return fast.server_cpu_ms / slow.server_cpu_ms if slow.server_cpu_ms else float("nan")


def server_ratio(slow_label: str, slow: Cost, fast_label: str, fast: Cost) -> str:
    ratio = cpu_bound_ratio(slow, fast)
    return (f"Without the load generator's CPU (same on both sides, {slow.cpu_ms.get(DRIVER, 0):.1f} ms), "
            f"CPU per request is {slow.server_cpu_ms:.1f} ms {slow_label} vs {fast.server_cpu_ms:.1f} ms "
            f"{fast_label}: a CPU-bound ratio of {ratio:.2f}.")
