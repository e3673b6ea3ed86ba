"""Rate limiting per client at the gateway: fixed windows counted in the gateway's datastore, so
all replicas share one budget. Over budget: 429 with `Retry-After` (RFC 6585 §4, RFC 9110 §10.2.3).

The budget is `rate_limit_requests` per `rate_limit_window_seconds`, or the client's own
`rate_limit` from its registration (`mindchart client create --rate-limit N`).
"""

from __future__ import annotations

import random
import time
from typing import Any

from gateway import store
from gateway.settings import GatewaySettings


class RateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


async def check(db: store.Db, settings: GatewaySettings, key: str,
                client: dict[str, Any] | None = None) -> None:
    window = settings.rate_limit_window_seconds
    limit = int((client or {}).get("rate_limit") or settings.rate_limit_requests)
    now = time.time()
    start = int(now // window * window)
    count = await store.count_in_window(db, key, start, window)
    if random.random() < 0.001:  # noqa: S311 - occasional housekeeping, not security
        await store.forget_old_windows(db)
    if count > limit:
        raise RateLimited(max(1, int(start + window - now + 0.999)))
