"""Revoked access tokens (RFC 7009), as an in-memory list each replica keeps current, so the proxy
path never queries the datastore to ask "is this token revoked?".

Every `revocation_refresh_seconds` the list asks the datastore only for revocations stamped since
the newest one it has seen (the stamp is the datastore's clock, `store._put_revocation`), with a
few seconds of overlap for writes that commit out of order. This replica's own revocations are
added at once. A revoked access token is therefore refused at once by the replica that revoked
it and within one refresh interval by every other replica. If refreshing fails for longer than
`stale_after` seconds, `is_revoked` falls back to asking the datastore on every request:
never a stale "not revoked". Refresh tokens and introspection still query the datastore
(`store.is_revoked`, `store.get_refresh`) and see a revocation immediately.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import structlog

from gateway import store

log = structlog.get_logger(__name__)
OVERLAP = timedelta(seconds=5)


class RevocationList:
    def __init__(self, db: store.Db, *, refresh_seconds: float = 1.0) -> None:
        self.db = db
        self.refresh_seconds = refresh_seconds
        self.stale_after = max(5 * refresh_seconds, refresh_seconds + 5.0)
        self._expires: dict[str, datetime] = {}  # "jti:<jti>" | "family:<sid>" -> when it lapses
        self._newest: datetime | None = None  # newest `revoked_at` seen
        self._fresh_at = float("-inf")  # monotonic time the last successful refresh started
        self._pruned_at = time.monotonic()

    async def refresh(self) -> None:
        started = time.monotonic()
        since = self._newest - OVERLAP if self._newest is not None else None
        for doc in await store.revocations_since(self.db, since):
            self._expires[str(doc["_id"])] = doc["expires"]
            stamp = doc.get("revoked_at")
            if stamp is not None:
                stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
                if self._newest is None or stamp > self._newest:
                    self._newest = stamp
        self._fresh_at = started
        if started - self._pruned_at > 60:
            now = datetime.now(UTC)
            self._expires = {k: v for k, v in self._expires.items() if v > now}
            self._pruned_at = started

    async def run(self) -> None:
        """The refresh loop (a lifespan task)."""
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
            except Exception as exc:  # keep looping; is_revoked falls back when stale
                log.warning("revocation_refresh_failed", error_type=type(exc).__name__)

    async def is_revoked(self, jti: str, family: str | None) -> bool:
        if time.monotonic() - self._fresh_at > self.stale_after:
            return await store.is_revoked(self.db, jti, family)
        return f"jti:{jti}" in self._expires or (family is not None and f"family:{family}" in self._expires)

    async def revoke_jti(self, jti: str, expires: datetime) -> None:
        revoked_id, lapses = await store.revoke_jti(self.db, jti, expires)
        self._expires[revoked_id] = lapses

    async def revoke_family(self, family: str) -> None:
        """Every access token of a grant (its `sid`)."""
        revoked_id, lapses = await store.revoke_family_tokens(self.db, family)
        self._expires[revoked_id] = lapses
