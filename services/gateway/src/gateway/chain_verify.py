"""`mindchart audit verify`: walk every partition of the audit trail from its first link, check every
checkpoint's signature, and check that each partition still extends every checkpoint.

Reported per partition, each with its position: a record that no longer matches its hash
(`altered`), a gap (`removed`), a record that is not a link (`inserted`), a link that does not
follow the one before (`relinked`), a partition cut back behind a signed checkpoint (`truncated`),
a link that is not the one a checkpoint signed (`diverged`, e.g. a tail rewritten with
recomputed hashes), and a checkpoint whose signature no gateway key verifies (`forged-checkpoint`).
A tail written after the newest checkpoint can still be cut without a trace; a checkpoint
deleted from the datastore is caught only against a copy an outside witness kept
(`mindchart audit checkpoint --export`, given back as `--witness FILE`).

Every read is an IXSCAN on the (partition, seq) index: a window of positions at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from joserfc.jwk import KeySet

from gateway import chain, checkpoints, partitions, store
from gateway.keys import Keyring


@dataclass
class Problem:
    partition: str | None
    seq: int | None
    record_id: str | None
    kind: str
    detail: str
    checkpoint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        found = {"partition": self.partition, "seq": self.seq, "id": self.record_id,
                 "kind": self.kind, "detail": self.detail}
        if self.checkpoint is not None:
            found["checkpoint"] = self.checkpoint
        return found


@dataclass
class _Signed:
    """What the valid checkpoints say about one partition: hash per position, and the furthest."""

    at: dict[int, tuple[str, str]] = field(default_factory=dict)  # seq -> (hash, checkpoint id)
    furthest: tuple[int, str] = (0, "")


def _checkpoint_heads(sources: list[dict[str, Any]], keyset: KeySet,
                      problems: list[Problem]) -> tuple[dict[str, _Signed], int]:
    signed: dict[str, _Signed] = {}
    valid = 0
    for source in sources:
        name = str(source.get("_id") or source.get("checkpoint") or "?")
        try:
            claims = checkpoints.read(str(source.get("jws", "")), keyset)
        except ValueError as exc:
            problems.append(Problem(None, None, None, "forged-checkpoint",
                                    f"checkpoint {name} is not the gateway's: {exc}", checkpoint=name))
            continue
        valid += 1
        for head in claims["heads"]:
            entry = signed.setdefault(head["partition"], _Signed())
            entry.at[int(head["seq"])] = (str(head["hash"]), name)
            if head["seq"] > entry.furthest[0]:
                entry.furthest = (int(head["seq"]), name)
    return signed, valid


async def _walk(db: store.Db, partition: partitions.Partition, head_seq: int, key: bytes | None,
                signed: _Signed, page: int) -> tuple[int, Problem | None]:
    """Links checked, and the first problem of one partition."""
    name = partition.name
    expected_prev, checked = chain.GENESIS, 0
    seen_keyed = last_keyed = False
    position, ended = 0, False
    while not ended:
        batch = {int(r["seq"]): r async for r in db.audit_events.find(
            partition.records({"$gt": position, "$lte": position + page}))}
        for seq in range(position + 1, position + page + 1):
            record = batch.get(seq)
            if record is None:
                if seq <= head_seq:
                    return checked, Problem(name, seq, None, "removed",
                                            f"partition {name}: record #{seq} is missing: "
                                            f"the chain has a gap after #{seq - 1}")
                ended = True
                break
            ident = str(record["_id"])
            keyed = record.get("chain") == "hmac-sha256"
            if keyed and not key:
                return checked, Problem(name, seq, ident, "unverifiable",
                                        f"partition {name}: record #{seq} is keyed: give verify the "
                                        "chain key (MINDCHART_GATEWAY_AUDIT_CHAIN_KEY_FILE)")
            if key and not keyed and seen_keyed:
                # Once keyed, always keyed: an unkeyed link after a keyed one was recomputed by hand.
                return checked, Problem(name, seq, ident, "altered",
                                        f"partition {name}: record #{seq} ({ident}) lost its key "
                                        "(downgraded link)")
            seen_keyed, last_keyed = seen_keyed or keyed, keyed
            if record.get("hash") != chain.record_hash(record, key if keyed else None):
                return checked, Problem(name, seq, ident, "altered",
                                        f"partition {name}: record #{seq} ({ident}) does not match its hash")
            if record.get("prev_hash") != expected_prev:
                return checked, Problem(name, seq, ident, "relinked",
                                        f"partition {name}: record #{seq} ({ident}) does not "
                                        f"follow #{seq - 1}")
            if seq in signed.at and signed.at[seq][0] != record["hash"]:
                checkpoint = signed.at[seq][1]
                return checked, Problem(name, seq, ident, "diverged",
                                        f"partition {name}: record #{seq} ({ident}) is not the link "
                                        f"checkpoint {checkpoint} signed", checkpoint=checkpoint)
            expected_prev = str(record["hash"])
            checked += 1
        position += page
    furthest, checkpoint = signed.furthest
    if furthest > checked:
        return checked, Problem(name, checked + 1, None, "truncated",
                                f"partition {name} ends at #{checked} but checkpoint {checkpoint} "
                                f"signed its head at #{furthest}: records #{checked + 1} to #{furthest} "
                                "are gone", checkpoint=checkpoint)
    stray = (await db.audit_events.find_one(partition.records({"$gt": checked}))
             or await db.audit_events.find_one(partition.records(None)))
    if stray is not None:
        return checked, Problem(name, stray.get("seq"), str(stray["_id"]), "inserted",
                                f"partition {name}: record {stray['_id']} is not a link of the chain")
    if key and checked and not last_keyed:
        return checked, Problem(name, checked, None, "altered",
                                f"partition {name}: the newest records are not keyed although the "
                                "gateway writes keyed links")
    if head_seq > checked:
        return checked, Problem(name, head_seq, None, "removed",
                                f"partition {name}: the chain ends at #{checked} but its head "
                                f"says #{head_seq}")
    return checked, None


async def _strays_elsewhere(db: store.Db, known: set[str]) -> Problem | None:
    """A record in no known partition (looked for only when the count says there is one)."""
    fields = [None if n == partitions.LEGACY else n for n in known]
    async for record in db.audit_events.find({"partition": {"$nin": fields}}):
        name = str(record.get("partition"))
        if await db.audit_chain.find_one({"_id": partitions.Partition(name).head_id}) is not None:
            continue  # a replica started a partition while verify ran
        return Problem(name, record.get("seq"), str(record["_id"]), "inserted",
                       f"record {record['_id']} names partition {name!r}, which does not exist")
    return None


async def verify(db: store.Db, *, keyset: KeySet | None = None, key: bytes | None = None,
                 witnesses: list[dict[str, Any]] | None = None, page: int = 1000) -> dict[str, Any]:
    """Check the whole trail; `ok` is False with every partition's first problem listed.
    Checkpoint signatures are checked against `keyset`, by default the gateway's own keys."""
    problems: list[Problem] = []
    if keyset is None:
        keyset = await Keyring(db).keyset(refresh=True)
    sources = await checkpoints.all_checkpoints(db) + list(witnesses or [])
    signed, valid = _checkpoint_heads(sources, keyset, problems)
    heads = {partitions.of_head(d).name: int(d["seq"]) for d in await partitions.heads(db)}
    names = sorted({partitions.LEGACY, *heads, *signed},
                   key=lambda n: (n != partitions.LEGACY, len(n), n))
    summary, total = [], 0
    for name in names:
        checked, problem = await _walk(db, partitions.Partition(name), heads.get(name, 0), key,
                                       signed.get(name, _Signed()), page)
        total += checked
        if problem is not None:
            problems.append(problem)
        if checked or name != partitions.LEGACY or problem is not None:
            summary.append({"partition": name, "checked": checked})
    if not problems and await db.audit_events.count_documents({}) > total:
        stray = await _strays_elsewhere(db, set(names))
        if stray is not None:
            problems.append(stray)
    result: dict[str, Any] = {"ok": not problems, "checked": total, "partitions": summary,
                              "checkpoints": valid}
    if problems:
        result["first_problem"] = problems[0].as_dict()
        result["problems"] = [p.as_dict() for p in problems]
    return result
