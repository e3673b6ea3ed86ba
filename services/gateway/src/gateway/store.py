"""Every gateway database query: clients, users, signing keys, assertion jtis, authorization
sessions, codes, refresh tokens, launches, revocations and rate windows, and the indexes of the
audit trail. The audit chain's writes live in chain.py (partitions.py, checkpoints.py), next to
the hashing they must agree with, its verification in chain_verify.py, its searches in
audit_store.py."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from bson.binary import Binary
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

Db = AsyncDatabase[dict[str, Any]]
_log = logging.getLogger(__name__)


# The audit trail's indexes: each one costs CPU on every audited request (SecantusDB maintains
# them in Python), so only the chain position and the phase-1 drivers of audit_store.DRIVERS.
AUDIT_INDEXES: list[tuple[tuple[str, ...], bool]] = [
    # unique: two writers can never both claim the same link of a partition (chain.py); legacy
    # records (no `partition`) are indexed under null, so their old `seq` uniqueness holds too.
    (("partition", "seq"), True),
    (("entities",), False),  # a patient's records too: `entities` holds the record's patient
    (("agents",), False),
    (("request_id",), False),  # a request's records, from the x-request-id in its logs
    (("recorded",), False),  # the search's order and its walk back in time
]


async def ensure_indexes(db: Db) -> None:
    await db.assertion_jtis.create_index([("expires", ASCENDING)])
    await _ensure_audit_indexes(db)
    await db.audit_chain.create_index([("kind", ASCENDING)])
    await db.signing_keys.create_index([("created", DESCENDING)])
    await db.authorization_sessions.create_index([("expires", ASCENDING)])
    await db.authorization_codes.create_index([("expires", ASCENDING)])
    await db.refresh_tokens.create_index([("family", ASCENDING)])
    await db.refresh_tokens.create_index([("expires", ASCENDING)])
    await db.revoked_tokens.create_index([("expires", ASCENDING)])
    await db.revoked_tokens.create_index([("revoked_at", ASCENDING)])
    await db.launches.create_index([("expires", ASCENDING)])
    await db.rate_windows.create_index([("expires", ASCENDING)])


async def _ensure_audit_indexes(db: Db) -> None:
    """Create AUDIT_INDEXES, then drop any other index on `audit_events` (deployments shed the
    retired `client_id`, `kind`, `patient` and the single-chain `seq`); `_id_` is never touched.
    Created first, so a replica still writing while another upgrades never loses the unique
    position."""
    for fields, unique in AUDIT_INDEXES:
        await db.audit_events.create_index([(f, ASCENDING) for f in fields], unique=unique)
    wanted = {tuple((f, ASCENDING) for f in fields) for fields, _ in AUDIT_INDEXES}
    async for index in await db.audit_events.list_indexes():
        if index["name"] != "_id_" and tuple(index["key"].items()) not in wanted:
            try:
                await db.audit_events.drop_index(index["name"])
            except OperationFailure:  # another replica starting up dropped it first
                _log.info("index audit_events.%s was already dropped", index["name"])


# -- clients and users ------------------------------------------------------------------------

async def audit_record_stored(db: Db, record_id: str) -> bool:
    """Whether this audit record is stored: an append that failed (a timeout, say) may still
    have landed, and writing it again would record it twice (gateway/refusals.py)."""
    return await db.audit_events.find_one({"_id": record_id}, {"_id": 1}) is not None


async def get_client(db: Db, client_id: str) -> dict[str, Any] | None:
    return await db.clients.find_one({"_id": client_id, "disabled": {"$ne": True}})


async def put_client(db: Db, client: dict[str, Any]) -> None:
    await db.clients.replace_one({"_id": client["_id"]}, client, upsert=True)


async def get_user(db: Db, username: str) -> dict[str, Any] | None:
    return await db.users.find_one({"_id": username})


async def put_user(db: Db, user: dict[str, Any]) -> None:
    await db.users.replace_one({"_id": user["_id"]}, user, upsert=True)


# -- signing keys -----------------------------------------------------------------------------

async def signing_keys(db: Db) -> list[dict[str, Any]]:
    """Keys still publishable (newest first); the newest signs."""
    return await db.signing_keys.find({"retired": {"$ne": True}}).sort("created", DESCENDING).to_list()


async def add_signing_key(db: Db, kid: str, sealed_key: dict[str, Any]) -> None:
    """`sealed_key`: the public JWK and the sealed private one (keys.seal_private_jwk), never
    the clear private key."""
    await db.signing_keys.insert_one(
        {"_id": kid, **sealed_key, "created": datetime.now(UTC), "retired": False}
    )


async def seal_signing_key(db: Db, kid: str, sealed_key: dict[str, Any]) -> bool:
    """Replace a key stored in clear (before the KEK) by its sealed form, once."""
    result = await db.signing_keys.update_one({"_id": kid, "jwk": {"$exists": True}},
                                              {"$set": sealed_key, "$unset": {"jwk": ""}})
    return result.modified_count == 1


async def all_signing_keys(db: Db) -> list[dict[str, Any]]:
    """Every key document, retired ones too (newest first)."""
    return await db.signing_keys.find({}).sort("created", DESCENDING).to_list()


async def signing_keys_not_sealed_under(db: Db, kek_id: str) -> list[dict[str, Any]]:
    """Key documents, retired ones too, not sealed under KEK `kek_id` (or still in clear)."""
    return await db.signing_keys.find({"sealed.kek": {"$ne": kek_id}}).to_list()


async def reseal_signing_key(db: Db, kid: str, read_ciphertext: bytes,
                             sealed_key: dict[str, Any]) -> bool:
    """Replace a key's seal, only if it still holds the ciphertext it was read with
    (compare-and-set): False when another replica re-sealed it first."""
    result = await db.signing_keys.update_one(
        {"_id": kid, "sealed.ct": Binary(read_ciphertext)}, {"$set": {"sealed": sealed_key["sealed"]}})
    return result.modified_count == 1


# -- client-assertion replay protection (SMART Backend Services: SHALL reject a replayed jti) --
# SMART App Launch 2.2 §backend-services "Signature Verification": the server SHALL "check that
# the `jti` value has not been previously encountered for the given `iss` within the maximum
# allowed authentication JWT lifetime"; RFC 7523 §3 item 7 keeps the used jti values "for the
# length of time for which the JWT would be considered valid based on the applicable "exp"".

ASSERTION_KEEP_AFTER_EXP = timedelta(minutes=10)
_DUPLICATE_KEY = 11000  # MongoDB's DuplicateKey error code


async def remember_assertion(db: Db, client_id: str, jti: str, expires: datetime) -> bool:
    """Record a client assertion's jti; False if it was seen before (the unique `_id`).

    One `insert` command sent as it is, not `insert_one`: the MongoDB driver specification
    (retryable-writes.md, "Behavioral Changes for Write Commands") says a generic command method
    "MUST NOT automatically add a transaction ID", so this write is not a retryable write.
    A retryable write's reply is kept by the server for replay; SecantusDB keeps the last 10,000
    for 30 minutes and scans and sorts all of them on every retryable write (measured: 8.9 ms of
    datastore CPU per insert once 10,000 are kept, 0.6 ms for this command). Not retried on a
    network error, an insert that failed is a 503 (the client asks again with a new assertion),
    and one that landed before the error cannot come back as a false replay. Expired jtis go
    in `forget_expired_assertions`, not here: a delete per token was one more write per request."""
    reply = await db.command({"insert": db.assertion_jtis.name,
                              "documents": [{"_id": f"{client_id}\n{jti}", "expires": expires}]})
    problems = list(reply.get("writeErrors") or [])
    if problems and all(problem.get("code") == _DUPLICATE_KEY for problem in problems):
        return False
    if problems or reply.get("writeConcernError"):
        detail = (problems or [reply["writeConcernError"]])[0]
        raise OperationFailure(str(detail.get("errmsg", "jti insert failed")), detail.get("code"))
    return True


async def forget_expired_assertions(db: Db) -> None:
    """Drop jtis whose assertion expired over ASSERTION_KEEP_AFTER_EXP ago: such an assertion is
    refused for its `exp` before its jti is looked at, so forgetting it opens no replay."""
    await db.assertion_jtis.delete_many({"expires": {"$lt": datetime.now(UTC) - ASSERTION_KEEP_AFTER_EXP}})


async def claim_login_attempt(db: Db, username: str, *, max_failures: int) -> int | None:
    """Count a sign-in attempt as a failure before its password is checked, in one atomic update
    that only matches while the account is unlocked and has fewer than `max_failures` counted:
    however many guesses arrive at once, at most `max_failures` are ever checked. Returns the
    attempt's number, or None when the account is locked (or being locked)."""
    now = datetime.now(UTC)
    user = await db.users.find_one_and_update(
        {"_id": username, "$and": [
            {"$or": [{"locked_until": {"$exists": False}}, {"locked_until": {"$lte": now}}]},
            {"$or": [{"failed_logins": {"$exists": False}}, {"failed_logins": {"$lt": max_failures}}]},
        ]},
        {"$inc": {"failed_logins": 1}}, return_document=ReturnDocument.AFTER)
    return None if user is None else int(user["failed_logins"])


async def record_login_failure(db: Db, username: str, *, attempt: int, max_failures: int,
                               lockout_seconds: int) -> None:
    """The claimed attempt failed (it is already counted); the last allowed one locks the account."""
    if attempt >= max_failures:
        until = datetime.now(UTC) + timedelta(seconds=lockout_seconds)
        await db.users.update_one({"_id": username},
                                  {"$set": {"locked_until": until, "failed_logins": 0}})


async def record_login_success(db: Db, username: str) -> None:
    await db.users.update_one({"_id": username}, {
        "$set": {"failed_logins": 0, "last_login": datetime.now(UTC)}, "$unset": {"locked_until": ""}})


# -- authorization sessions, codes, refresh tokens, launches (SMART App Launch 2.2) ------------
# Secrets (codes, refresh tokens) are stored by their SHA-256 only.

async def put_session(db: Db, session: dict[str, Any]) -> None:
    await db.authorization_sessions.insert_one(session)


async def forget_expired(db: Db) -> None:
    """Drop what can no longer be used (no TTL indexes: the embedded datastore lacks them). Every
    reader checks `expires` itself, so this is housekeeping, run now and then (oauth.Sweep)."""
    now = datetime.now(UTC)
    await db.authorization_codes.delete_many({"expires": {"$lt": now - timedelta(hours=1)}})
    await db.authorization_sessions.delete_many({"expires": {"$lt": now}})
    await db.launches.delete_many({"expires": {"$lt": now}})
    await db.revoked_tokens.delete_many({"expires": {"$lt": now}})
    await db.refresh_tokens.delete_many({"expires": {"$lt": now - timedelta(days=1)}})


async def get_session(db: Db, session_id: str) -> dict[str, Any] | None:
    return await db.authorization_sessions.find_one(
        {"_id": session_id, "expires": {"$gt": datetime.now(UTC)}})


async def update_session(db: Db, session_id: str, changes: dict[str, Any]) -> None:
    await db.authorization_sessions.update_one({"_id": session_id}, {"$set": changes})


async def end_session(db: Db, session_id: str) -> bool:
    """Claim a session for its one outcome (code or error); False if already ended."""
    result = await db.authorization_sessions.delete_one({"_id": session_id})
    return result.deleted_count == 1


async def put_code(db: Db, code: dict[str, Any]) -> None:
    await db.authorization_codes.insert_one(code)


async def redeem_code(db: Db, code_hash: str) -> dict[str, Any] | None:
    """Mark a code used and return it as it was; a second redemption sees used=True."""
    return await db.authorization_codes.find_one_and_update(
        {"_id": code_hash}, {"$set": {"used": True, "used_at": datetime.now(UTC)}})


async def put_refresh(db: Db, refresh: dict[str, Any]) -> None:
    await db.refresh_tokens.insert_one(refresh)


async def get_refresh(db: Db, token_hash: str) -> dict[str, Any] | None:
    return await db.refresh_tokens.find_one({"_id": token_hash})


async def claim_refresh(db: Db, token_hash: str) -> dict[str, Any] | None:
    """Rotate: the first caller gets the token document, every later one None."""
    return await db.refresh_tokens.find_one_and_update(
        {"_id": token_hash, "used": {"$ne": True}, "revoked": {"$ne": True}},
        {"$set": {"used": True, "used_at": datetime.now(UTC)}})


async def revoke_refresh_family(db: Db, family: str) -> None:
    await db.refresh_tokens.update_many({"family": family}, {"$set": {"revoked": True}})


async def revoke_family_tokens(db: Db, family: str) -> tuple[str, datetime, datetime | None]:
    """Revoke every access token of a grant; returns the revocation's id, expiry and stamp."""
    revoked_id, expires = f"family:{family}", datetime.now(UTC) + timedelta(days=1)
    return revoked_id, expires, await _put_revocation(db, revoked_id, expires)


async def revoke_jti(db: Db, jti: str, expires: datetime) -> tuple[str, datetime, datetime | None]:
    revoked_id = f"jti:{jti}"
    return revoked_id, expires, await _put_revocation(db, revoked_id, expires)


async def _put_revocation(db: Db, revoked_id: str, expires: datetime) -> datetime | None:
    # `revoked_at` is the datastore's own clock ($currentDate), one clock for every replica, so
    # replicas can ask "what was revoked since the newest revocation I have seen". Returned, so
    # this replica's own feed hands the same stamp to the backends as every other replica will.
    doc = await db.revoked_tokens.find_one_and_update(
        {"_id": revoked_id}, {"$set": {"expires": expires}, "$currentDate": {"revoked_at": True}},
        projection={"revoked_at": 1}, upsert=True, return_document=ReturnDocument.AFTER)
    return doc.get("revoked_at") if doc else None


async def is_revoked(db: Db, jti: str, family: str | None) -> bool:
    ids = [f"jti:{jti}"] + ([f"family:{family}"] if family else [])
    return await db.revoked_tokens.find_one({"_id": {"$in": ids}}) is not None


async def revocations_since(db: Db, since: datetime | None) -> list[dict[str, Any]]:
    """Revocations stamped at or after `since`; with None, every revocation not yet expired."""
    query: dict[str, Any] = ({"revoked_at": {"$gte": since}} if since is not None
                             else {"expires": {"$gt": datetime.now(UTC)}})
    return await db.revoked_tokens.find(query, {"expires": 1, "revoked_at": 1}).to_list()


async def put_launch(db: Db, launch: dict[str, Any]) -> None:
    await db.launches.insert_one(launch)


async def get_launch(db: Db, launch_id: str) -> dict[str, Any] | None:
    return await db.launches.find_one({"_id": launch_id, "expires": {"$gt": datetime.now(UTC)}})


# -- rate limiting: windows are counted in each replica's memory (ratelimit.py); with
# `rate_limit_sync_seconds` set, replicas add their counts here and read back the shared total.

async def add_to_window(db: Db, key: str, window_start: int, window_seconds: int, amount: int) -> int:
    """Add `amount` requests to a client's window; the window's total over every replica."""
    doc = await db.rate_windows.find_one_and_update(
        {"_id": f"{key}\n{window_start}"},
        {"$inc": {"count": amount},
         "$setOnInsert": {"expires": datetime.fromtimestamp(window_start + window_seconds, UTC)}},
        upsert=True, return_document=ReturnDocument.AFTER)
    return int(doc["count"]) if doc else amount


async def forget_old_windows(db: Db) -> None:
    await db.rate_windows.delete_many({"expires": {"$lt": datetime.now(UTC) - timedelta(minutes=5)}})
