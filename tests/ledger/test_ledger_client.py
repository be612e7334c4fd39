"""The Ledger client: deployment files, read-only use, revert mapping for both backends."""

import pytest
from eth_tester.exceptions import TransactionFailed
from web3.exceptions import ContractLogicError

from ledger.chain import (
    GPUX,
    MAX_PARTICIPANTS,
    ContractReverted,
    Deployment,
    DeploymentError,
    Ledger,
    NoAccount,
    advance_time,
    chain_time,
    revert_reason,
)
from ledger.compile import CONTRACT_NAMES, compiled
from ledger.merkle import ContributionTree
from tests.ledger.conftest import account

pytestmark = pytest.mark.timeout(120)


def test_deployment_file_round_trip(chain, tmp_path):
    path = tmp_path / "deployment.json"
    chain.ledger.deployment.save(path)
    dep = Deployment.load(path)
    assert dep == chain.ledger.deployment
    reader = Ledger(chain.ledger.w3, dep)  # a peer that only has the file (and the node)
    assert reader.balance(chain.consumer.address) == chain.consumer.balance()
    assert dep.token_abi == compiled("GPUX").abi and dep.escrow_abi == compiled("JobEscrow").abi


def test_bad_deployment_files(chain, tmp_path):
    with pytest.raises(DeploymentError, match="no deployment file"):
        Deployment.load(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(DeploymentError):
        Deployment.load(tmp_path / "junk.json")
    other = Deployment(**{**chain.ledger.deployment.__dict__, "chain_id": 999})
    with pytest.raises(DeploymentError, match="chain 999"):
        Ledger(chain.ledger.w3, other)


def test_read_only_ledger_refuses_transactions(chain):
    with pytest.raises(NoAccount):
        chain.ledger.faucet(GPUX)


def test_revert_reason_from_every_backend():
    assert revert_reason(ContractLogicError("execution reverted: escrow: already claimed")) == "escrow: already claimed"
    assert revert_reason(TransactionFailed("escrow: only the consumer")) == "escrow: only the consumer"
    assert revert_reason(ValueError({"code": 3, "message": "execution reverted: gpux: x"})) == "gpux: x"
    assert revert_reason(RuntimeError("boom")) is None
    err = ContractReverted("JobEscrow.claim", "escrow: already claimed")
    assert str(err) == "JobEscrow.claim reverted: escrow: already claimed" and err.reason == "escrow: already claimed"


def test_embedded_backend_reverts_map_to_contract_reverted(chain):
    # eth-tester raises during gas estimation; the client turns it into ContractReverted
    with pytest.raises(ContractReverted) as info:
        chain.as_(chain.peers[0]).finish_job(b"\x01" * 32)
    assert info.value.reason == "escrow: job is not open"


def test_advance_time(chain):
    before = chain_time(chain.ledger.w3)
    assert advance_time(chain.ledger.w3, 50) >= before + 50


def test_contracts_compile_and_are_cached():
    for name in CONTRACT_NAMES:
        c = compiled(name)
        assert c.bytecode.startswith("0x") and c.abi and compiled(name) is c


def test_contract_limits_match_client():
    tree = ContributionTree({account(f"big{i}").address: 1 for i in range(MAX_PARTICIPANTS)})
    assert max(len(tree.proof(w)) for w in tree.contributions) <= 8  # JobEscrow.MAX_PROOF_DEPTH
