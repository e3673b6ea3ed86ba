"""mindchart_core.keyfiles and .sealing: the one loader and the one AES-GCM seal every service
uses for its key files (gateway, records, psychnotes)."""

from __future__ import annotations

import base64
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mindchart_core import keyfiles, sealing


def test_a_generated_key_file_is_0600_and_read_back_as_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "client.pem"
    key = keyfiles.ec_key(path, curve="P-384", alg="ES384", create=True, what="client key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.kid == key.thumbprint() and key.is_private
    again = keyfiles.ec_key(path, curve="P-384", alg="ES384", create=True, what="client key")
    assert again.as_dict(private=True) == key.as_dict(private=True)
    assert [p.name for p in path.parent.iterdir()] == ["client.pem"]  # no draft left behind


def test_the_wrong_curve_or_a_missing_file_is_a_clear_refusal(tmp_path: Path) -> None:
    path = tmp_path / "p256.pem"
    keyfiles.ec_key(path, curve="P-256", alg="ES256", create=True, what="signing key")
    with pytest.raises(keyfiles.KeyFileError, match="private EC P-384"):
        keyfiles.ec_key(path, curve="P-384", alg="ES384", create=False, what="client key")
    with pytest.raises(keyfiles.KeyFileError, match=r"^MINDCHART_X_KEY_FILE \(.*absent.pem\): no such file$"):
        keyfiles.ec_key(tmp_path / "absent.pem", curve="P-384", alg="ES384", create=False,
                        what="client key", setting="MINDCHART_X_KEY_FILE")


def test_racing_creators_agree_on_one_kek(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    with ThreadPoolExecutor(8) as pool:
        keks = set(pool.map(lambda _: keyfiles.kek(path, create=True), range(16)))
    assert len(keks) == 1 and len(next(iter(keks))) == 32


def test_a_kek_file_must_hold_exactly_32_bytes(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_text(base64.b64encode(b"x" * 16).decode())
    with pytest.raises(keyfiles.KeyFileError, match="exactly 32 bytes"):
        keyfiles.read_kek(path)


def test_a_seal_opens_only_with_its_key_and_associated_data() -> None:
    key = sealing.new_key()
    nonce, sealed = sealing.seal(key, b"private", b"kid-1")
    assert sealing.open_sealed(key, nonce, sealed, b"kid-1") == b"private"
    assert b"private" not in sealed
    for wrong_key, aad in ((sealing.new_key(), b"kid-1"), (key, b"kid-2")):
        with pytest.raises(sealing.SealError):
            sealing.open_sealed(wrong_key, nonce, sealed, aad)
