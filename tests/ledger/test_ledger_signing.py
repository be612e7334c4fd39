"""EIP-712 round attestations and permits: Python digests against the contracts'."""

import pytest
from eth_abi import encode
from eth_utils import keccak

from ledger.merkle import ContributionTree
from ledger.signing import (
    RoundAttestation,
    SignatureError,
    check_attestation,
    digest,
    job_key,
    order_attestations,
    permit_typed_data,
    round_typed_data,
    sign_round,
)
from tests.ledger.conftest import account

pytestmark = pytest.mark.timeout(120)

PEERS = [account(f"s{i}") for i in range(4)]
TREE = ContributionTree({p.address: i + 1 for i, p in enumerate(PEERS)})


def test_round_digest_matches_contract(chain):
    esc = chain.ledger.escrow
    key = job_key("digest")
    data = round_typed_data(chain.ledger.chain_id, esc.address, key, 3, TREE.root, TREE.participants, TREE.total_units)
    assert digest(data) == esc.functions.round_digest(key, 3, TREE.root, TREE.participants, TREE.total_units).call()


def test_permit_domain_matches_token(chain):
    tok = chain.ledger.token
    data = permit_typed_data(chain.ledger.chain_id, tok.address, PEERS[0].address, PEERS[1].address, 1, 0, 1)
    domain = keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak(text="GPUX"),
                keccak(text="1"),
                chain.ledger.chain_id,
                tok.address,
            ],
        )
    )
    assert tok.functions.DOMAIN_SEPARATOR().call() == domain
    assert len(digest(data)) == 32


def test_attestation_checks_and_round_trip():
    chain_id, escrow, key = 1, "0x" + "11" * 20, job_key("x")
    att = sign_round(PEERS[2], chain_id, escrow, key, 1, TREE)
    check_attestation(att, chain_id, escrow, key, 1, TREE)
    again = RoundAttestation.from_dict(att.to_dict())
    assert again == att
    with pytest.raises(SignatureError):
        check_attestation(att, chain_id, escrow, key, 2, TREE)  # other round
    with pytest.raises(SignatureError):
        check_attestation(att, chain_id, escrow, job_key("y"), 1, TREE)  # other job
    with pytest.raises(SignatureError):
        check_attestation(att, 2, escrow, key, 1, TREE)  # other chain
    with pytest.raises(SignatureError):
        RoundAttestation.from_dict({"signer": PEERS[0].address})


def test_order_attestations_sorts_and_dedups():
    atts = [sign_round(p, 1, "0x" + "11" * 20, job_key("x"), 1, TREE) for p in PEERS]
    ordered = order_attestations(atts + atts[:2])
    assert [int(a.signer, 16) for a in ordered] == sorted(int(p.address, 16) for p in PEERS)
