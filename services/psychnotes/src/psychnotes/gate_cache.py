"""What the consent gate remembers between reads, and for how long (issue 16: a consent-gated read
should cost about what a records read costs).

Two memories, both bounded, both per process:

- `VerifiedConsentTokens`: consent tokens whose signature, `typ`, `kid`, issuer, audience and
  claim shapes (consent_token.verify) already passed, by the SHA-256 of their exact text. A
  cached token is still refused once it expires (its `exp`, with the same clock skew as
  verification); nothing else about a token can change after it is signed, and the signing key
  is loaded once per process. What can change, the basis (the Consent or the exception grant),
  is never answered from here.
- `Bases`: the Consent or exception-grant document behind a token, as read from the datastore,
  for `ttl` seconds (`MINDCHART_PSYCHNOTES_GATE_CACHE_SECONDS`, default 1; 0 reads it on every
  request). The live checks (in force now, not revoked, same patient and purposes) still run on
  every read against that document. A revocation or attestation made by this process forgets
  the document at once, so on one replica revocation still takes effect at the next read; one
  made by another replica takes effect here within `ttl` seconds (45 CFR 164.508(b)(5) lets the
  individual revoke "at any time", except to the extent the covered entity "has taken action in
  reliance thereon"; the gateway's access-token revocations reach the backends on the same
  one-second scale, mindchart_core.tokens.RevocationFeed). A document that is not found is never
  remembered.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from psychnotes import consent_token

MAX_ENTRIES = 10_000


class VerifiedConsentTokens:
    def __init__(self, size: int = MAX_ENTRIES, clock: Callable[[], float] = time.time) -> None:
        self.size = size
        self.clock = clock
        self._tokens: dict[bytes, consent_token.ConsentToken] = {}

    def verify(self, raw: str,
               verify: Callable[[str], consent_token.ConsentToken]) -> consent_token.ConsentToken:
        """The verified token of `raw` (calling `verify` only on a miss), or InvalidConsentToken."""
        key = hashlib.sha256(raw.encode()).digest()
        now = self.clock()
        token = self._tokens.get(key)
        if token is not None:
            if token.expires_at + consent_token.CLOCK_SKEW_SECONDS < now:
                del self._tokens[key]
                raise consent_token.InvalidConsentToken("the consent token has expired")
            return token
        token = verify(raw)
        if len(self._tokens) >= self.size:
            self._tokens = {k: t for k, t in self._tokens.items()
                            if t.expires_at + consent_token.CLOCK_SKEW_SECONDS >= now}
            if len(self._tokens) >= self.size:
                self._tokens.clear()
        self._tokens[key] = token
        return token


class Bases:
    """Consent and exception-grant documents by key (`Consent/<id>`, `grant:<jti>`)."""

    def __init__(self, ttl: float, size: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.size = size
        self._docs: dict[str, tuple[float, dict[str, Any]]] = {}
        self._forgotten = 0  # bumped by every forget: a read in flight meanwhile stores nothing

    async def get(self, key: str,
                  load: Callable[[], Awaitable[dict[str, Any] | None]]) -> dict[str, Any] | None:
        if self.ttl <= 0:
            return await load()
        now = time.monotonic()
        cached = self._docs.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        forgotten = self._forgotten
        doc = await load()
        if doc is not None and self._forgotten == forgotten:
            if len(self._docs) >= self.size:
                self._docs = {k: v for k, v in self._docs.items() if v[0] > now}
                if len(self._docs) >= self.size:
                    self._docs.clear()
            self._docs[key] = (now + self.ttl, doc)
        return doc

    def forget(self, key: str) -> None:
        """Called after this process changed the document (revocation, attestation)."""
        self._docs.pop(key, None)
        self._forgotten += 1


def consent_key(consent_id: str) -> str:
    return f"Consent/{consent_id}"


def grant_key(jti: str) -> str:
    return f"grant:{jti}"
