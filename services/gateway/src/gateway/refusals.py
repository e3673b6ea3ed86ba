"""Audit records for the requests the HTTP layer refused before the gateway's application saw them
(`mindchart_core.http_limits`: 431 header fields too large, 414 request target too long, 408 head
too slow, and uvicorn's 400 for a request that does not parse), so that the trail holds every
request the gateway received, as the audit promise says (DESIGN.md; 45 CFR 164.312(b)).

Each is an AuditEvent of the same BALP shape as every other request's (IHE BALP 1.1, "Basic Audit
Log Patterns", https://profiles.ihe.net/ITI/BALP: `type` audit-event-type#rest, the client agent
with `network.address` = the peer's IP and type 2, the server agent, `source`, the XrequestId
entity), with a failure `outcome` and `outcomeDesc` as BALP's own refusal example does
(`ex-auditAuthZconsent-deny`: outcome serious failure + outcomeDesc). A refusal is a client's
fault, so `outcome` is 4 (minor failure, `audit.outcome_code`). No request was parsed, so there
is no interaction: `subtype` is the local code `http-refused`, and no header value is recorded
(one may hold a token), only the status and what was wrong. The peer is the TCP peer: nothing
forwarded was parsed, so behind a proxy it is the proxy.

A flood must not fill the audit store: a refused request costs its sender one connection and
nothing more, but one stored record each. So each gateway process records at most
`per_window` refusals one by one per `window_seconds` (MINDCHART_GATEWAY_REFUSAL_AUDIT_*); the
rest are counted, and when the window ends one summary record says how many more there were, by
status and from how many addresses, naming the most frequent ones (`entity.detail`, R4: `type`
string + `valueString`). Records are written by a background task, after the refusal was
answered (nothing was acknowledged to the client that a lost record would contradict); a failed
write is tried again, after looking the record up (a timed-out append may have landed: written
again it would be in the trail twice), and while the audit store is down the queue stays
bounded, its overflow counted into the next summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from gateway import chain, store
from mindchart_core import audit as audit_shape
from mindchart_core import http_limits

INTERACTION = "http-refused"
_MOST_FREQUENT = 5  # peers named in a summary
_MAX_PEERS = 1000  # distinct peers counted per window; beyond, counted as "other"
_log = logging.getLogger(__name__)


def refusal_record(status: int, peer: str, observer: str, reason: str,
                   details: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """One stored audit record (the shape `audit.build_record` stores for a request)."""
    audit = audit_shape.RestAudit(
        interaction=INTERACTION, method="", path="", query="", status=status,
        request_id=uuid.uuid4().hex, client_ip=peer, observer=observer, outcome_desc=reason,
        recorded=chain.truncate_to_millis(datetime.now(UTC)))
    event = audit_shape.rest_audit_event(audit)
    if details:
        event["entity"].append({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "4",
                     "display": "Other"},
            "description": "requests refused before parsing, not recorded one by one",
            "detail": [{"type": name, "valueString": value} for name, value in details],
        })
    return {
        "_id": event["id"], "kind": "rest", "recorded": audit.recorded,
        "request_id": audit.request_id, "method": "", "path": "", "status": status,
        "latency_ms": 0.0, "client_id": None, "subject": None, "patient": None, "agents": [],
        "entities": [], "outcome": event["outcome"], "event": event,
    }


class RefusalAudit:
    """The `http_limits.RefusalListener` the gateway's lifespan hands to its HTTP protocol."""

    def __init__(self, audit_chain: chain.AuditChain, observer: str, *, per_window: int = 60,
                 window_seconds: float = 60.0) -> None:
        self.chain = audit_chain
        self.observer = observer
        self.per_window = per_window
        self.window_seconds = window_seconds
        self._pending: list[dict[str, Any]] = []
        self._uncertain = False  # the first pending record's last append failed
        self._wake = asyncio.Event()
        self._window_start = time.monotonic()
        self._window_began = datetime.now(UTC)
        self._recorded = 0  # one by one, in this window
        self._by_status: Counter[int] = Counter()  # counted only, in this window
        self._by_peer: Counter[str] = Counter()

    def __call__(self, refusal: http_limits.Refusal) -> None:
        self._roll()
        if self._recorded < self.per_window and len(self._pending) < 2 * self.per_window:
            self._recorded += 1
            self._pending.append(refusal_record(refusal.status, refusal.peer, self.observer,
                                                refusal.reason))
        else:
            self._by_status[refusal.status] += 1
            peer = refusal.peer if refusal.peer in self._by_peer or len(self._by_peer) < _MAX_PEERS \
                else "other"
            self._by_peer[peer] += 1
        self._wake.set()

    def _roll(self, *, force: bool = False) -> None:
        """Close the window once it is over: a summary of what was only counted in it."""
        now = time.monotonic()
        if not force and now - self._window_start < self.window_seconds:
            return
        if self._by_status:
            self._pending.append(self._summary())
        self._window_start, self._window_began = now, datetime.now(UTC)
        self._recorded = 0
        self._by_status, self._by_peer = Counter(), Counter()

    def _summary(self) -> dict[str, Any]:
        total = sum(self._by_status.values())
        statuses = ", ".join(f"{status} x {n}" for status, n in sorted(self._by_status.items()))
        frequent = self._by_peer.most_common(_MOST_FREQUENT)
        began = self._window_began.isoformat(timespec="seconds").replace("+00:00", "Z")
        reason = (f"{total} more requests refused before parsing since {began} were not recorded "
                  f"one by one ({statuses}), from {len(self._by_peer)} addresses; most often "
                  + ", ".join(f"{peer} ({n})" for peer, n in frequent))
        details = [("refused", str(total))]
        details += [(f"status {status}", str(n)) for status, n in sorted(self._by_status.items())]
        details += [(f"peer {peer}", str(n)) for peer, n in frequent]
        status = self._by_status.most_common(1)[0][0]
        return refusal_record(status, frequent[0][0], self.observer, reason, details)

    async def run(self) -> None:
        """Write what is queued; close each window, even when no refusal comes to wake this."""
        while True:
            left = self.window_seconds - (time.monotonic() - self._window_start)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, left))
            self._wake.clear()
            self._roll()
            if not await self.flush():
                await asyncio.sleep(1.0)  # the audit store is failing: try again soon

    async def flush(self) -> bool:
        """Append what is queued, in order, one record at a time (at most `per_window` a window,
        so each its own commit costs nothing that matters, and a failure leaves the rest
        queued). A record whose append failed may have landed anyway: it is looked up before it
        is written again, never recorded twice."""
        while self._pending:
            record = self._pending[0]
            try:
                if self._uncertain and await store.audit_record_stored(self.chain.db, record["_id"]):
                    pass  # the failed attempt had landed
                else:
                    await self.chain.append(record)
            except Exception as exc:
                self._uncertain = True
                _log.error("refusal audit write failed (%s); %d records kept to retry",
                           type(exc).__name__, len(self._pending))
                return False
            self._uncertain = False
            self._pending.pop(0)
        return True

    async def close(self) -> None:
        """At shutdown: the window's summary and whatever is queued, once."""
        self._roll(force=True)
        await self.flush()


__all__ = ["INTERACTION", "RefusalAudit", "refusal_record"]
