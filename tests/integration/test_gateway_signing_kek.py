"""The gateway's signing keys at rest (issue 12, "Also found"): sealed under the KEK, so read
access to the gateway datastore is not enough to forge a token. Real datastore (SecantusDB)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import RSAKey

from gateway import admin, keys, store
from mindchart_core import sealing
from tests.integration.conftest import fresh_database


@pytest.fixture
async def db(mongo_url: str) -> AsyncIterator[Any]:
    async with fresh_database(mongo_url, "signing_kek") as database:
        await store.ensure_indexes(database)
        yield database


def b64url_int(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def assert_no_private_material(raw: Any, private: dict[str, Any]) -> None:
    """No field of the stored document is, contains or decodes to a private RSA parameter."""
    blob = repr(raw).encode()
    for name in ("d", "p", "q", "dp", "dq", "qi"):
        value = private[name]
        assert value.encode() not in blob
        assert b64url_int(value) not in blob
        assert b64url_int(value).hex().encode() not in blob
    assert "jwk" not in raw and "d" not in raw.get("public", {})


async def test_a_stored_key_holds_no_private_material_and_signs_across_restarts(db: Any) -> None:
    kek = sealing.new_key()
    keyring = keys.Keyring(db, kek)
    await keyring.ensure_key()
    token = await keyring.sign({"sub": "someone"})
    [raw] = await db.signing_keys.find({}).to_list()
    private = keys.open_private_jwk(kek, raw)  # what the gateway itself can open
    assert_no_private_material(raw, private)
    assert raw["public"]["kid"] == raw["_id"] and raw["sealed"]["kek"] == keys.kek_id(kek)
    # A reader of the datastore holds only the public key: verifying works, forging does not.
    public = RSAKey.import_key(raw["public"])
    assert not public.is_private
    jwt.decode(token, public)
    # "Restart": a new keyring on the same datastore and KEK signs with the same key, and the
    # public set another keyring publishes verifies the old token.
    again = keys.Keyring(db, kek)
    await again.ensure_key()
    assert await db.signing_keys.count_documents({}) == 1
    later = await again.sign({"sub": "later"})
    verifier = await keys.Keyring(db).keyset(refresh=True)  # verify-only: no KEK
    assert jwt.decode(token, verifier).claims["sub"] == "someone"
    assert jwt.decode(later, verifier).claims["sub"] == "later"
    with pytest.raises(keys.KeyConfigError):
        await keys.Keyring(db).sign({"sub": "forged"})


async def test_a_wrong_kek_is_refused_by_name(db: Any) -> None:
    kek, other = sealing.new_key(), sealing.new_key()
    await keys.Keyring(db, kek).ensure_key()
    with pytest.raises(keys.KeyConfigError) as refused:
        await keys.Keyring(db, other).ensure_key()
    message = str(refused.value)
    assert keys.kek_id(kek) in message and keys.kek_id(other) in message
    assert "MINDCHART_GATEWAY_SIGNING_KEK_FILE" in message


async def test_a_sealed_key_moved_onto_another_kid_does_not_open(db: Any) -> None:
    kek = sealing.new_key()
    await keys.Keyring(db, kek).ensure_key()
    [raw] = await db.signing_keys.find({}).to_list()
    await db.signing_keys.insert_one({**raw, "_id": "attacker-kid"})
    with pytest.raises(keys.KeyConfigError):
        keys.open_private_jwk(kek, {**raw, "_id": "attacker-kid"})


async def test_a_legacy_clear_key_is_sealed_on_first_load(db: Any) -> None:
    kid, private = keys.new_private_jwk()
    await db.signing_keys.insert_one({"_id": kid, "jwk": private, "created": datetime.now(UTC),
                                      "retired": False})  # as stored before the KEK
    old_token = jwt.encode({"alg": "RS256", "kid": kid}, {"sub": "before"}, RSAKey.import_key(private))
    kek = sealing.new_key()
    keyring = keys.Keyring(db, kek)
    await keyring.ensure_key()
    raw = await db.signing_keys.find_one({"_id": kid})
    assert_no_private_material(raw, private)
    assert keys.open_private_jwk(kek, raw) == private
    assert await db.signing_keys.count_documents({}) == 1  # the same key, not a new one
    verifier = await keys.Keyring(db).keyset(refresh=True)
    assert jwt.decode(old_token, verifier).claims["sub"] == "before"
    assert jwt.decode(await keyring.sign({"sub": "after"}), verifier).header["kid"] == kid


async def test_rotation_seals_the_new_key_and_both_verify(db: Any) -> None:
    kek = sealing.new_key()
    keyring = keys.Keyring(db, kek)
    await keyring.ensure_key()
    before = await keyring.sign({"sub": "before"})
    rotated = await admin.rotate_signing_key(db, kek)
    assert len(rotated["published"]) == 2
    await keyring.load(force=True)
    after = await keyring.sign({"sub": "after"})
    assert jwt.decode(after, await keyring.keyset()).header["kid"] == rotated["kid"]
    for raw in await db.signing_keys.find({}).to_list():
        assert_no_private_material(raw, keys.open_private_jwk(kek, raw))
    verifier = await keys.Keyring(db).keyset(refresh=True)
    for token in (before, after):
        jwt.decode(token, verifier)
    stranger = RSAKey.generate_key(2048, parameters={"kid": rotated["kid"]})
    forged = jwt.encode({"alg": "RS256", "kid": rotated["kid"]}, {"sub": "x"}, stranger)
    with pytest.raises(BadSignatureError):
        jwt.decode(forged, verifier)


# -- KEK rotation: MINDCHART_GATEWAY_SIGNING_PREVIOUS_KEK_FILES and keys.reseal ------------------

def rotated(new: bytes, *old: bytes) -> keys.Keks:
    ids = {keys.kek_id(k): k for k in (new, *old)}
    return keys.Keks(current_id=keys.kek_id(new), keks=ids)


async def test_a_rotated_kek_reseals_every_key_and_the_old_kek_alone_no_longer_opens_them(
        db: Any) -> None:
    old, new = sealing.new_key(), sealing.new_key()
    before_keyring = keys.Keyring(db, old)
    await before_keyring.ensure_key()
    await admin.rotate_signing_key(db, old)  # two keys under the old KEK
    await db.signing_keys.update_one({}, {"$set": {"retired": True}})  # one of them retired
    before = await keys.Keyring(db, old).sign({"sub": "before"})
    status = await keys.kek_status(db, rotated(new, old))
    assert list(status["previous_keks_still_needed"]) == [keys.kek_id(old)]
    assert len(status["previous_keks_still_needed"][keys.kek_id(old)]) == 2
    keyring = keys.Keyring(db, rotated(new, old))
    await keyring.ensure_key()
    stored = await db.signing_keys.find({}).to_list()
    assert len(stored) == 2 and {d["sealed"]["kek"] for d in stored} == {keys.kek_id(new)}
    for doc in stored:  # the retired key too, so the old file can really go
        assert_no_private_material(doc, keys.open_private_jwk(new, doc))
        with pytest.raises(keys.KeyConfigError):
            keys.open_private_jwk(old, doc)
    verifier = await keys.Keyring(db).keyset(refresh=True)
    assert jwt.decode(before, verifier).claims["sub"] == "before"  # same key, only re-sealed
    assert jwt.decode(await keyring.sign({"sub": "after"}), verifier).header["kid"] == \
        jwt.decode(before, verifier).header["kid"]
    status = await keys.kek_status(db, rotated(new, old))
    assert status["previous_keks_still_needed"] == {} and status["not_under_current_kek"] == []
    with pytest.raises(keys.KeyConfigError) as refused:  # only the old KEK: refused by name
        await keys.Keyring(db, old).ensure_key()
    assert keys.kek_id(new) in str(refused.value) and "PREVIOUS_KEK_FILES" in str(refused.value)
    assert await keys.reseal(db, rotated(new, old)) == 0  # idempotent: nothing left to do


async def test_replicas_resealing_at_once_each_key_is_resealed_once_and_no_seal_is_overwritten(
        db: Any) -> None:
    old = sealing.new_key()
    for _ in range(3):
        await keys.add_key(db, old)
    # Two replicas with the same configuration, started at once: between them every key is
    # re-sealed exactly once (the second write of a key matches no ciphertext).
    same = rotated(sealing.new_key(), old)
    counts = await asyncio.gather(*(keys.reseal(db, same) for _ in range(2)))
    assert sum(counts) == 3, counts
    assert {d["sealed"]["kek"] for d in await db.signing_keys.find({}).to_list()} == {same.current_id}
    # A replica misconfigured with yet another KEK racing a correct one cannot take keys away:
    # whichever seal landed first stays, and the loser's keyring then refuses to start.
    newer, stray = sealing.new_key(), sealing.new_key()
    first, second = rotated(newer, same.current), rotated(stray, same.current)
    counts = await asyncio.gather(keys.reseal(db, first), keys.reseal(db, second))
    assert sum(counts) == 3, counts
    sealed_under = [d["sealed"]["kek"] for d in await db.signing_keys.find({}).to_list()]
    for doc in await db.signing_keys.find({}).to_list():
        ring = first if doc["sealed"]["kek"] == first.current_id else second
        keys.open_sealed_key(ring, doc)  # every seal opens with the KEK it names
    assert set(sealed_under) <= {first.current_id, second.current_id}
