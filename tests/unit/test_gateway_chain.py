"""The audit chain's hashing (gateway.chain): canonical, stable across a datastore round trip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from gateway import chain


def test_hash_covers_every_field_but_itself() -> None:
    record = {"_id": "a", "seq": 3, "prev_hash": "0" * 64, "status": 200,
              "recorded": datetime(2026, 11, 22, 10, 0, 0, 123000, tzinfo=UTC), "event": {"outcome": "0"}}
    digest = chain.record_hash(record)
    assert chain.record_hash({**record, "hash": "anything"}) == digest
    for change in ({"status": 403}, {"seq": 4}, {"prev_hash": "1" * 64}, {"event": {"outcome": "4"}},
                   {"recorded": record["recorded"] + timedelta(milliseconds=1)}):
        assert chain.record_hash({**record, **change}) != digest


def test_hash_is_stable_across_bson_datetimes() -> None:
    """BSON keeps milliseconds and may return naive or other-zone datetimes: same hash."""
    moment = chain.truncate_to_millis(datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC))
    assert moment.microsecond == 123000
    record = {"recorded": moment, "k": [1, "x", {"b": 2, "a": 1}]}
    naive = {"recorded": moment.replace(tzinfo=None), "k": [1, "x", {"a": 1, "b": 2}]}
    shifted = {"recorded": moment.astimezone(timezone(timedelta(hours=5))), "k": record["k"]}
    assert chain.record_hash(record) == chain.record_hash(naive) == chain.record_hash(shifted)


def test_keyed_hash_needs_the_key() -> None:
    record = {"_id": "a", "seq": 1, "prev_hash": chain.GENESIS, "chain": "hmac-sha256"}
    keyed = chain.record_hash(record, b"secret kept outside the datastore")
    assert keyed != chain.record_hash(record) != chain.record_hash(record, b"another key")
    assert keyed == chain.record_hash(record, b"secret kept outside the datastore")
