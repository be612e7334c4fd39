"""The Python Merkle tree against the contract's (snekmate's) verifier, and on its own."""

import pytest
from eth_utils import keccak

from ledger.merkle import ContributionTree, MerkleError, leaf_hash, verify_proof
from tests.ledger.conftest import account

pytestmark = pytest.mark.timeout(120)

WALLETS = [account(f"m{i}").address for i in range(17)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17])
def test_every_python_proof_verifies_on_chain(chain, n):
    tree = ContributionTree({w: 10 * i + 1 for i, w in enumerate(WALLETS[:n])})
    verify = chain.ledger.escrow.functions.verify_proof
    for w in WALLETS[:n]:
        leaf, proof = tree.leaf(w), tree.proof(w)
        assert verify_proof(tree.root, leaf, proof)
        assert verify(tree.root, leaf, proof).call()
    assert tree.participants == n and tree.total_units == sum(10 * i + 1 for i in range(n))


def test_leaf_hash_matches_contract(chain):
    for w, units in [(WALLETS[0], 0), (WALLETS[1], 1), (WALLETS[2], 2**200 + 7)]:
        assert chain.ledger.escrow.functions.leaf_hash(w, units).call() == leaf_hash(w, units)


def test_wrong_proofs_fail_on_both_sides(chain):
    tree = ContributionTree({w: 5 for w in WALLETS[:6]})
    verify = chain.ledger.escrow.functions.verify_proof
    a, b = WALLETS[0], WALLETS[1]
    cases = [
        (leaf_hash(a, 6), tree.proof(a)),  # wrong units
        (tree.leaf(a), tree.proof(b)),  # someone else's proof
        (tree.leaf(a), tree.proof(a)[:-1]),  # truncated
        (tree.leaf(a), [keccak(b"x")] + tree.proof(a)[1:]),  # tampered sibling
        (leaf_hash(WALLETS[9], 5), tree.proof(a)),  # not a leaf at all
    ]
    for leaf, proof in cases:
        assert not verify_proof(tree.root, leaf, proof)
        assert not verify(tree.root, leaf, proof).call()


def test_inner_node_is_not_a_leaf(chain):
    # A 64-byte inner node preimage cannot pass for a leaf: leaves are double-hashed.
    tree = ContributionTree({w: 1 for w in WALLETS[:4]})
    proof = tree.proof(WALLETS[0])
    inner = keccak(min(tree.leaf(WALLETS[0]), proof[0]) + max(tree.leaf(WALLETS[0]), proof[0]))
    assert chain.ledger.escrow.functions.verify_proof(tree.root, inner, proof[1:]).call()  # sanity: it is a node
    assert inner not in {tree.leaf(w) for w in WALLETS[:4]}


def test_tree_is_deterministic_and_merges_duplicates():
    pairs = [(WALLETS[0], 3), (WALLETS[1], 4), (WALLETS[0].lower(), 2)]
    t1, t2 = ContributionTree(pairs), ContributionTree(list(reversed(pairs)))
    assert t1.root == t2.root
    assert t1.units(WALLETS[0]) == 5 and t1.participants == 2 and t1.total_units == 9
    assert ContributionTree.from_dict(t1.to_dict()).root == t1.root


def test_single_leaf_root_is_the_leaf():
    tree = ContributionTree({WALLETS[0]: 9})
    assert tree.root == leaf_hash(WALLETS[0], 9) and tree.proof(WALLETS[0]) == []


@pytest.mark.parametrize(
    "bad", [{}, {"0x1234": 1}, {WALLETS[0]: -1}, {WALLETS[0]: 1.5}, {WALLETS[0]: True}]
)
def test_bad_contributions_raise(bad):
    with pytest.raises(MerkleError):
        ContributionTree(bad)


def test_errors_for_strangers_and_tampered_dicts():
    tree = ContributionTree({WALLETS[0]: 1, WALLETS[1]: 2})
    with pytest.raises(MerkleError):
        tree.proof(WALLETS[5])
    d = tree.to_dict()
    d["contributions"][WALLETS[1]] = 3
    with pytest.raises(MerkleError):
        ContributionTree.from_dict(d)
