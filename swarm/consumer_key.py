"""The consumer's own signing key (Ed25519): it names who submitted a job, and only that key may
rate it. Created on first submit, kept in one file (mode 0600) that nothing ever sends anywhere;
the job record carries only its public half.

``~/.gpuflex/consumer.key`` by default; ``$GPUFLEX_CONSUMER_KEY`` or ``--consumer-key`` pick another.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from dht.errors import GPUFlexError


class ConsumerKeyError(GPUFlexError):
    """The consumer key file is missing, unreadable or not an Ed25519 key."""


def consumer_key_path(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("GPUFLEX_CONSUMER_KEY") or "~/.gpuflex/consumer.key").expanduser()


def load_consumer_key(path: str | os.PathLike | None = None) -> Ed25519PrivateKey:
    where = consumer_key_path(path)
    try:
        key = load_pem_private_key(where.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConsumerKeyError(f"no consumer key at {where} (it is made when you submit a job)") from None
    except (OSError, ValueError, TypeError) as e:
        raise ConsumerKeyError(f"{where}: not a readable consumer key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConsumerKeyError(f"{where}: not an Ed25519 key")
    return key


def load_or_create_consumer_key(path: str | os.PathLike | None = None) -> Ed25519PrivateKey:
    where = consumer_key_path(path)
    if where.exists():
        return load_consumer_key(where)
    key = Ed25519PrivateKey.generate()
    where.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key
