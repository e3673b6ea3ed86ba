"""Signed checkpoints of the audit trail: every few seconds, the head (position and hash) of every
partition, signed with the gateway's token-signing key, so that cutting a partition's tail back
behind a checkpoint is detected (`chain_verify.py`), and an outside witness given an exported
checkpoint can later prove what the trail held at that moment.

The idea is Certificate Transparency's signed tree head (RFC 6962 §3.5, RFC 9162 §4.10): a log
signs its size and root hash with a timestamp, each timestamp later than the last, and signs the
same head again with a fresh timestamp when nothing was added. Here each partition is a hash
chain, so its last link's hash commits to the whole partition as a Merkle root does to a tree, and
the signed statement is a JWS (the gateway's RS256 key from `keys.Keyring`, header typ
`audit-checkpoint+jwt`) whose claims are `iss`, `iat` (seconds) and `heads`:
`[{"partition", "seq", "hash"}, ...]`. Unlike a Merkle tree there is no logarithmic consistency
proof: "this trail still extends that checkpoint" is checked by walking the partition to the
checkpointed position, which verification does anyway.

A replica writes one when some head moved since the newest checkpoint, and at least every
`REFRESH_SECONDS` even when none did (a fresh timestamp, as RFC 6962 asks). Checkpoint ids are the
time slot (`iat // interval`), so replicas racing for one slot write it once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from pymongo.errors import DuplicateKeyError

from gateway import chain, partitions, store
from gateway.keys import Keyring

TYP = "audit-checkpoint+jwt"
REFRESH_SECONDS = 60.0
LATEST_ID = "latest-checkpoint"
_log = logging.getLogger(__name__)


async def _heads(db: store.Db) -> list[dict[str, Any]]:
    """Every partition's last link: its head document advanced past the links written since (a
    writer moves its head document at most every chain.HEAD_SECONDS)."""
    heads = []
    for doc in await partitions.heads(db):
        partition = partitions.of_head(doc)
        seq, digest = await chain.current_head(db, partition)
        if seq > 0:
            heads.append({"partition": partition.name, "seq": seq, "hash": digest})
    return heads


async def write(db: store.Db, keys: Keyring, issuer: str, interval: float) -> dict[str, Any] | None:
    """Sign and store a checkpoint of every partition's head, unless the newest one already says
    the same and is younger than REFRESH_SECONDS, or another replica took this slot."""
    now = time.time()
    heads = await _heads(db)
    latest = await db.audit_chain.find_one({"_id": LATEST_ID})
    if latest is not None and latest.get("heads") == heads and now - float(latest["iat"]) < REFRESH_SECONDS:
        return None
    slot = int(now // interval)
    claims = {"iss": issuer, "iat": int(now), "heads": heads}
    token = await keys.sign(claims, typ=TYP)
    doc = {"_id": f"{slot:012d}", "slot": slot, "recorded": datetime.now(UTC), "jws": token}
    try:
        await db.audit_checkpoints.insert_one(doc)
    except DuplicateKeyError:
        return None
    try:
        await db.audit_chain.update_one(
            {"_id": LATEST_ID, "slot": {"$not": {"$gte": slot}}},
            {"$set": {"slot": slot, "iat": now, "heads": heads, "checkpoint": doc["_id"]}}, upsert=True)
    except DuplicateKeyError:  # a newer checkpoint is already the latest
        pass
    return doc


async def run(db: store.Db, keys: Keyring, issuer: str, interval: float) -> None:
    """Write checkpoints every `interval` seconds for as long as the gateway runs."""
    while True:
        await asyncio.sleep(interval)
        try:
            await write(db, keys, issuer, interval)
        except Exception as exc:  # the datastore is away: the next round tries again
            _log.warning("audit checkpoint not written (%s)", type(exc).__name__)


def read(token: str, keyset: KeySet) -> dict[str, Any]:
    """The claims of a checkpoint JWS whose signature a gateway key verifies; ValueError if none
    does or it is not a checkpoint."""
    try:
        compact = jws.deserialize_compact(token, keyset, algorithms=["RS256"])
    except (JoseError, ValueError) as exc:
        raise ValueError(f"its signature does not verify ({type(exc).__name__})") from None
    if compact.protected.get("typ") != TYP:
        raise ValueError("it is not an audit checkpoint")
    claims = json.loads(compact.payload)
    heads = claims.get("heads")
    if not isinstance(heads, list) or not all(
            isinstance(h, dict) and isinstance(h.get("partition"), str) and isinstance(h.get("seq"), int)
            and isinstance(h.get("hash"), str) for h in heads):
        raise ValueError("its heads are malformed")
    return dict(claims)


async def latest(db: store.Db) -> dict[str, Any] | None:
    pointer = await db.audit_chain.find_one({"_id": LATEST_ID})
    if pointer is None:
        return None
    return await db.audit_checkpoints.find_one({"_id": pointer["checkpoint"]})


async def all_checkpoints(db: store.Db) -> list[dict[str, Any]]:
    """Every stored checkpoint, oldest first (one per few seconds of traffic: a small collection)."""
    return sorted(await db.audit_checkpoints.find({}).to_list(), key=lambda d: str(d["_id"]))


async def export(db: store.Db, keys: Keyring) -> dict[str, Any] | None:
    """The newest checkpoint as a witness keeps it: the JWS, its claims and the public keys that
    verify it (also at /oauth/jwks)."""
    doc = await latest(db)
    if doc is None:
        return None
    keyset = await keys.keyset(refresh=True)
    return {"checkpoint": doc["_id"], "jws": doc["jws"], "claims": read(doc["jws"], keyset),
            "jwks": await keys.public_jwks()}
