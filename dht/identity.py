"""A peer's persistent identity: one RSA key in the peer's data dir.

The same key is the libp2p identity (so the peer id is derived from it) and the key that signs
every DHT record the peer writes (hivemind's ``RSASignatureValidator``). Because the peer id is
a hash of the public key, a reader can check that a record claiming to come from peer X was
signed by X's key — see :func:`peer_id_of`.

The key never leaves the file: it is created with mode 0400 and only its public half is ever
published.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from dht.errors import GPUFlexError

IDENTITY_FILE = "identity.key"


class IdentityError(GPUFlexError):
    """The identity file is missing, unreadable or not an RSA key."""


@dataclass(frozen=True)
class Identity:
    path: Path
    signing_key: RSAPrivateKey

    @property
    def owner_marker(self) -> bytes:
        """The ``[owner:...]`` tag that marks a DHT subkey as writable only by this key."""
        return RSASignatureValidator(self.signing_key).local_public_key

    @property
    def peer_id(self) -> PeerID:
        return peer_id_of(self.signing_key.get_public_key())


def load_or_create_identity(data_dir: str | os.PathLike) -> Identity:
    """Load ``<data_dir>/identity.key``, creating the directory and a fresh key on first start."""
    data_dir = Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / IDENTITY_FILE
    if not path.exists():
        P2P.generate_identity(str(path))  # hivemind writes a libp2p RSA key with mode 0400
    try:
        der = crypto_pb2.PrivateKey.FromString(path.read_bytes()).data
        key = serialization.load_der_private_key(der, password=None)
    except (OSError, ValueError) as e:
        raise IdentityError(f"{path}: not a readable peer identity key ({e.__class__.__name__})") from None
    signing_key = RSAPrivateKey.__new__(RSAPrivateKey)  # wrap the loaded key instead of generating one
    signing_key.__setstate__({"_private_key": key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )})
    return Identity(path=path, signing_key=signing_key)


def peer_id_of(public_key: RSAPublicKey) -> PeerID:
    """The libp2p peer id of an RSA public key (same derivation as ``PeerID.from_identity``)."""
    der = public_key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))


def public_key_from_marker(subkey: bytes) -> RSAPublicKey | None:
    """The RSA public key named by an ``[owner:...]`` tag inside a subkey, or None."""
    found = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey)
    if len(set(found)) != 1:
        return None
    try:
        return RSAPublicKey.from_bytes(found[0])
    except ValueError:
        return None
