"""Wallet key files: encrypted Ethereum keystores (eth-account), written with mode 0600.

The private key only ever exists decrypted in memory, inside the ``LocalAccount`` that
:func:`load_keyfile` returns; nothing here logs or prints it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from dht.errors import GPUFlexError


class WalletError(GPUFlexError):
    """A key file is missing, unreadable or would be overwritten."""


class WrongPassword(WalletError):
    """The password does not decrypt this key file."""


def create_keyfile(
    path: str | os.PathLike,
    password: str,
    *,
    private_key: bytes | str | None = None,
    kdf: str = "scrypt",
    iterations: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write a new (or the given) key to ``path`` as an encrypted keystore; return its address.

    ``kdf``/``iterations`` go to ``Account.encrypt`` (scrypt with eth-account's strong default
    by default; tests may pass a cheap ``iterations``). The file is created 0600, never
    world-readable, and an existing file is kept unless ``overwrite``.
    """
    path = Path(path)
    account = Account.from_key(private_key) if private_key is not None else Account.create()
    keystore = Account.encrypt(account.key, password, kdf=kdf, iterations=iterations)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o600)
    except FileExistsError as e:
        raise WalletError(f"{path} already exists; not overwriting a key file") from e
    except OSError as e:
        raise WalletError(f"cannot write key file {path}: {e.strerror}") from e
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an overwritten file keeps no looser mode
        json.dump(keystore, f)
    return account.address


def keyfile_address(path: str | os.PathLike) -> str:
    """The address a key file holds, read without its password."""
    data = _read(Path(path))
    if "address" not in data:
        raise WalletError(f"{path} names no address")
    return to_checksum_address(data["address"])


def load_keyfile(path: str | os.PathLike, password: str) -> LocalAccount:
    """Decrypt a key file. Raises ``WrongPassword`` or ``WalletError``."""
    data = _read(Path(path))
    try:
        key = Account.decrypt(data, password)
    except ValueError as e:
        if "MAC mismatch" in str(e):
            raise WrongPassword(f"wrong password for key file {path}") from None
        raise WalletError(f"{path} is not a valid keystore: {e}") from None
    return Account.from_key(key)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WalletError(f"no key file at {path}") from None
    except (OSError, ValueError) as e:
        raise WalletError(f"cannot read key file {path}: {e}") from None
    if not isinstance(data, dict) or "crypto" not in data and "Crypto" not in data:
        raise WalletError(f"{path} is not an Ethereum keystore")
    return data
