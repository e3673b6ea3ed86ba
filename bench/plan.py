"""How long and how hard each measurement runs: `--quick` (under 3 minutes on a 2-core machine)
or full (about 30 minutes: it stores 100k notes). Every figure in a result names the plan it ran under."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Plan:
    mode: str
    concurrency: int  # workers of the load generator (one keep-alive connection each)
    seconds: float  # per side per round of a side-by-side comparison
    rounds: int  # sides alternate A B A B ... so drift in background load hits both alike
    max_requests: int  # per side per round (the count bound beside the duration bound)
    warmup: int
    notes_small: int  # measurement 3: stored progress notes, small and large
    notes_large: int
    notes_per_patient: int
    export_small: int  # measurement 7 exports at this many notes and at notes_large
    load_budget_s: float  # bulk loading stops here even short of notes_large (the result says so)
    search_requests: int  # per search per size, one at a time (latency, not throughput)
    search_seconds: float
    write_seconds: float
    token_assertions: int  # pre-signed, so signing stays outside the timed loop
    profile_seconds: int
    cost_requests: int  # requests made one at a time to count datastore operations and CPU

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = Plan(mode="quick", concurrency=8, seconds=1.5, rounds=2, max_requests=5000, warmup=20,
             notes_small=300, notes_large=3000, notes_per_patient=10, export_small=1000, load_budget_s=30,
             search_requests=15, search_seconds=1.5, write_seconds=2.0, token_assertions=200,
             profile_seconds=3, cost_requests=30)
FULL = Plan(mode="full", concurrency=8, seconds=6.0, rounds=3, max_requests=50_000, warmup=100,
            notes_small=1000, notes_large=100_000, notes_per_patient=10, export_small=10_000,
            load_budget_s=900,
            search_requests=100, search_seconds=8.0, write_seconds=8.0, token_assertions=1500,
            profile_seconds=10, cost_requests=100)
