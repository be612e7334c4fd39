"""EIP-712 typed data GPUFlex signs: a round's Merkle root, and the GPUX EIP-2612 permit.

All encoding and signing is eth-account's (``encode_typed_data`` / ``sign_message``); nothing
here hashes by hand. The ``RoundRoot`` struct is the one ``JobEscrow.vy`` checks:

    RoundRoot(bytes32 jobKey, uint256 round, bytes32 root, uint256 participants, uint256 totalUnits)

in the domain ``{name: "GPUFlex JobEscrow", version: "1", chainId, verifyingContract: escrow}``.
The domain pins the chain and the escrow deployment and the struct pins job and round, so a
signature is good for exactly one (chain, escrow, job, round, root, leaf count, total units).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_utils import keccak, to_bytes, to_checksum_address

from dht.errors import GPUFlexError
from ledger.merkle import ContributionTree

ESCROW_DOMAIN_NAME = "GPUFlex JobEscrow"
ESCROW_DOMAIN_VERSION = "1"
TOKEN_DOMAIN_NAME = "GPUX"
TOKEN_DOMAIN_VERSION = "1"

_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
ROUND_TYPES = {
    "EIP712Domain": _DOMAIN_TYPE,
    "RoundRoot": [
        {"name": "jobKey", "type": "bytes32"},
        {"name": "round", "type": "uint256"},
        {"name": "root", "type": "bytes32"},
        {"name": "participants", "type": "uint256"},
        {"name": "totalUnits", "type": "uint256"},
    ],
}
PERMIT_TYPES = {
    "EIP712Domain": _DOMAIN_TYPE,
    "Permit": [
        {"name": "owner", "type": "address"},
        {"name": "spender", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "nonce", "type": "uint256"},
        {"name": "deadline", "type": "uint256"},
    ],
}


class SignatureError(GPUFlexError):
    """A round attestation is malformed or was not signed by the wallet it names."""


def job_key(job_id: str) -> bytes:
    """The bytes32 key a GPUFlex job id maps to on chain: keccak256("gpuflex.job:" + job_id)."""
    return keccak(text=f"gpuflex.job:{job_id}")


def round_typed_data(
    chain_id: int, escrow: str, job: bytes, round_no: int, root: bytes, participants: int, total_units: int
) -> dict:
    return {
        "types": ROUND_TYPES,
        "primaryType": "RoundRoot",
        "domain": {
            "name": ESCROW_DOMAIN_NAME,
            "version": ESCROW_DOMAIN_VERSION,
            "chainId": chain_id,
            "verifyingContract": to_checksum_address(escrow),
        },
        "message": {
            "jobKey": _b32(job),
            "round": round_no,
            "root": _b32(root),
            "participants": participants,
            "totalUnits": total_units,
        },
    }


def permit_typed_data(
    chain_id: int, token: str, owner: str, spender: str, value: int, nonce: int, deadline: int
) -> dict:
    return {
        "types": PERMIT_TYPES,
        "primaryType": "Permit",
        "domain": {
            "name": TOKEN_DOMAIN_NAME,
            "version": TOKEN_DOMAIN_VERSION,
            "chainId": chain_id,
            "verifyingContract": to_checksum_address(token),
        },
        "message": {
            "owner": to_checksum_address(owner),
            "spender": to_checksum_address(spender),
            "value": value,
            "nonce": nonce,
            "deadline": deadline,
        },
    }


def signable(typed_data: dict) -> SignableMessage:
    return encode_typed_data(full_message=typed_data)


def digest(typed_data: dict) -> bytes:
    """The 32-byte EIP-712 digest (what a contract passes to ecrecover)."""
    m = signable(typed_data)
    return keccak(b"\x19" + m.version + m.header + m.body)


@dataclass(frozen=True)
class RoundAttestation:
    """One participant's endorsement of a round root: its leaf (units, proof) and signature."""

    signer: str
    units: int
    proof: tuple[bytes, ...]
    v: int
    r: bytes
    s: bytes

    def as_contract_arg(self) -> tuple:
        return (self.units, list(self.proof), self.v, self.r, self.s)

    def to_dict(self) -> dict:
        """JSON-friendly form, to pass between peers (e.g. in a DHT record)."""
        return {
            "signer": self.signer,
            "units": self.units,
            "proof": ["0x" + p.hex() for p in self.proof],
            "v": self.v,
            "r": "0x" + self.r.hex(),
            "s": "0x" + self.s.hex(),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "RoundAttestation":
        try:
            return cls(
                signer=to_checksum_address(d["signer"]),
                units=int(d["units"]),
                proof=tuple(_b32(p) for p in d["proof"]),
                v=int(d["v"]),
                r=_b32(d["r"]),
                s=_b32(d["s"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SignatureError(f"malformed round attestation: {e}") from e


def sign_round(account, chain_id: int, escrow: str, job: bytes, round_no: int, tree: ContributionTree) -> RoundAttestation:
    """``account`` (an eth-account LocalAccount that is a leaf of ``tree``) signs the round."""
    data = round_typed_data(chain_id, escrow, job, round_no, tree.root, tree.participants, tree.total_units)
    sig = account.sign_message(signable(data))
    return RoundAttestation(
        signer=account.address,
        units=tree.units(account.address),
        proof=tuple(tree.proof(account.address)),
        v=sig.v,
        r=sig.r.to_bytes(32, "big"),
        s=sig.s.to_bytes(32, "big"),
    )


def check_attestation(
    att: RoundAttestation, chain_id: int, escrow: str, job: bytes, round_no: int, tree: ContributionTree
) -> None:
    """Raise ``SignatureError`` unless ``att`` is a valid signature of ``att.signer`` over this
    round and the signer's leaf is in ``tree`` (what the contract will check, done off chain)."""
    data = round_typed_data(chain_id, escrow, job, round_no, tree.root, tree.participants, tree.total_units)
    try:
        recovered = Account.recover_message(signable(data), vrs=(att.v, att.r, att.s))
    except Exception as e:  # eth-keys raises several types on garbage input
        raise SignatureError(f"unreadable signature from {att.signer}: {e}") from e
    if recovered != to_checksum_address(att.signer):
        raise SignatureError(f"signature for round {round_no} is not by {att.signer}")
    if att.signer not in tree or tree.units(att.signer) != att.units:
        raise SignatureError(f"{att.signer} is not a participant of round {round_no} with {att.units} units")


def order_attestations(atts: Sequence[RoundAttestation]) -> list[RoundAttestation]:
    """One attestation per signer, by ascending signer address (the order the contract wants)."""
    by_signer = {to_checksum_address(a.signer): a for a in atts}
    return [by_signer[s] for s in sorted(by_signer, key=lambda a: int(a, 16))]


def sign_permit(account, chain_id: int, token: str, spender: str, value: int, nonce: int, deadline: int) -> tuple[int, bytes, bytes]:
    """EIP-2612 permit signature ``(v, r, s)`` by ``account`` for ``spender`` to move ``value``."""
    sig = account.sign_message(signable(permit_typed_data(chain_id, token, account.address, spender, value, nonce, deadline)))
    return sig.v, sig.r.to_bytes(32, "big"), sig.s.to_bytes(32, "big")


def _b32(value) -> bytes:
    b = to_bytes(hexstr=value) if isinstance(value, str) else bytes(value)
    if len(b) != 32:
        raise ValueError(f"expected 32 bytes, got {len(b)}")
    return b
