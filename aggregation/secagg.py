"""Secure aggregation (Bonawitz et al. 2017): a group learns the sum of its members' updates, not one of them.

Pure functions, no network: the runner moves the records these functions make through the DHT
and the masked vectors through the all-reduce (reducer ``secure_sum``, which adds integers mod
2^32 and sees nothing else). The primitives are the ``cryptography`` package's X25519, HKDF,
ChaCha20 and AES-GCM, and pycryptodome's Shamir secret sharing; nothing here is home-made crypto.

One merge attempt of a roster ``U1`` (peer ids, ordered as strings):

1. **keys** — each member ``u`` draws ``MemberSecrets``: an X25519 pair ``c_u`` to encrypt shares,
   an X25519 pair ``s_u`` to mask, and a 16-byte self-mask seed ``b_u``. It publishes the public
   halves and a commitment to ``b_u`` (``PublicKeys``).
2. **shares** — ``u`` Shamir-splits ``b_u`` and ``s_u``'s private key ``threshold``-of-``|U1|`` and
   sends member ``v`` its share encrypted under a key only ``u`` and ``v`` can derive (AES-GCM over
   X25519(c_u, c_v)), bound to the attempt and to both ids (``deal_shares``).
3. **mask** — ``u`` sends ``y_u = q(x_u) + PRG(b_u) + sum_{v in U1, v != u} ±PRG(s_uv) mod 2^32``
   (``mask_input``): plus for ``v`` after ``u``, minus before it, so each pair's masks cancel in
   the sum. ``q`` is ``Quantizer``'s fixed point. Every value any other peer sees of ``y_u`` (a
   reducer sees a slice) is uniformly random on its own.
4. **sum** — the all-reduce sums ``y`` over the members ``U2`` that made it into the group.
5. **reveal** — each survivor opens the shares it holds and reveals, per member of ``U1``, *one*
   of its two: the self-mask seed's share for a survivor, the masking key's share for a member
   that dropped out (``reveal_shares``). Never both of one member, and nothing at all when fewer
   than ``threshold`` survived (``TooFewSurvivors``): then the attempt is retried with fresh secrets.
6. **unmask** — with ``threshold`` reveals per member, anyone rebuilds the survivors' self-mask
   seeds and the dropouts' masking keys, checks each against what its owner published (a forged
   share is found, ``TamperedShare``), removes their masks and decodes the sum (``unmask_sum``).

What this protects against, and what it does not (also in the README):

- honest-but-curious peers, up to ``threshold - 1`` of them colluding, learn nothing about one
  member's update beyond what the sum itself says (with two survivors, the sum minus one's own
  update *is* the other's: the minimum group is therefore 3 when a job asks for privacy);
- it does not stop a member from sending garbage or a scaled update: nobody can inspect a hidden
  update, so re-execution and robust reducers cannot run. Each honest member clips its own update
  (``Quantizer`` bounds every coordinate); the decoded sum is checked against the group's bound
  (``check_sum_bound``), which catches garbage from a broken or cheating masking, not a member that
  stays inside its bound.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import msgpack
import torch
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from dht.errors import GPUFlexError

MODULUS = 2**32
SEED_BYTES = 16  # a self-mask seed: one Shamir secret (pycryptodome shares 16-byte secrets)
MAX_COMBINATIONS = 64  # share subsets tried to get past forged shares before giving up


class SecureAggregationError(GPUFlexError):
    """A secure-aggregation step could not be completed; nothing about any update was revealed."""


class TooFewSurvivors(SecureAggregationError):
    """Fewer members reached the sum than the threshold: revealing would expose a member."""


class TamperedShare(SecureAggregationError):
    """A share did not decrypt, or the shares do not rebuild what their owner committed to."""


class SumOutOfBounds(SecureAggregationError):
    """The decoded sum lies outside what the members' clipped updates can add up to."""


def threshold_for(members: int) -> int:
    """Shares needed to rebuild a secret: a strict majority, and at least 2."""
    if members < 2:
        raise ValueError(f"secure aggregation needs at least 2 members, got {members}")
    return max(2, members // 2 + 1)


# --------------------------------------------------------------------------------------------
# fixed point


@dataclass(frozen=True)
class Quantizer:
    """Real values in ``[-clip, clip]`` as integers mod 2^32, so that ``max_summands`` of them add
    up without wrapping. The step is ``clip * max_summands / 2^31``: about 1e-9 for clip 1 and 4
    members, far below what float32 training resolves, so the sum is exact for training's purposes.
    Values outside the range are clipped first (each member bounds its own input)."""

    clip: float
    max_summands: int

    def __post_init__(self):
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a finite number > 0, got {self.clip}")
        if self.max_summands < 1:
            raise ValueError(f"max_summands must be >= 1, got {self.max_summands}")

    @property
    def scale(self) -> float:
        # rounding may add half a step per summand: keep that headroom below 2^31 too
        return (2**31 - 1 - self.max_summands) / (self.clip * self.max_summands)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """int64 tensor of values in ``[0, 2^32)``."""
        clipped = values.detach().to(torch.float64).clamp(-self.clip, self.clip)
        return torch.round(clipped * self.scale).to(torch.int64) % MODULUS

    def decode(self, total: torch.Tensor) -> torch.Tensor:
        """The float64 sum behind ``total``, a sum of at most ``max_summands`` encoded values."""
        signed = torch.where(total >= 2**31, total - MODULUS, total)
        return signed.to(torch.float64) / self.scale


# --------------------------------------------------------------------------------------------
# keys and shares


@dataclass(frozen=True)
class PublicKeys:
    """What a member publishes for one attempt: two X25519 public keys, a commitment to its seed."""

    cipher_key: bytes
    mask_key: bytes
    seed_commitment: bytes


@dataclass(frozen=True)
class MemberSecrets:
    """One member's secrets for one attempt. Never leaves the peer; drawn afresh each attempt."""

    cipher_key: X25519PrivateKey
    mask_key: X25519PrivateKey
    seed: bytes

    @classmethod
    def generate(cls) -> MemberSecrets:
        return cls(X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(SEED_BYTES))

    def public(self, context: bytes) -> PublicKeys:
        return PublicKeys(_public_bytes(self.cipher_key), _public_bytes(self.mask_key),
                          seed_commitment(self.seed, context))


@dataclass(frozen=True)
class ShareBundle:
    """What member ``owner`` entrusted to one other member: a Shamir share (at ``index``) of its
    self-mask seed and of the two 16-byte halves of its masking key."""

    owner: str
    index: int
    seed_share: bytes
    key_shares: tuple[bytes, bytes]


def seed_commitment(seed: bytes, context: bytes) -> bytes:
    return hashlib.sha256(b"gpuflex-secagg-seed|" + context + b"|" + seed).digest()


def deal_shares(me: str, secrets: MemberSecrets, roster: Mapping[str, PublicKeys], threshold: int,
                context: bytes) -> dict[str, bytes]:
    """``{member: ciphertext}``: this member's seed and masking key split among ``roster`` (which
    includes ``me``; its own share is dealt too, so that it can reveal like anyone else)."""
    members = sorted(roster)
    if me not in roster:
        raise ValueError(f"{me} is not on the roster it deals shares to")
    if not 2 <= threshold <= len(members):
        raise ValueError(f"threshold must be in [2, {len(members)}], got {threshold}")
    key = secrets.mask_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    seed_shares = Shamir.split(threshold, len(members), secrets.seed)
    low_shares = Shamir.split(threshold, len(members), key[:SEED_BYTES])
    high_shares = Shamir.split(threshold, len(members), key[SEED_BYTES:])
    dealt = {}
    for position, member in enumerate(members):
        index = position + 1  # Shamir's x coordinate; the roster order fixes it for everyone
        plain = msgpack.packb([index, seed_shares[position][1], low_shares[position][1], high_shares[position][1]])
        cipher = AESGCM(_share_key(secrets.cipher_key, roster[member].cipher_key, context))
        dealt[member] = cipher.encrypt(_nonce(me, member, context), plain, _share_aad(me, member, context))
    return dealt


def open_share(me: str, secrets: MemberSecrets, owner: str, owner_keys: PublicKeys, ciphertext: bytes,
               context: bytes) -> ShareBundle:
    """The share ``owner`` dealt to ``me``; ``TamperedShare`` if it was altered or is not for us."""
    cipher = AESGCM(_share_key(secrets.cipher_key, owner_keys.cipher_key, context))
    try:
        plain = cipher.decrypt(_nonce(owner, me, context), ciphertext, _share_aad(owner, me, context))
        index, seed_share, low, high = msgpack.unpackb(plain)
    except (InvalidTag, ValueError, TypeError, msgpack.UnpackException) as e:
        raise TamperedShare(f"the share {owner} dealt to {me} does not open: {type(e).__name__}") from None
    return ShareBundle(owner, int(index), bytes(seed_share), (bytes(low), bytes(high)))


# --------------------------------------------------------------------------------------------
# masking


def mask_input(encoded: torch.Tensor, me: str, secrets: MemberSecrets, roster: Mapping[str, PublicKeys],
               context: bytes) -> torch.Tensor:
    """``y = encoded + PRG(seed) ± PRG(pair key) for every other member``, mod 2^32 (int64)."""
    size = encoded.numel()
    masked = (encoded.reshape(-1) + _prg(_seed_key(secrets.seed, context), size)) % MODULUS
    for other, keys in roster.items():
        if other == me:
            continue
        pair = _prg(_pair_key(secrets.mask_key, keys.mask_key, context), size)
        masked = (masked + pair if me < other else masked - pair) % MODULUS
    return masked.reshape(encoded.shape)


def reveal_shares(me: str, opened: Mapping[str, ShareBundle], roster: Sequence[str],
                  survivors: Sequence[str], threshold: int) -> dict[str, tuple[int, list[bytes]]]:
    """What survivor ``me`` reveals: per member, ``(index, [seed share])`` if it survived or
    ``(index, [key low share, key high share])`` if it dropped out. One or the other, never both."""
    survivors = set(survivors)
    if me not in survivors:
        raise ValueError(f"{me} is not among the survivors: it reveals nothing")
    if not survivors <= set(roster):
        raise ValueError(f"survivors {sorted(survivors - set(roster))} are not on the roster")
    if len(survivors) < threshold:
        raise TooFewSurvivors(f"{len(survivors)} of {len(roster)} members reached the sum, fewer than the "
                              f"threshold {threshold}: nothing is revealed")
    revealed = {}
    for member in roster:
        if member not in opened:
            raise SecureAggregationError(f"{me} holds no share from {member}: it cannot help remove its mask")
        bundle = opened[member]
        revealed[member] = (bundle.index, [bundle.seed_share] if member in survivors else list(bundle.key_shares))
    return revealed


def unmask_sum(total: torch.Tensor, roster: Mapping[str, PublicKeys], survivors: Sequence[str],
               reveals: Mapping[str, Mapping[str, tuple[int, list[bytes]]]], threshold: int,
               context: bytes) -> torch.Tensor:
    """The sum of the survivors' encoded inputs: ``total`` (the all-reduce's sum of their masked
    inputs) with their self masks and the dropped members' pair masks taken off (int64 mod 2^32).

    ``reveals`` is ``{revealer: reveal_shares(...)}`` from at least ``threshold`` survivors."""
    survivors = sorted(set(survivors))
    if len(survivors) < threshold:
        raise TooFewSurvivors(f"{len(survivors)} survivors, fewer than the threshold {threshold}")
    usable = {who: r for who, r in reveals.items() if who in survivors}
    if len(usable) < threshold:
        raise TooFewSurvivors(f"{len(usable)} survivors revealed, the threshold is {threshold}")
    size, flat = total.numel(), total.reshape(-1) % MODULUS
    for member in sorted(roster):
        shares = [r[member] for r in usable.values() if member in r]
        if member in survivors:
            seed = _rebuild(member, [(i, s[0]) for i, s in shares if len(s) == 1], threshold,
                            lambda seed: seed_commitment(seed, context) == roster[member].seed_commitment)
            flat = (flat - _prg(_seed_key(seed, context), size)) % MODULUS
        else:
            low = [(i, s[0]) for i, s in shares if len(s) == 2]
            high = {i: s[1] for i, s in shares if len(s) == 2}
            key = _rebuild_key(member, low, high, threshold, roster[member].mask_key)
            for survivor in survivors:  # the dropout's pair masks that sit in each survivor's input
                pair = _prg(_pair_key(key, roster[survivor].mask_key, context), size)
                flat = (flat - pair if survivor < member else flat + pair) % MODULUS
    return flat.reshape(total.shape)


def check_sum_bound(total: torch.Tensor, quantizer: Quantizer, summands: int, norm_bound: float) -> float:
    """The decoded sum's L2 norm; ``SumOutOfBounds`` if above ``summands * norm_bound``, which no
    ``summands`` honest updates of norm at most ``norm_bound`` can exceed (masks that did not
    cancel decode to values spread over the whole range, far above it)."""
    norm = float(torch.linalg.vector_norm(quantizer.decode(total)))
    if not norm <= summands * norm_bound * (1 + 1e-6) + 1e-6:
        raise SumOutOfBounds(f"the securely summed update has norm {norm:.4g}, above the bound "
                             f"{summands} x {norm_bound:g}: a member's masking was broken or forged")
    return norm


# --------------------------------------------------------------------------------------------
# the integer sum inside the all-reduce


def as_wire(values: torch.Tensor) -> torch.Tensor:
    """Integers mod 2^32 as the float32 tensor whose bits they are: what the all-reduce carries
    (its containers hold float32; an uncompressed part crosses the network bit for bit)."""
    signed = torch.where(values >= 2**31, values - MODULUS, values).to(torch.int32)
    return signed.view(torch.float32)


def from_wire(wire: torch.Tensor) -> torch.Tensor:
    """``as_wire``'s inverse: int64 values in ``[0, 2^32)``."""
    return wire.contiguous().view(torch.int32).to(torch.int64) % MODULUS


def secure_sum(parts: torch.Tensor, weights) -> torch.Tensor:
    """Reducer: the rows' integers (``as_wire`` bit patterns) added mod 2^32. Weights are ignored:
    each member weighs its own input before masking (a reducer must not learn them either)."""
    if not isinstance(parts, torch.Tensor) or parts.dtype != torch.float32 or parts.dim() < 1:
        raise ValueError("secure_sum takes a float32 stack of as_wire rows")
    return as_wire(from_wire(parts).sum(0) % MODULUS)


# --------------------------------------------------------------------------------------------
# helpers


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _share_key(mine: X25519PrivateKey, theirs: bytes, context: bytes) -> bytes:
    return _hkdf(mine.exchange(X25519PublicKey.from_public_bytes(theirs)), b"gpuflex-secagg-share|" + context)


def _pair_key(mine: X25519PrivateKey, theirs: bytes, context: bytes) -> bytes:
    return _hkdf(mine.exchange(X25519PublicKey.from_public_bytes(theirs)), b"gpuflex-secagg-pair|" + context)


def _seed_key(seed: bytes, context: bytes) -> bytes:
    return _hkdf(seed, b"gpuflex-secagg-self|" + context)


def _share_aad(sender: str, recipient: str, context: bytes) -> bytes:
    return b"|".join([b"gpuflex-secagg-share", context, sender.encode(), recipient.encode()])


def _nonce(sender: str, recipient: str, context: bytes) -> bytes:
    # each (key, nonce) pair is used once: the key is per attempt and pair, the nonce per direction
    return hashlib.sha256(_share_aad(sender, recipient, context)).digest()[:12]


def _prg(key: bytes, size: int) -> torch.Tensor:
    """``size`` uniform integers in ``[0, 2^32)`` from ChaCha20's keystream under ``key``."""
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * size))
    return torch.frombuffer(bytearray(stream), dtype=torch.int32).to(torch.int64) % MODULUS


def _combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    return Shamir.combine(list(shares))


def _subsets(shares: Sequence[tuple[int, bytes]], threshold: int):
    distinct = {i: s for i, s in shares}  # one share per x coordinate
    if len(distinct) < threshold:
        return
    yield from itertools.islice(itertools.combinations(sorted(distinct.items()), threshold), MAX_COMBINATIONS)


def _rebuild(member: str, shares, threshold: int, valid) -> bytes:
    if len({i for i, _ in shares}) < threshold:
        raise TooFewSurvivors(f"{len(shares)} shares of {member}'s seed were revealed, {threshold} are needed")
    for subset in _subsets(shares, threshold):
        secret = _combine(subset)
        if valid(secret):
            return secret
    raise TamperedShare(f"the revealed shares of {member}'s seed do not rebuild the seed it committed to")


def _rebuild_key(member: str, low, high: Mapping[int, bytes], threshold: int, public: bytes) -> X25519PrivateKey:
    if len({i for i, _ in low}) < threshold:
        raise TooFewSurvivors(f"{len(low)} shares of dropped member {member}'s key were revealed, "
                              f"{threshold} are needed")
    for subset in _subsets(low, threshold):
        key = X25519PrivateKey.from_private_bytes(_combine(subset) + _combine([(i, high[i]) for i, _ in subset]))
        if _public_bytes(key) == public:
            return key
    raise TamperedShare(f"the revealed shares of {member}'s masking key do not rebuild the key it published")
