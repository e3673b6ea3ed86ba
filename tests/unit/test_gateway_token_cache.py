"""The gateway's cache of verified access tokens (proxy.VerifiedTokens): a token's signature is
checked once per TTL, never served past its expiry, never for other text, and the cache stays
bounded. Revocation is checked on every request whatever the cache says: tests/e2e/
test_smart_launch.py::test_revocation reads with a token (now cached), revokes it and is refused
on the very next request."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from gateway import proxy
from mindchart_core import errors, tokens

ISSUER, AUDIENCE = "https://gw.example", "https://gw.example/fhir"
KEY = ECKey.import_key(ECKey.generate_key("P-256").as_dict(private=True), parameters={"kid": "k1"})


class CountingKeys(tokens.StaticKeys):
    """The verifier's key source, counting how often a signature had to be checked."""

    def __init__(self) -> None:
        super().__init__(KeySet([KEY]))
        self.lookups = 0

    async def keyset(self, *, refresh: bool = False) -> KeySet:
        self.lookups += 1
        return await super().keyset(refresh=refresh)


def token(exp: float) -> str:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "c", "client_id": "c", "scope": "system/*.rs",
              "jti": uuid.uuid4().hex, "iat": int(time.time()), "exp": int(exp)}
    return jwt.encode({"alg": "ES256", "kid": "k1"}, claims, KEY)


def cache(size: int = 10_000) -> tuple[proxy.VerifiedTokens, CountingKeys]:
    keys = CountingKeys()
    return proxy.VerifiedTokens(tokens.TokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=keys),
                                size=size), keys


def test_a_token_is_verified_once_then_served_from_the_cache() -> None:
    verified, keys = cache()
    raw = token(time.time() + 300)
    first = asyncio.run(verified.verify(raw))
    again = asyncio.run(verified.verify(raw))
    assert again == first and keys.lookups == 1


def test_an_expired_token_is_refused_even_when_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    verified, keys = cache()
    exp = time.time() + 60
    raw = token(exp)
    asyncio.run(verified.verify(raw))
    # Past exp plus the verifier's clock skew: refused, by the cache itself (no new signature check).
    monkeypatch.setattr(proxy.time, "time", lambda: exp + tokens.CLOCK_SKEW_SECONDS + 1)
    with pytest.raises(errors.Unauthorized):
        asyncio.run(verified.verify(raw))
    assert keys.lookups == 1
    # An already expired token is refused by the verifier and never enters the cache.
    monkeypatch.undo()
    stale = token(time.time() - tokens.CLOCK_SKEW_SECONDS - 5)
    for _ in range(2):
        with pytest.raises(errors.Unauthorized):
            asyncio.run(verified.verify(stale))
    assert len(verified) == 1


def test_other_text_is_never_served_from_the_cache() -> None:
    verified, _ = cache()
    raw = token(time.time() + 300)
    asyncio.run(verified.verify(raw))
    header, payload, signature = raw.split(".")
    forged = ".".join((header, payload, signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")))
    with pytest.raises(errors.Unauthorized):
        asyncio.run(verified.verify(forged))


def test_the_cache_is_bounded_and_reverifies_after_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    verified, keys = cache(size=3)
    raws = [token(time.time() + 300) for _ in range(7)]
    for raw in raws:
        asyncio.run(verified.verify(raw))
        assert len(verified) <= 3
    lookups = keys.lookups
    later = time.monotonic() + proxy._TOKEN_TTL + 1
    monkeypatch.setattr(proxy.time, "monotonic", lambda: later)
    asyncio.run(verified.verify(raws[-1]))
    assert keys.lookups == lookups + 1  # its signature checked again, as a retired key needs
