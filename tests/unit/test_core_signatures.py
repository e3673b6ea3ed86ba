"""mindchart_core.signatures: RFC 8785 canonical bytes and detached JWS sign/verify."""

from __future__ import annotations

import pytest

from mindchart_core import signatures


def test_canonical_form_follows_rfc8785_example() -> None:
    # RFC 8785 §3.2.3 sorting example (UTF-16 code unit order) and §3.2.2.3 numbers.
    assert signatures.canonical(b'{"b": 2, "a": 1.0, "\\u20ac": "x", "c": [1E30, 4.50, 2e-3]}') == (
        '{"a":1,"b":2,"c":[1e+30,4.5,0.002],"\u20ac":"x"}'.encode())
    assert signatures.canonical({"z": None, "y": "\u00e9"}) == b'{"y":"\xc3\xa9","z":null}'


def test_detached_signature_verifies_only_over_the_same_bytes() -> None:
    key = signatures.generate_key()
    payload = signatures.canonical({"resourceType": "DocumentReference", "id": "n1"})
    signed = signatures.sign_detached(payload, key, header={"typ": "JOSE"})
    _, body, _ = signed.split(".")
    assert body == ""  # RFC 7515 Appendix F: the payload travels separately
    header = signatures.verify_detached(signed, payload, [key])
    assert header["kid"] == key.kid and header["alg"] == "ES256"
    with pytest.raises(signatures.SignatureInvalid):
        signatures.verify_detached(signed, payload.replace(b"n1", b"n2"), [key])
    with pytest.raises(signatures.SignatureInvalid):
        signatures.verify_detached(signed, payload, [signatures.generate_key()])
    with pytest.raises(signatures.SignatureInvalid):
        signatures.verify_detached("not-a-jws", payload, [key])


def test_published_key_set_holds_no_private_part() -> None:
    key = signatures.generate_key()
    (published,) = signatures.public_jwks([key])["keys"]
    assert "d" not in published and published["kid"] == key.kid and published["use"] == "sig"
