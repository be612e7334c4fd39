"""Fixtures of the ledger tests: one embedded chain with deployed contracts per test module.

The chain clock only moves forward (tests that pass a deadline travel in time), so every test
opens its own job with a fresh key and a deadline relative to the chain's current time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from eth_account import Account
from eth_utils import keccak

from ledger.chain import GPUX, Ledger, fund_gas
from ledger.signing import job_key

_job_ids = itertools.count()


def account(name: str):
    """A deterministic test account (the key is derived from ``name``)."""
    return Account.from_key(keccak(text=f"gpuflex-test:{name}"))


@dataclass
class Chain:
    ledger: Ledger  # read-only view (no account)
    consumer: Ledger
    peers: list  # LocalAccounts, funded with gas
    _views: dict = field(default_factory=dict)

    def as_(self, acct) -> Ledger:
        if acct.address not in self._views:
            self._views[acct.address] = self.ledger.with_account(acct)
        return self._views[acct.address]

    def new_job(self, budget=100 * GPUX, price=GPUX, ttl=3600, min_signers=1, permit=True):
        key = job_key(f"job-{next(_job_ids)}")
        self.consumer.open_job(key, budget, price, self.ledger.chain_time() + ttl, min_signers=min_signers, permit=permit)
        return key

    def sign(self, key, round_no, tree, signers):
        return [self.as_(s).sign_round(key, round_no, tree) for s in signers]


def make_chain(n_peers: int = 8) -> Chain:
    ledger = Ledger.embedded()
    consumer_acct, peers = account("consumer"), [account(f"peer{i}") for i in range(n_peers)]
    for a in [consumer_acct, *peers]:
        fund_gas(ledger.w3, a.address, 10**20)
    consumer = ledger.with_account(consumer_acct)
    consumer.faucet(10**6 * GPUX)
    return Chain(ledger=ledger, consumer=consumer, peers=peers)


@pytest.fixture(scope="module")
def chain() -> Chain:
    return make_chain()
