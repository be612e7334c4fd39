"""Encrypted key files."""

import json
import stat

import pytest

from ledger.wallet import WalletError, WrongPassword, create_keyfile, keyfile_address, load_keyfile

pytestmark = pytest.mark.timeout(60)

CHEAP = {"kdf": "pbkdf2", "iterations": 2}  # tests only; the default is scrypt with eth-account's strong default


def test_round_trip_and_mode(tmp_path):
    path = tmp_path / "keys" / "wallet.json"
    address = create_keyfile(path, "correct horse", **CHEAP)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keyfile_address(path) == address
    assert load_keyfile(path, "correct horse").address == address
    assert "correct horse" not in path.read_text()


def test_wrong_password(tmp_path):
    path = tmp_path / "w.json"
    create_keyfile(path, "right", **CHEAP)
    with pytest.raises(WrongPassword, match="wrong password"):
        load_keyfile(path, "wrong")


def test_import_key_and_no_overwrite(tmp_path):
    path = tmp_path / "w.json"
    key = "0x" + "42" * 32
    address = create_keyfile(path, "pw", private_key=key, **CHEAP)
    with pytest.raises(WalletError, match="already exists"):
        create_keyfile(path, "pw", **CHEAP)
    assert load_keyfile(path, "pw").key.hex().removeprefix("0x") == "42" * 32
    create_keyfile(path, "pw2", overwrite=True, **CHEAP)
    assert keyfile_address(path) != address
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_default_kdf_is_scrypt(tmp_path):
    path = tmp_path / "w.json"
    create_keyfile(path, "pw", iterations=2**4)  # a cheap scrypt for speed; kdf defaults to scrypt
    assert json.loads(path.read_text())["crypto"]["kdf"] == "scrypt"
    load_keyfile(path, "pw")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(WalletError, match="no key file"):
        load_keyfile(tmp_path / "nope.json", "pw")
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(WalletError, match="not an Ethereum keystore"):
        load_keyfile(bad, "pw")
