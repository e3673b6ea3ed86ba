"""Rate limiting per client at the gateway: fixed windows counted in this replica's memory, so the
proxy path costs no datastore operation. Over budget: 429 with `Retry-After` (RFC 6585 §4,
RFC 9110 §10.2.3).

The budget is `rate_limit_requests` per `rate_limit_window_seconds`, or the client's own
`rate_limit` from its registration (`mindchart client create --rate-limit N`). With N replicas
and `rate_limit_sync_seconds` = 0 (the default) the budget is per replica: a client may make up
to N x budget requests per window in total. With `rate_limit_sync_seconds` > 0 each replica adds
its counts to the datastore at that interval and reads back the total of every replica, so the
budget is shared, overshooting by at most what the other replicas counted since their last sync.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import structlog

from gateway import store
from mindchart_core import errors

log = structlog.get_logger(__name__)
Window = tuple[str, int]  # (client key, window start in epoch seconds)


class RateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


def enforce(limiter: RateLimiter, key: str, limit: int, request_state: dict[str, Any]) -> None:
    """Count a request; over budget, note the refusal for the audit record and answer 429."""
    try:
        limiter.hit(key, limit)
    except RateLimited as exc:
        request_state["refusal"] = "rate limit exceeded"
        raise errors.Throttled("Too many requests for this client; slow down",
                               headers={"Retry-After": str(exc.retry_after)}) from None


class RateLimiter:
    def __init__(self, *, window_seconds: int, sync_seconds: float = 0.0) -> None:
        self.window_seconds = window_seconds
        self.sync_seconds = sync_seconds
        self._counted: dict[Window, int] = {}  # requests this replica counted
        self._synced: dict[Window, int] = {}  # how many of them the datastore has
        self._shared: dict[Window, int] = {}  # every replica's total, as of the last sync
        self._current = 0

    def hit(self, key: str, limit: int) -> None:
        """Count one request of `key` (refused ones too); RateLimited over `limit`."""
        now = time.time()
        start = int(now // self.window_seconds * self.window_seconds)
        if start != self._current:
            self._forget_before(start)
        window = (key, start)
        counted = self._counted.get(window, 0) + 1
        self._counted[window] = counted
        total = counted + self._shared.get(window, 0) - self._synced.get(window, 0)
        if total > limit:
            raise RateLimited(max(1, int(start + self.window_seconds - now + 0.999)))

    def _forget_before(self, start: int) -> None:
        self._current = start
        for counts in (self._counted, self._synced, self._shared):
            for window in [w for w in counts if w[1] < start - self.window_seconds]:
                del counts[window]

    async def sync(self, db: store.Db) -> None:
        """Add what this replica counted since the last sync; read back every replica's total."""
        for window, counted in list(self._counted.items()):
            if window[1] < self._current and self._synced.get(window) == counted:
                continue  # a past window already synced
            amount = counted - self._synced.get(window, 0)
            total = await store.add_to_window(db, window[0], window[1], self.window_seconds, amount)
            self._synced[window] = self._synced.get(window, 0) + amount
            self._shared[window] = total
        if random.random() < 0.05:  # noqa: S311 - occasional housekeeping, not security
            await store.forget_old_windows(db)

    async def run(self, db: store.Db) -> None:
        """The sync loop (a lifespan task, only when `rate_limit_sync_seconds` > 0)."""
        while True:
            await asyncio.sleep(self.sync_seconds)
            try:
                await self.sync(db)
            except Exception as exc:  # the local counts still limit this replica
                log.warning("rate_limit_sync_failed", error_type=type(exc).__name__)
