"""What a measurement gets: the running stack, the plan, where profiles go."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench import load, profiling
from bench.harness import BenchStack
from bench.plan import Plan
from bench.report import RESULTS

T = TypeVar("T")


@dataclass
class Context:
    stack: BenchStack
    plan: Plan
    shared: dict[str, Any] = field(default_factory=dict)  # figures one measurement leaves another

    @property
    def results_dir(self) -> Path:
        return RESULTS / self.plan.mode

    async def profiled(self, targets: dict[str, int], name: str,
                       work: Callable[[], Awaitable[T]]) -> tuple[T, list[profiling.Profile]]:
        """Run `work` while py-spy samples each target pid for `profile_seconds`; the work
        should last at least that long. Profiles land in bench/results/<mode>/<name>-<target>.json."""
        seconds = self.plan.profile_seconds
        running = {label: profiling.start(pid, self.results_dir / f"{name}-{label}.speedscope.json",
                                          seconds)
                   for label, pid in targets.items()}
        await asyncio.sleep(0.3)  # py-spy attaches
        started = time.monotonic()
        outcome = await work()
        if time.monotonic() - started < seconds:
            await asyncio.sleep(seconds - (time.monotonic() - started))
        profiles = [await asyncio.to_thread(profiling.finish, process,
                                            self.results_dir / f"{name}-{label}.speedscope.json")
                    for label, process in running.items()]
        return outcome, profiles

    async def profiled_load(self, targets: dict[str, int], name: str,
                            operation: load.Operation) -> list[profiling.Profile]:
        """`profiled` over `operation` driven at the plan's concurrency for a little longer than
        the profile lasts: where each target spends its time under that load."""
        async def again() -> load.LoadResult:
            return await load.drive(operation, load.Bounds(
                self.plan.concurrency, self.plan.max_requests, self.plan.profile_seconds + 1))
        _, profiles = await self.profiled(targets, name, again)
        return profiles
