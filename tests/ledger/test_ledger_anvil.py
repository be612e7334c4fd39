"""The same escrow flow on a real JSON-RPC node: anvil from npm, on 127.0.0.1."""

from __future__ import annotations

import pytest

from ledger.chain import GPUX, ContractReverted, Deployment, Ledger, advance_time, connect, deploy, fund_gas
from ledger.devchain import Anvil, anvil_missing
from ledger.merkle import ContributionTree
from ledger.signing import job_key

from conftest import account  # tests/ledger/conftest.py

pytestmark = pytest.mark.timeout(120)

NO_ANVIL = anvil_missing()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with Anvil(log=tmp_path_factory.mktemp("anvil") / "anvil.log") as chain:
        yield chain


@pytest.mark.skipif(NO_ANVIL is not None, reason=f"anvil is not installed: {NO_ANVIL}")
def test_escrow_round_claims_and_refund_on_anvil(node, tmp_path):
    w3 = connect(node.url)
    deployment = deploy(w3, w3.eth.accounts[0], dev_chain=True)
    deployment.save(tmp_path / "deployment.json")
    consumer_acct, alice, bob, idle = (account(n) for n in ("consumer", "alice", "bob", "idle"))
    for acct in (consumer_acct, alice, bob, idle):
        fund_gas(w3, acct.address)
    ledger = Ledger.from_file(tmp_path / "deployment.json", node.url)
    assert Deployment.load(tmp_path / "deployment.json").chain_id == 31337 == ledger.chain_id
    consumer = ledger.with_account(consumer_acct)
    consumer.faucet(100 * GPUX)

    key = job_key("anvil-job")
    consumer.open_job(key, 50 * GPUX, GPUX, ledger.chain_time() + 3600)  # permit: no separate approve
    assert consumer.balance() == 50 * GPUX
    tree = ContributionTree({alice.address: 3, bob.address: 7})
    attestations = [ledger.with_account(a).sign_round(key, 1, tree) for a in (alice, bob)]
    ledger.with_account(alice).post_round(key, 1, tree, attestations)
    ledger.with_account(alice).claim(key, 1, tree)
    ledger.with_account(bob).claim(key, 1, tree)
    with pytest.raises(ContractReverted):  # a real node's ContractLogicError, mapped to ours
        ledger.with_account(bob).claim(key, 1, tree)
    with pytest.raises(ContractReverted):  # the idle peer is not in the tree
        ledger.with_account(idle).claim(key, 1, units=5, proof=[])
    with pytest.raises(ContractReverted):  # only the consumer may close the job
        ledger.with_account(alice).finish_job(key)
    consumer.finish_job(key)
    assert (ledger.balance(alice.address), ledger.balance(bob.address), ledger.balance(idle.address)) == (
        3 * GPUX, 7 * GPUX, 0)
    assert consumer.balance() == 90 * GPUX  # 100 - (3 + 7) paid; the unspent 40 came back
    assert advance_time(w3, 10) >= ledger.chain_time()
