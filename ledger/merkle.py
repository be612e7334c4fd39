"""The one Merkle construction of GPUFlex: a round's (wallet, work units) contributions.

It matches snekmate's ``merkle_proof_verification`` (used by ``JobEscrow.vy``): pairs are
sorted before hashing, so a proof is just the list of siblings from leaf to root. Leaves are
OpenZeppelin "standard" leaves, ``keccak256(keccak256(abi_encode(address, uint256)))``; the
double hash means no 64-byte inner node can pass for a leaf.

Layout: leaf hashes sorted ascending form the bottom layer; each layer pairs neighbours
(``keccak256(min(a, b) ++ max(a, b))``) and an odd last node moves up unchanged. A one-leaf
tree's root is the leaf itself, with an empty proof. The tree is a pure function of the
contributions, so every peer that holds the round's receipt rebuilds the same root.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from eth_abi import encode as abi_encode
from eth_utils import is_address, keccak, to_checksum_address

from dht.errors import GPUFlexError


class MerkleError(GPUFlexError):
    """Bad contributions for a tree, or a proof asked for a wallet that is not a leaf."""


def leaf_hash(wallet: str, units: int) -> bytes:
    """The leaf of ``wallet`` with ``units`` (same as ``JobEscrow.leaf_hash``)."""
    return keccak(keccak(abi_encode(["address", "uint256"], [to_checksum_address(wallet), int(units)])))


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


def process_proof(leaf: bytes, proof: Iterable[bytes]) -> bytes:
    node = leaf
    for sibling in proof:
        node = hash_pair(node, sibling)
    return node


def verify_proof(root: bytes, leaf: bytes, proof: Iterable[bytes]) -> bool:
    return process_proof(leaf, proof) == root


class ContributionTree:
    """One round's contributions as a Merkle tree.

    ``contributions`` maps wallet address -> work units (int >= 0), or is an iterable of such
    pairs; a wallet listed twice (one owner running two peers) gets the sum of its units.
    """

    def __init__(self, contributions: Mapping[str, int] | Iterable[tuple[str, int]]):
        pairs = contributions.items() if isinstance(contributions, Mapping) else contributions
        merged: dict[str, int] = {}
        for wallet, units in pairs:
            if not isinstance(wallet, str) or not is_address(wallet):
                raise MerkleError(f"not a wallet address: {wallet!r}")
            if isinstance(units, bool) or not isinstance(units, int) or units < 0 or units >= 2**256:
                raise MerkleError(f"work units must be a non-negative integer, got {units!r} for {wallet}")
            key = to_checksum_address(wallet)
            merged[key] = merged.get(key, 0) + units
        if not merged:
            raise MerkleError("a round needs at least one contribution")
        self.contributions: dict[str, int] = dict(sorted(merged.items()))
        self._leaf_of = {w: leaf_hash(w, u) for w, u in self.contributions.items()}
        layer = sorted(self._leaf_of.values())
        self._layers: list[list[bytes]] = [layer]
        while len(layer) > 1:
            layer = [hash_pair(layer[i], layer[i + 1]) if i + 1 < len(layer) else layer[i] for i in range(0, len(layer), 2)]
            self._layers.append(layer)
        self._index = {leaf: i for i, leaf in enumerate(self._layers[0])}

    @property
    def root(self) -> bytes:
        return self._layers[-1][0]

    @property
    def participants(self) -> int:
        """Number of leaves (distinct wallets)."""
        return len(self.contributions)

    @property
    def total_units(self) -> int:
        return sum(self.contributions.values())

    def __contains__(self, wallet: object) -> bool:
        return isinstance(wallet, str) and is_address(wallet) and to_checksum_address(wallet) in self.contributions

    def units(self, wallet: str) -> int:
        return self.contributions[self._wallet(wallet)]

    def leaf(self, wallet: str) -> bytes:
        return self._leaf_of[self._wallet(wallet)]

    def proof(self, wallet: str) -> list[bytes]:
        """Sibling hashes from ``wallet``'s leaf up to the root."""
        i = self._index[self.leaf(wallet)]
        proof = []
        for layer in self._layers[:-1]:
            sibling = i ^ 1
            if sibling < len(layer):
                proof.append(layer[sibling])
            i //= 2
        return proof

    def to_dict(self) -> dict:
        """JSON-friendly form (for a round receipt); ``from_dict`` rebuilds the same tree."""
        return {"contributions": dict(self.contributions), "root": "0x" + self.root.hex()}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ContributionTree":
        tree = cls(data["contributions"])
        if "root" in data and data["root"].lower() != "0x" + tree.root.hex():
            raise MerkleError("the contributions do not hash to the stated root")
        return tree

    def _wallet(self, wallet: str) -> str:
        if wallet not in self:
            raise MerkleError(f"{wallet} is not a contributor of this round")
        return to_checksum_address(wallet)

    def __repr__(self) -> str:
        return f"ContributionTree(participants={self.participants}, total_units={self.total_units}, root=0x{self.root.hex()})"
