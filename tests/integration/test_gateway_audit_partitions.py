"""The partitioned audit trail (gateway.chain, partitions, checkpoints, chain_verify) on the real
embedded datastore: replicas write their own partitions without ever contending, signed
checkpoints of every head are written and exported, and verify names the partition and position
of each kind of tampering: an altered, removed or inserted record, a tail cut back behind a
checkpoint, a tail rewritten with recomputed hashes, a forged checkpoint; a trail written before
partitioning is read as the `legacy` partition."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway import chain, chain_verify, checkpoints, partitions, store
from gateway.keys import Keyring
from mindchart_core import sealing
from tests.integration.conftest import DropsReplies, fresh_database

ISSUER = "http://gateway.test"


def record(tag: str) -> dict[str, Any]:
    return {"_id": tag, "kind": "rest", "request_id": tag, "status": 200,
            "recorded": chain.truncate_to_millis(datetime.now(UTC)),
            "event": {"resourceType": "AuditEvent", "id": tag}}


@pytest.fixture
async def db(mongo_url: str) -> AsyncIterator[Any]:
    async with fresh_database(mongo_url, "partitions") as database:
        await store.ensure_indexes(database)
        yield database


async def keyring(db: Any) -> Keyring:
    keys = Keyring(db, sealing.new_key())  # checkpoints are signed: a keyring with its KEK
    await keys.ensure_key()
    return keys


async def verify(db: Any, keys: Keyring, **kwargs: Any) -> dict[str, Any]:
    return await chain_verify.verify(db, keyset=await keys.keyset(refresh=True), **kwargs)


async def two_replicas(db: Any, each: int = 20) -> list[chain.AuditChain]:
    replicas = [chain.AuditChain(db, holder="replica-a"), chain.AuditChain(db, holder="replica-b")]
    await asyncio.gather(*(replicas[i % 2].append(record(f"r{i}")) for i in range(2 * each)))
    return replicas


def problem_of(result: dict[str, Any], kind: str) -> dict[str, Any]:
    assert result["ok"] is False, result
    found = [p for p in result["problems"] if p["kind"] == kind]
    assert found, result["problems"]
    return found[0]


async def test_replicas_write_their_own_partitions_without_conflicts(db: Any) -> None:
    conflicts = chain.CONFLICTS._value.get()
    replicas = await two_replicas(db)
    assert {r.partition.name for r in replicas if r.partition} == {"1", "2"}
    assert chain.CONFLICTS._value.get() == conflicts  # nobody ever lost a race for a position
    keys = await keyring(db)
    assert await checkpoints.write(db, keys, ISSUER, 5.0) is not None
    result = await verify(db, keys)
    assert result == {"ok": True, "checked": 40, "checkpoints": 1, "partitions": [
        {"partition": "1", "checked": 20}, {"partition": "2", "checked": 20}]}
    # Each record is bound to its partition and position by its hash.
    stored = await db.audit_events.find_one({"_id": "r1"})
    assert stored["hash"] == chain.record_hash(stored)
    assert chain.record_hash({**stored, "partition": "1" if stored["partition"] == "2" else "2"}) != stored["hash"]


async def test_a_stopped_replicas_partition_is_taken_over_and_a_lost_lease_moves_on(db: Any) -> None:
    first = chain.AuditChain(db, holder="old")
    await first.append(record("a1"))
    await first.stop()
    successor = chain.AuditChain(db, holder="new")
    await successor.append(record("a2"))
    assert successor.partition == partitions.Partition("1")  # reused, not a partition per restart
    # A replica whose lease was taken over (it stalled past its lease) moves to another partition.
    stalled = chain.AuditChain(db, holder="stalled", lease_seconds=0.001)
    await stalled.append(record("a3"))
    assert stalled.partition == partitions.Partition("2")
    await asyncio.sleep(0.01)
    thief = chain.AuditChain(db, holder="thief")
    assert await thief.start() == partitions.Partition("2")
    await stalled.keep_lease()
    assert stalled.partition == partitions.Partition("3")
    await stalled.append(record("a4"))
    await thief.append(record("a5"))
    result = await verify(db, await keyring(db))
    assert result["ok"] is True and result["checked"] == 5


async def test_checkpoints_are_signed_heads_written_once_per_change(db: Any) -> None:
    keys = await keyring(db)
    await two_replicas(db, each=3)
    doc = await checkpoints.write(db, keys, ISSUER, 5.0)
    assert doc is not None
    assert await checkpoints.write(db, keys, ISSUER, 5.0) is None  # nothing moved: nothing new
    claims = checkpoints.read(doc["jws"], await keys.keyset())
    heads = {h["partition"]: h for h in claims["heads"]}
    assert set(heads) == {"1", "2"} and claims["iss"] == ISSUER
    for name, head in heads.items():
        last = await db.audit_events.find_one({"partition": name, "seq": head["seq"]})
        assert head["seq"] == 3 and last["hash"] == head["hash"]
    header = json.loads(base64.urlsafe_b64decode(doc["jws"].split(".")[0] + "=="))
    assert header["typ"] == checkpoints.TYP and header["alg"] == "RS256"
    exported = await checkpoints.export(db, keys)
    assert exported is not None and exported["jws"] == doc["jws"]
    assert exported["claims"] == claims and exported["jwks"]["keys"][0]["kid"] == header["kid"]
    assert "d" not in exported["jwks"]["keys"][0]  # public halves only


async def test_verify_names_partition_and_position_of_an_altered_record(db: Any) -> None:
    keys = await keyring(db)
    await two_replicas(db)
    target = await db.audit_events.find_one({"partition": "2", "seq": 7})
    await db.audit_events.update_one({"_id": target["_id"]}, {"$set": {"status": 403}})
    found = problem_of(await verify(db, keys), "altered")
    assert (found["partition"], found["seq"], found["id"]) == ("2", 7, target["_id"])


async def test_verify_names_partition_and_position_of_a_removed_record(db: Any) -> None:
    keys = await keyring(db)
    await two_replicas(db)
    target = await db.audit_events.find_one({"partition": "1", "seq": 5})
    await db.audit_events.delete_one({"_id": target["_id"]})
    found = problem_of(await verify(db, keys), "removed")
    assert (found["partition"], found["seq"]) == ("1", 5)
    assert "#5" in found["detail"]


async def test_verify_names_an_inserted_record(db: Any) -> None:
    keys = await keyring(db)
    await two_replicas(db)
    model = await db.audit_events.find_one({"partition": "2", "seq": 3})
    forged = {k: v for k, v in model.items() if k not in ("seq", "prev_hash", "hash")}
    forged["_id"] = "forged-in-2"
    await db.audit_events.insert_one(forged)
    found = problem_of(await verify(db, keys), "inserted")
    assert (found["partition"], found["id"]) == ("2", "forged-in-2")
    # A record claiming a partition that does not exist is caught too.
    await db.audit_events.delete_one({"_id": "forged-in-2"})
    await db.audit_events.insert_one({**forged, "_id": "forged-in-9", "partition": "9", "seq": 1})
    found = problem_of(await verify(db, keys), "inserted")
    assert (found["partition"], found["id"]) == ("9", "forged-in-9")


async def cut_tail(db: Any, name: str, keep: int) -> None:
    """What someone with write access to the datastore does to hide the newest records: delete
    them and rewind the head, so the chain that is left is whole."""
    await db.audit_events.delete_many({"partition": name, "seq": {"$gt": keep}})
    kept = await db.audit_events.find_one({"partition": name, "seq": keep})
    await db.audit_chain.update_one({"_id": f"partition:{name}"},
                                    {"$set": {"seq": keep, "hash": kept["hash"]}})


async def test_a_tail_cut_behind_a_checkpoint_is_reported(db: Any) -> None:
    keys = await keyring(db)
    replicas = await two_replicas(db)
    await checkpoints.write(db, keys, ISSUER, 5.0)
    await replicas[0].append(record("after-checkpoint"))
    await cut_tail(db, "1", 21)  # only the record written after the checkpoint: undetectable
    assert (await verify(db, keys))["ok"] is True
    await cut_tail(db, "1", 16)
    found = problem_of(await verify(db, keys), "truncated")
    assert (found["partition"], found["seq"]) == ("1", 17)
    assert "#16" in found["detail"] and "#20" in found["detail"] and found["checkpoint"]


async def test_without_a_checkpoint_a_cut_tail_goes_unseen(db: Any) -> None:
    """Why checkpoints exist: the same cut on a trail never checkpointed verifies clean."""
    keys = await keyring(db)
    await two_replicas(db)
    await cut_tail(db, "1", 16)
    assert (await verify(db, keys))["ok"] is True


async def test_a_tail_rewritten_with_recomputed_hashes_diverges_from_the_checkpoint(db: Any) -> None:
    keys = await keyring(db)
    await two_replicas(db)
    await checkpoints.write(db, keys, ISSUER, 5.0)
    prev = (await db.audit_events.find_one({"partition": "2", "seq": 14}))["hash"]
    for seq in range(15, 21):
        doc = await db.audit_events.find_one({"partition": "2", "seq": seq})
        doc.update(status=403 if seq == 15 else doc["status"], prev_hash=prev)
        doc["hash"] = prev = chain.record_hash(doc)
        await db.audit_events.replace_one({"_id": doc["_id"]}, doc)
    await db.audit_chain.update_one({"_id": "partition:2"}, {"$set": {"hash": prev}})
    found = problem_of(await verify(db, keys), "diverged")
    assert (found["partition"], found["seq"]) == ("2", 20) and found["checkpoint"]


async def test_forged_checkpoints_are_reported(db: Any) -> None:
    keys = await keyring(db)
    await two_replicas(db)
    doc = await checkpoints.write(db, keys, ISSUER, 5.0)
    assert doc is not None
    # 1. The stored claims edited (a head moved back), signature left as it was.
    header, payload, signature = doc["jws"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["heads"][0]["seq"] = 2
    edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    await db.audit_checkpoints.update_one({"_id": doc["_id"]}, {"$set": {"jws": f"{header}.{edited}.{signature}"}})
    found = problem_of(await verify(db, keys), "forged-checkpoint")
    assert found["checkpoint"] == doc["_id"] and "signature" in found["detail"]
    # 2. A whole checkpoint signed with a key that is not the gateway's, under the gateway's kid.
    await db.audit_checkpoints.replace_one({"_id": doc["_id"]}, doc)
    assert (await verify(db, keys))["ok"] is True
    kid = json.loads(base64.urlsafe_b64decode(header + "=="))["kid"]
    intruder = RSAKey.generate_key(2048, parameters={"kid": kid})
    fake = jwt.encode({"alg": "RS256", "kid": kid, "typ": checkpoints.TYP},
                      {"iss": ISSUER, "iat": 1, "heads": [{"partition": "1", "seq": 99, "hash": "f" * 64}]},
                      intruder)
    await db.audit_checkpoints.insert_one({"_id": "000000000001", "slot": 1, "jws": fake})
    found = problem_of(await verify(db, keys), "forged-checkpoint")
    assert found["checkpoint"] == "000000000001"
    assert not any(p["kind"] == "truncated" for p in (await verify(db, keys))["problems"])


async def test_a_witness_copy_catches_deleted_checkpoints(db: Any) -> None:
    keys = await keyring(db)
    await two_replicas(db)
    await checkpoints.write(db, keys, ISSUER, 5.0)
    witness = await checkpoints.export(db, keys)
    assert witness is not None
    await db.audit_checkpoints.delete_many({})
    await cut_tail(db, "2", 10)
    assert (await verify(db, keys))["ok"] is True  # the datastore alone no longer knows
    found = problem_of(await verify(db, keys, witnesses=[witness]), "truncated")
    assert (found["partition"], found["seq"]) == ("2", 11)


async def test_a_single_chain_trail_is_read_as_the_legacy_partition(db: Any) -> None:
    """Records written before partitioning (no `partition`, head `{_id: "head"}`, as the old
    gateway wrote them) verify as one partition, checkpoint, and are followed by new ones."""
    prev = chain.GENESIS
    for seq in range(1, 6):
        old = {**record(f"old{seq}"), "seq": seq, "prev_hash": prev, "chain": "sha256"}
        old["hash"] = prev = chain.record_hash(old)
        await db.audit_events.insert_one(old)
    await db.audit_chain.insert_one({"_id": "head", "seq": 5, "hash": prev})
    keys = await keyring(db)
    writer = chain.AuditChain(db)
    await writer.append(record("new1"), record("new2"))
    await checkpoints.write(db, keys, ISSUER, 5.0)
    result = await verify(db, keys)
    assert result == {"ok": True, "checked": 7, "checkpoints": 1, "partitions": [
        {"partition": "legacy", "checked": 5}, {"partition": "1", "checked": 2}]}
    await db.audit_events.update_one({"_id": "old3"}, {"$set": {"status": 500}})
    found = problem_of(await verify(db, keys), "altered")
    assert (found["partition"], found["seq"], found["id"]) == ("legacy", 3, "old3")
    await db.audit_events.update_one({"_id": "old3"}, {"$set": {"status": 200}})
    await db.audit_events.delete_many({"_id": {"$in": ["old4", "old5"]}})
    await db.audit_chain.update_one({"_id": "head"}, {"$set": {"seq": 3}})
    found = problem_of(await verify(db, keys), "truncated")
    assert (found["partition"], found["seq"]) == ("legacy", 4)


async def test_a_batch_whose_reply_was_lost_is_stored_once(db: Any) -> None:
    """Audit links are plain `insert` commands (no retryable-write bookkeeping on the server):
    after a lost reply the batch is sent again, and the records the first send stored are
    recognised by `_id` and hash, never stored twice and never taken for a lost race."""
    conflicts = chain.CONFLICTS._value.get()
    flaky = DropsReplies(db)
    writer = chain.AuditChain(flaky, holder="replica-a")
    await writer.append(record("first"), record("second"), record("third"))
    await writer.append(record("fourth"))
    assert flaky.dropped == 1
    stored = await db.audit_events.find({}, {"_id": 1, "seq": 1}).sort("seq", 1).to_list()
    assert [(r["_id"], r["seq"]) for r in stored] == [("first", 1), ("second", 2), ("third", 3), ("fourth", 4)]
    assert chain.CONFLICTS._value.get() == conflicts
    keys = await keyring(db)
    assert (await verify(db, keys))["ok"] is True


async def test_a_position_another_writer_holds_is_a_lost_race_and_the_batch_moves_on(db: Any) -> None:
    """Another writer's record at the batch's position (a lease that lapsed while its holder
    stalled): the batch goes after it, and the chain verifies."""
    writer = chain.AuditChain(db, holder="replica-a")
    await writer.append(record("a1"))
    partition = writer.partition
    assert partition is not None
    seq, digest = await chain.current_head(db, partition)
    other = {**record("other"), "partition": partition.field, "seq": seq + 1, "prev_hash": digest,
             "chain": "sha256"}
    # The writer knows its last link and reads nothing before its next batch: it meets `other`.
    await db.audit_events.insert_one({**other, "hash": chain.record_hash(other)})
    conflicts = chain.CONFLICTS._value.get()
    await writer.append(record("a2"), record("a3"))
    assert chain.CONFLICTS._value.get() == conflicts + 1
    stored = await db.audit_events.find({}, {"_id": 1, "seq": 1}).sort("seq", 1).to_list()
    assert [r["_id"] for r in stored] == ["a1", "other", "a2", "a3"]
    keys = await keyring(db)
    assert (await verify(db, keys))["ok"] is True
