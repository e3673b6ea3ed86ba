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


def _before_orjson(record: dict[str, object]) -> bytes:
    """The canonical form as the chain wrote it before orjson: what stored records hash to."""
    import json
    return json.dumps(chain._canonical_value(record), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def test_canonical_form_is_byte_identical_to_the_one_stored_chains_were_hashed_with() -> None:
    """Records written before the orjson fast path must still verify: the same bytes for every
    shape the gateway writes (a proxied read, a refusal, a disclosure), non-ASCII text (a query
    decoded as latin-1, a name), BSON's naive datetimes, and floats of every size."""
    from gateway import audit
    scope = {"type": "http", "method": "GET", "path": "/fhir/DocumentReference/n-1",
             "query_string": "name=Zoë&_count=5".encode("latin-1"), "client": ("10.0.0.7", 5000),
             "state": {"request_id": "r-1", "caller": {
                 "client_id": "app", "subject": "u1", "fhir_user": "https://x/fhir/Practitioner/p1",
                 "jti": "j1", "patient": "Patient/p-1", "purpose_of_use": ["TREAT"]}}}
    shapes = [audit.build_record(scope, 200, 3.14159, "http://gw"),
              audit.build_record({**scope, "state": {"request_id": "r-2", "refusal": "no"}}, 401,
                                 0.0, "http://gw"),
              {"recorded": datetime(2026, 1, 2, 3, 4, 5, 6000), "name": "Åsa", "n": [1, 2.5, None]}]
    shapes += [{"latency_ms": value, "seq": 1, "ok": True}
               for value in (0.0, 0.01, 12.34, 99999.99, 1e-5, 1e15, 1e20, float("nan"), float("inf"))]
    shapes.append({"latency_ms": 2.0, "event": {"agent": [{"who": {"display": "\u00e9\u4e2d"}}]}})
    for record in shapes:
        assert chain.canonical_json(record) == _before_orjson(record), record
