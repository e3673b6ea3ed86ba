"""`Subscription.channel.header` values at rest: AES-256-GCM under the subscription-header key
(MINDCHART_RECORDS_SUBSCRIPTION_HEADER_KEY), a fresh nonce per write, the subscription id bound
as associated data (a sealed value moved to another subscription does not open). They are sent
with every notification (backport IG channels.md: "Each Subscription.header value SHALL be conveyed
as an HTTP request header"), never returned in reads (redacted) and never logged."""

from __future__ import annotations

import os

import orjson
from bson.binary import Binary
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

REDACTED = "[stored encrypted; not shown]"


def seal(key: bytes, sub_id: str, headers: tuple[str, ...]) -> Binary | None:
    if not headers:
        return None
    nonce = os.urandom(12)
    return Binary(nonce + AESGCM(key).encrypt(nonce, orjson.dumps(list(headers)), sub_id.encode()))


def unseal(key: bytes, sub_id: str, sealed: bytes | None) -> list[tuple[str, str]]:
    if not sealed:
        return []
    raw = bytes(sealed)
    values: list[str] = orjson.loads(AESGCM(key).decrypt(raw[:12], raw[12:], sub_id.encode()))
    return [(name.strip(), value.strip()) for name, _, value in (h.partition(":") for h in values)]


def redacted(headers: tuple[str, ...]) -> list[str]:
    return [f"{h.split(':', 1)[0].strip()}: {REDACTED}" for h in headers]
