"""Revoked access tokens (RFC 7009), as an in-memory list each replica keeps current, so neither
the proxy path nor the revocation feed the backends follow queries the datastore per request.

Every `revocation_refresh_seconds` the list asks the datastore only for revocations stamped since
the newest one it has seen (the stamp is the datastore's clock, `store._put_revocation`), with a
few seconds of overlap for writes that commit out of order. This replica's own revocations are
added at once. A revoked access token is therefore refused at once by the replica that revoked
it and within one refresh interval by every other replica. If refreshing fails for longer than
`stale_after` seconds, `is_revoked` falls back to asking the datastore on every request:
never a stale "not revoked". Refresh tokens and introspection still query the datastore
(`store.is_revoked`, `store.get_refresh`) and see a revocation immediately.

The feed (`GET /oauth/revocations`, `changes`) answers records and psychnotes from this list. It
is a long poll (RFC 6202 §1: the server "attempts to 'hold open' (not immediately reply to) each
HTTP request, responding only when there are events to deliver"; §5.5 on timeouts: "generally 30
seconds is a safer value", so a hold is capped at MAX_WAIT_SECONDS): a backend that already has
everything this replica knows is answered as soon as the list changes (this replica's own
revocation at once, another replica's at this one's next refresh), the server drains, or `wait`
seconds pass. Each entry the list learns gets this process's next sequence number; the cursor it
hands out (`<epoch>.<seq>`) names exactly what a backend has seen, so a change is never missed
nor sent twice to a backend that stays on one replica. A cursor from another process (a restart,
another replica) falls back to the datastore stamp (`since`, with the overlap) as before, held
while nothing is newer than that stamp (so a backend whose requests a load balancer spreads over
replicas never spins). Not covered exactly there: a revocation whose write committed out of
order, older than `since`, that this replica already held when the request came; it goes out
with the overlap when the hold ends (at most 25 s).

A list that cannot vouch for itself (refreshing failed for `stale_after`: the datastore frozen or
unreachable) never answers "nothing new": a request without a wait gets 503 at once, a held one
stays held and is answered by the first refresh that succeeds again (the list turning fresh
again is an event to deliver in RFC 6202 §1's sense: it is what the backend needs to vouch for
tokens again). Before that, a request held through an outage
kept its backend stale, refusing every token with 503, until its hold ended up to 20 s after the
datastore was back (issue 16).

Who may read the feed (default deny): only Mindchart's own backends. Every feed request must
carry the deployment's feed secret (`MINDCHART_GATEWAY_REVOCATIONS_SECRET`, the same value as
records' and psychnotes' `*_REVOCATIONS_SECRET`) as an `Authorization: Bearer` credential
(RFC 6750 §2.1); anything else is refused with 401 and a `WWW-Authenticate: Bearer` challenge
(§3; no credential at all: a challenge with no error code, §3.1) before its parameters are read
or a slot taken. The feed was public before: anyone could fill the MAX_HELD slots with idle
requests, pushing the backends' own requests into being answered at once and so into polling,
and keep the gateway busy answering them. The secret is a service credential, not a token: it
is compared in constant time, never logged, and nothing else accepts it. Why not the backends'
SMART Backend Services tokens: records has no client at the gateway, and the token endpoint needs
the gateway's datastore, while the feed is exactly what must recover the moment it comes back.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from gateway import store
from mindchart_core import errors, http_limits, tokens

log = structlog.get_logger(__name__)
OVERLAP = timedelta(seconds=5)
MAX_WAIT_SECONDS = 25.0
# Held feed requests at once; past this a request is answered at once (its backend then waits a
# refresh interval before the next, as before long polls), so holding costs bounded memory.
MAX_HELD = 256


@dataclass(frozen=True)
class Entry:
    expires: datetime
    stamp: datetime | None  # `revoked_at`, the datastore's clock
    seq: int  # when this process learned it


@dataclass(frozen=True)
class Changes:
    """One answer of the feed."""

    revoked: list[dict[str, Any]]
    newest: str | None
    cursor: str

    def to_json(self) -> dict[str, Any]:
        return {"revoked": self.revoked, "newest": self.newest, "cursor": self.cursor}


def _utc(stamp: datetime) -> datetime:
    """Aware, and to the millisecond as BSON stores it, so a revocation this replica made is the
    same entry when its refresh reads it back."""
    stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    return stamp.replace(microsecond=stamp.microsecond // 1000 * 1000)


class RevocationList:
    def __init__(self, db: store.Db, *, refresh_seconds: float = 1.0, reader_secret: str = "") -> None:
        self.db = db
        self._reader_secret = reader_secret.encode()  # empty: nobody may read the feed
        self.refresh_seconds = refresh_seconds
        self.stale_after = max(5 * refresh_seconds, refresh_seconds + 5.0)
        self.epoch = secrets.token_hex(4)  # this process: a cursor of another one is not exact
        self._entries: dict[str, Entry] = {}  # "jti:<jti>" | "family:<sid>"
        self._seq = 0
        self._newest: datetime | None = None  # newest `revoked_at` seen
        self._fresh_at = float("-inf")  # monotonic time the last successful refresh started
        self._pruned_at = time.monotonic()
        self._changed = asyncio.Event()  # set (and replaced) whenever the list learns something
        self._held = 0

    # -- keeping the list ----------------------------------------------------------------------
    def _learn(self, revoked_id: str, expires: datetime, stamp: datetime | None) -> None:
        expires, stamp = _utc(expires), _utc(stamp) if stamp is not None else None
        known = self._entries.get(revoked_id)
        if known is not None and known.expires == expires and known.stamp == stamp:
            return  # seen again through the refresh overlap
        self._seq += 1
        self._entries[revoked_id] = Entry(expires, stamp, self._seq)
        if stamp is not None and (self._newest is None or stamp > self._newest):
            self._newest = stamp
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def refresh(self) -> None:
        started = time.monotonic()
        since = self._newest - OVERLAP if self._newest is not None else None
        for doc in await store.revocations_since(self.db, since):
            self._learn(str(doc["_id"]), doc["expires"], doc.get("revoked_at"))
        was_stale = self.stale
        self._fresh_at = started
        if was_stale and not self.stale:
            # Fresh again (the datastore is back): requests held while the list could not vouch
            # for itself are answered now, so their backends are fresh again at once.
            log.info("revocation_list_fresh_again")
            self._wake()
        if started - self._pruned_at > 60:
            now = datetime.now(UTC)
            self._entries = {k: v for k, v in self._entries.items() if v.expires > now}
            self._pruned_at = started

    @property
    def stale(self) -> bool:
        return time.monotonic() - self._fresh_at > self.stale_after

    async def run(self) -> None:
        """The refresh loop (a lifespan task)."""
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
            except Exception as exc:  # keep looping; is_revoked falls back when stale
                log.warning("revocation_refresh_failed", error_type=type(exc).__name__)

    async def is_revoked(self, jti: str, family: str | None) -> bool:
        if self.stale:
            return await store.is_revoked(self.db, jti, family)
        return f"jti:{jti}" in self._entries or (family is not None and f"family:{family}" in self._entries)

    async def revoke_jti(self, jti: str, expires: datetime) -> None:
        revoked_id, lapses, stamp = await store.revoke_jti(self.db, jti, expires)
        self._learn(revoked_id, lapses, stamp)

    async def revoke_family(self, family: str) -> None:
        """Every access token of a grant (its `sid`)."""
        revoked_id, lapses, stamp = await store.revoke_family_tokens(self.db, family)
        self._learn(revoked_id, lapses, stamp)

    # -- the feed --------------------------------------------------------------------------------
    def check_reader(self, authorization: str | None) -> None:
        """401 unless the request presents the feed secret (module docstring): before anything
        else, so a refused caller is never held."""
        presented = tokens.bearer_value(authorization).encode()  # none: 401, challenge, no error
        if not self._reader_secret or not hmac.compare_digest(presented, self._reader_secret):
            raise errors.Unauthorized("The revocation feed is for Mindchart's own services")

    def _seen_up_to(self, cursor: str | None) -> int | None:
        """The sequence number a cursor of this process names, else None."""
        epoch, _, seq = (cursor or "").partition(".")
        if epoch != self.epoch or not seq.isdigit() or int(seq) > self._seq:
            return None
        return int(seq)

    def _answer(self, cursor: str | None, since: datetime | None) -> tuple[Changes, bool]:
        """What to send, and whether any of it is news to the backend (else the request waits)."""
        now = datetime.now(UTC)
        live = [(k, e) for k, e in self._entries.items() if e.expires > now]
        seen = self._seen_up_to(cursor)
        if seen is not None:
            sent = news = [(k, e) for k, e in live if e.seq > seen]
        elif since is not None:  # another process's cursor: the datastore clock, with the overlap
            sent = [(k, e) for k, e in live if e.stamp is not None and e.stamp >= since - OVERLAP]
            news = [(k, e) for k, e in sent if e.stamp is not None and e.stamp > since]
        else:
            sent = news = live
        known = [stamp for stamp in (self._newest, since) if stamp is not None]
        newest = max(known) if known else None
        return Changes(
            revoked=[{"id": k, "expires": int(e.expires.timestamp())} for k, e in sent],
            newest=newest.isoformat() if newest is not None else None,
            cursor=f"{self.epoch}.{self._seq}"), bool(news)

    async def changes(self, *, cursor: str | None, since: datetime | None, wait: float) -> Changes:
        """The feed's answer: at once if there is news for this backend (or `wait` is 0), else
        when the list changes, turns fresh again, the server starts draining, or `wait` seconds
        pass. A list that cannot vouch for itself (refreshing has failed for `stale_after`)
        never answers an empty "nothing new": asked without a wait, it answers 503 at once; a
        held request stays held through the staleness and is answered as soon as a refresh
        succeeds again (`refresh` wakes it), or 503 if its `wait` ends first. So a backend whose
        request the gateway held through a datastore outage is fresh again as soon as the
        gateway is, not when its hold would have ended (issue 16)."""
        wait = min(max(wait, 0.0), MAX_WAIT_SECONDS)
        draining = http_limits.draining()
        if self.stale and (wait == 0 or self._held >= MAX_HELD or draining.is_set()):
            raise errors.Unavailable("Token revocations cannot be listed right now")
        if not self.stale:
            answer, news = self._answer(cursor, since)
            if news or wait == 0 or self._held >= MAX_HELD or draining.is_set():
                return answer
        deadline = time.monotonic() + wait
        self._held += 1
        try:
            while True:
                changed = self._changed
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(draining.wait())]
                try:
                    await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for pending in waits:
                        pending.cancel()
                if not self.stale or draining.is_set():
                    break  # something changed or the list is fresh again: answer; draining: go
        finally:
            self._held -= 1
        if self.stale:
            raise errors.Unavailable("Token revocations cannot be listed right now")
        return self._answer(cursor, since)[0]
