"""JobEscrow on the embedded chain: funding, quorum-signed rounds, claims, refunds, deadlines."""

import pytest
from eth_utils import keccak

from ledger.chain import (
    GPUX,
    MAX_PARTICIPANTS,
    ContractReverted,
    Ledger,
    RoundTooLarge,
    _Sender,
    advance_time,
    deploy,
    fund_gas,
)
from ledger.merkle import ContributionTree
from ledger.signing import RoundAttestation, job_key, round_typed_data, signable
from tests.ledger.conftest import account

pytestmark = pytest.mark.timeout(180)


def tree_of(peers, units=None):
    units = units or [i + 1 for i in range(len(peers))]
    return ContributionTree({p.address: u for p, u in zip(peers, units)})


def reverts(reason):
    return pytest.raises(ContractReverted, match=reason)


# ---------------------------------------------------------------- funding


def test_open_job_with_permit_escrows_budget_in_one_transaction(chain):
    before = chain.consumer.balance()
    nonce_before = chain.ledger.token.functions.nonces(chain.consumer.address).call()
    key = chain.new_job(budget=50 * GPUX, permit=True)
    assert chain.consumer.balance() == before - 50 * GPUX
    assert chain.ledger.token.functions.nonces(chain.consumer.address).call() == nonce_before + 1  # permit used
    job = chain.ledger.job(key)
    assert (job.status, job.budget, job.unallocated, job.consumer) == ("open", 50 * GPUX, 50 * GPUX, chain.consumer.address)


def test_open_job_with_approve(chain):
    before = chain.consumer.balance()
    key = chain.new_job(budget=7 * GPUX, permit=False)
    assert chain.consumer.balance() == before - 7 * GPUX and chain.ledger.job(key).status == "open"


def test_open_job_rejects_reused_key_and_bad_terms(chain):
    key = chain.new_job()
    now = chain.ledger.chain_time()
    with reverts("job key already used"):
        chain.consumer.open_job(key, GPUX, GPUX, now + 100)
    with reverts("deadline is in the past"):
        chain.consumer.open_job(job_key("past"), GPUX, GPUX, now - 1)
    with reverts("budget is zero"):
        chain.consumer.open_job(job_key("zero"), 0, GPUX, now + 100)


def test_open_job_without_funds_reverts(chain):
    poor = chain.as_(chain.peers[7])
    with reverts("exceeds balance"):
        poor.open_job(job_key("poor"), GPUX, GPUX, chain.ledger.chain_time() + 100)


# ---------------------------------------------------------------- quorum-signed roots


def test_majority_posts_and_minority_reverts(chain):
    key = chain.new_job()
    peers = chain.peers[:5]
    tree = tree_of(peers)
    assert chain.ledger.quorum(key, 5) == 3
    with reverts("quorum not reached"):
        chain.as_(peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, peers[:2]))
    result = chain.as_(peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, peers[:3]))
    assert result.value == tree.total_units * GPUX  # allocated price * units
    rnd = chain.ledger.round(key, 1)
    assert rnd.root == tree.root and rnd.total_units == 15 and rnd.allocated == 15 * GPUX
    assert chain.ledger.job(key).last_round == 1


def test_even_participants_need_strict_majority(chain):
    key = chain.new_job()
    tree = tree_of(chain.peers[:4])
    with reverts("quorum not reached"):
        chain.as_(chain.peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, chain.peers[:2]))
    chain.as_(chain.peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, chain.peers[:3]))


def test_anyone_may_relay_a_signed_round(chain):
    key = chain.new_job()
    tree = tree_of(chain.peers[:1])
    chain.consumer.post_round(key, 1, tree, chain.sign(key, 1, tree, chain.peers[:1]))
    assert chain.ledger.round(key, 1).posted


def test_min_signers_floor(chain):
    key = chain.new_job(min_signers=3)
    tree = tree_of(chain.peers[:2])  # majority of 2 is 2, but the job wants 3
    assert chain.ledger.quorum(key, 2) == 3
    with reverts("quorum not reached"):
        chain.as_(chain.peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, chain.peers[:2]))


def test_forged_signature_reverts(chain):
    key = chain.new_job()
    peers = chain.peers[:3]
    tree = tree_of(peers)
    atts = chain.sign(key, 1, tree, peers[:2])
    a = atts[1]
    # tampered s (kept in the low half): recovers some unrelated address, or none
    forged = RoundAttestation(a.signer, a.units, a.proof, a.v, a.r, keccak(a.s)[:1] + b"\x00" * 31)
    with pytest.raises(ContractReverted):
        chain.as_(peers[0]).post_round(key, 1, tree, [atts[0], forged])
    # an outsider's valid signature presented with peer 1's leaf and proof
    v, r, s = _resign(chain.peers[6], chain, key, 1, tree)
    spoofed = RoundAttestation(a.signer, a.units, a.proof, v, r, s)
    with reverts("not a participant|not strictly ascending"):
        chain.as_(peers[0]).post_round(key, 1, tree, [atts[0], spoofed])


def test_signature_by_non_participant_reverts(chain):
    key = chain.new_job()
    peers, outsider = chain.peers[:3], chain.peers[5]
    tree = tree_of(peers)
    # the outsider signs the real round, with a genuine leaf proof from a tree that includes it
    other = chain.as_(outsider).sign_round(key, 1, tree_of(peers + [outsider]))
    v, r, s = _resign(outsider, chain, key, 1, tree)
    att = RoundAttestation(outsider.address, other.units, other.proof, v, r, s)
    with reverts("not a participant"):
        chain.as_(peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, peers[:1]) + [att])


def _resign(acct, chain, key, round_no, tree):
    """acct's signature over (key, round_no, tree) without needing to be a leaf of it."""
    data = round_typed_data(
        chain.ledger.chain_id, chain.ledger.escrow.address, key, round_no, tree.root, tree.participants, tree.total_units
    )
    sig = acct.sign_message(signable(data))
    return sig.v, sig.r.to_bytes(32, "big"), sig.s.to_bytes(32, "big")


def test_duplicate_signer_does_not_count_twice(chain):
    key = chain.new_job()
    peers = chain.peers[:3]
    tree = tree_of(peers)
    a = chain.sign(key, 1, tree, peers[:1])[0]
    fn = chain.ledger.escrow.functions.post_round(
        key, 1, tree.root, 3, tree.total_units, [a.as_contract_arg(), a.as_contract_arg()]
    )
    with reverts("not strictly ascending"):
        _Sender(chain.ledger.w3, peers[0]).send(fn, "post_round")


def test_replayed_signatures_for_another_round_or_job_revert(chain):
    key, other = chain.new_job(), chain.new_job()
    peers = chain.peers[:3]
    tree = tree_of(peers)
    round1 = chain.sign(key, 1, tree, peers[:2])
    chain.as_(peers[0]).post_round(key, 1, tree, round1)
    with reverts("not a participant|not strictly ascending"):
        chain.as_(peers[0]).post_round(key, 2, tree, round1)  # same root, next round
    with reverts("not a participant|not strictly ascending"):
        chain.as_(peers[0]).post_round(other, 1, tree, round1)  # same round, other job
    with reverts("round already posted"):
        chain.as_(peers[0]).post_round(key, 1, tree, round1)  # the very same post again


def test_signed_counts_cannot_be_changed(chain):
    key = chain.new_job()
    peers = chain.peers[:3]
    tree = tree_of(peers)
    atts = chain.sign(key, 1, tree, peers[:2])
    with reverts("not a participant|not strictly ascending"):
        chain.as_(peers[0]).post_round(key, 1, tree, atts, total_units=tree.total_units * 10)
    with reverts("not a participant|not strictly ascending"):
        chain.as_(peers[0]).post_round(key, 1, tree, atts[:1], participants=1)


def test_rounds_must_increase(chain):
    key = chain.new_job()
    tree = tree_of(chain.peers[:1])
    chain.as_(chain.peers[0]).post_round(key, 2, tree, chain.sign(key, 2, tree, chain.peers[:1]))
    with reverts("out of order"):
        chain.as_(chain.peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, chain.peers[:1]))


# ---------------------------------------------------------------- claims


def test_claims_pay_price_times_units_once(chain):
    key = chain.new_job(budget=100 * GPUX, price=2 * GPUX)
    peers = chain.peers[:3]
    tree = tree_of(peers, [1, 2, 3])
    chain.as_(peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, peers[:2]))
    for p, units in zip(peers, [1, 2, 3]):
        before = chain.ledger.balance(p.address)
        assert chain.as_(p).claim(key, 1, tree).value == 2 * GPUX * units
        assert chain.ledger.balance(p.address) == before + 2 * GPUX * units
        assert chain.ledger.has_claimed(key, 1, p.address)
    with reverts("already claimed"):
        chain.as_(peers[1]).claim(key, 1, tree)


def test_invalid_and_misdirected_claims_revert(chain):
    key = chain.new_job()
    peers = chain.peers[:3]
    tree = tree_of(peers, [4, 5, 6])
    chain.as_(peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, peers[:2]))
    p = chain.as_(peers[0])
    with reverts("invalid Merkle proof"):
        p.claim(key, 1, units=40, proof=tree.proof(peers[0].address))  # inflated units
    with reverts("invalid Merkle proof"):
        p.claim(key, 1, units=4, proof=[keccak(b"junk")])
    with reverts("invalid Merkle proof"):  # wrong account: peer 3 replays peer 1's leaf and proof
        chain.as_(chain.peers[3]).claim(key, 1, units=5, proof=tree.proof(peers[1].address))
    with reverts("no such round"):
        p.claim(key, 2, tree)
    assert chain.as_(peers[1]).claim(key, 1, tree).value == 5 * GPUX  # the rightful owner still can


def test_proof_replayed_in_another_round_reverts(chain):
    key = chain.new_job()
    peers = chain.peers[:3]
    t1, t2 = tree_of(peers, [1, 1, 1]), tree_of(peers[:2], [7, 7])
    chain.as_(peers[0]).post_round(key, 1, t1, chain.sign(key, 1, t1, peers[:2]))
    chain.as_(peers[0]).post_round(key, 2, t2, chain.sign(key, 2, t2, peers[:2]))
    with reverts("invalid Merkle proof"):
        chain.as_(peers[2]).claim(key, 2, t1)  # round-1 leaf against round-2 root
    assert chain.as_(peers[0]).claim(key, 1, t1).value == GPUX
    assert chain.as_(peers[0]).claim(key, 2, t2).value == 7 * GPUX  # each round pays once


def test_over_budget_rounds_are_capped_pro_rata(chain):
    key = chain.new_job(budget=10 * GPUX, price=GPUX)
    peers = chain.peers[:2]
    t1, t2, t3 = tree_of(peers, [3, 3]), tree_of(peers, [2, 6]), tree_of(peers, [1, 1])
    assert chain.as_(peers[0]).post_round(key, 1, t1, chain.sign(key, 1, t1, peers)).value == 6 * GPUX
    assert chain.as_(peers[0]).post_round(key, 2, t2, chain.sign(key, 2, t2, peers)).value == 4 * GPUX  # capped
    assert chain.as_(peers[0]).post_round(key, 3, t3, chain.sign(key, 3, t3, peers)).value == 0
    assert chain.as_(peers[0]).claim(key, 2, t2).value == 1 * GPUX  # 4 * 2/8
    assert chain.as_(peers[1]).claim(key, 2, t2).value == 3 * GPUX  # 4 * 6/8
    assert chain.as_(peers[1]).claim(key, 3, t3).value == 0
    assert chain.ledger.job(key).unallocated == 0
    assert chain.consumer.finish_job(key).value == 0


# ---------------------------------------------------------------- refunds and deadlines


def test_refund_on_finish_goes_to_consumer_only_and_once(chain):
    key = chain.new_job(budget=20 * GPUX, price=GPUX)
    peers = chain.peers[:2]
    tree = tree_of(peers, [2, 3])
    chain.as_(peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, peers))
    with reverts("only the consumer"):
        chain.as_(peers[0]).finish_job(key)
    with reverts("only the consumer"):
        chain.as_(peers[0]).cancel_job(key)
    with reverts("deadline not reached"):
        chain.as_(peers[0]).refund_expired(key)
    before = chain.consumer.balance()
    assert chain.consumer.finish_job(key).value == 15 * GPUX
    assert chain.consumer.balance() == before + 15 * GPUX and chain.ledger.job(key).status == "finished"
    with reverts("job is not open"):
        chain.consumer.finish_job(key)
    with reverts("job is not open"):
        chain.consumer.cancel_job(key)
    # a round after finishing reverts; contributors of posted rounds are still paid
    t2 = tree_of(peers, [1, 1])
    with reverts("job is not open"):
        chain.as_(peers[0]).post_round(key, 2, t2, chain.sign(key, 2, t2, peers))
    assert chain.as_(peers[1]).claim(key, 1, tree).value == 3 * GPUX


def test_cancel_refunds_everything_unallocated(chain):
    before = chain.consumer.balance()
    key = chain.new_job(budget=9 * GPUX)
    assert chain.consumer.cancel_job(key).value == 9 * GPUX
    assert chain.consumer.balance() == before and chain.ledger.job(key).status == "cancelled"


def test_deadline_blocks_rounds_and_anyone_triggers_full_refund(chain):
    key = chain.new_job(budget=12 * GPUX, ttl=100)
    peers = chain.peers[:1]
    tree = tree_of(peers)
    before = chain.consumer.balance()
    advance_time(chain.ledger.w3, 101)
    with reverts("deadline has passed"):
        chain.as_(peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, peers))
    stranger = chain.as_(chain.peers[4])
    stranger_before = stranger.balance()
    assert stranger.refund_expired(key).value == 12 * GPUX  # full budget: no round was posted
    assert chain.consumer.balance() == before + 12 * GPUX and stranger.balance() == stranger_before
    assert chain.ledger.job(key).status == "expired"
    with reverts("job is not open"):
        stranger.refund_expired(key)
    with reverts("job is not open"):
        chain.consumer.cancel_job(key)


def test_money_is_conserved(chain):
    """The consumer pays exactly what the contributors receive; a peer with no work gets nothing."""
    peers = chain.peers[:4]
    balances = lambda: [chain.ledger.balance(p.address) for p in peers]  # noqa: E731
    consumer_before, peers_before = chain.consumer.balance(), balances()
    escrow_before = chain.ledger.balance(chain.ledger.escrow.address)
    key = chain.new_job(budget=30 * GPUX, price=GPUX)
    tree = tree_of(peers, [1, 2, 3, 0])
    chain.as_(peers[0]).post_round(key, 1, tree, chain.sign(key, 1, tree, peers[:3]))
    paid = [chain.as_(p).claim(key, 1, tree).value for p in peers]
    refund = chain.consumer.finish_job(key).value
    gains = [after - before for after, before in zip(balances(), peers_before)]
    assert gains == paid == [GPUX, 2 * GPUX, 3 * GPUX, 0] and refund == 24 * GPUX
    assert consumer_before - chain.consumer.balance() == sum(gains)
    assert chain.ledger.balance(chain.ledger.escrow.address) == escrow_before
    rnd = chain.ledger.round(key, 1)
    assert rnd.paid == rnd.allocated == sum(paid)


# ---------------------------------------------------------------- token


def test_faucet_only_on_dev_chain(chain):
    prod = Ledger(chain.ledger.w3, deploy(chain.ledger.w3, chain.ledger.w3.eth.accounts[0], dev_chain=False))
    user = prod.with_account(account("prod-user"))
    fund_gas(prod.w3, user.address)
    with reverts("faucet is disabled"):
        user.faucet(GPUX)
    assert not prod.token.functions.dev_chain().call() and chain.ledger.token.functions.dev_chain().call()
    dev_user = chain.as_(chain.peers[7])
    before = dev_user.balance()
    dev_user.faucet(5 * GPUX)
    assert dev_user.balance() == before + 5 * GPUX
    with reverts("too large"):
        dev_user.faucet(10**7 * GPUX)


def test_token_metadata(chain):
    t = chain.ledger.token.functions
    assert (t.name().call(), t.symbol().call(), t.decimals().call()) == ("GPUX", "GPUX", 18)


def test_round_size_limits(chain):
    assert chain.ledger.escrow.functions.MAX_PARTICIPANTS().call() == MAX_PARTICIPANTS
    key = chain.new_job()
    big = ContributionTree({account(f"x{i}").address: 1 for i in range(MAX_PARTICIPANTS + 1)})
    with pytest.raises(RoundTooLarge):
        chain.consumer.post_round(key, 1, big, [])


def test_claim_many_rounds_in_one_transaction(chain):
    key = chain.new_job(budget=100 * GPUX, price=GPUX)
    peers = chain.peers[:2]
    trees = {r: tree_of(peers, [r, 2 * r]) for r in (1, 2, 3)}
    for r, t in trees.items():
        chain.as_(peers[0]).post_round(key, r, t, chain.sign(key, r, t, peers))
    assert chain.as_(peers[1]).claim(key, 2, trees[2]).value == 4 * GPUX
    before = chain.ledger.balance(peers[1].address)
    result = chain.as_(peers[1]).claim_many(key, trees)  # round 2 already claimed: skipped
    assert result.value == (2 + 6) * GPUX and chain.ledger.balance(peers[1].address) == before + 8 * GPUX
    assert chain.as_(peers[1]).claim_many(key, trees).value == 0  # nothing left: no transaction
    items = [(2, 4, trees[2].proof(peers[1].address))]
    with reverts("already claimed"):
        _Sender(chain.ledger.w3, peers[1]).send(chain.ledger.escrow.functions.claim_many(key, items), "claim_many")
    assert chain.as_(peers[0]).claim_many(key, trees).value == (1 + 2 + 3) * GPUX
