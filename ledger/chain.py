"""``Ledger``: the web3 client for the GPUX token and the job escrow, over any backend.

Backends: ``connect(None)`` is the embedded in-process chain (web3's ``EthereumTesterProvider``
on py-evm; a fresh chain per call), ``connect(url)`` any EVM JSON-RPC node (anvil, a testnet).
``deploy`` compiles (``ledger.compile``) and deploys both contracts and returns a
``Deployment`` -- chain id, addresses, ABIs -- that ``save``/``load`` write and read as JSON,
so a peer needs only the file and a URL (``Ledger.from_file``).

Every transaction is signed locally by the ``Ledger``'s account (an eth-account
``LocalAccount``, e.g. from ``ledger.wallet.load_keyfile``) and sent raw, which works the same
on every backend. Reverts come back differently per backend (eth-tester's
``TransactionFailed``, a node's ``ContractLogicError``, a failed receipt); all of them become
``ContractReverted`` carrying the contract's revert reason.
"""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from eth_utils import is_address, to_checksum_address
from web3 import Web3
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception
from web3.logs import DISCARD as _DISCARD

from dht.errors import GPUFlexError
from ledger.compile import compiled
from ledger.merkle import ContributionTree
from ledger.signing import RoundAttestation, order_attestations, sign_permit, sign_round

GPUX = 10**18  # one GPUX in base units (18 decimals)
JOB_STATUS = {0: "none", 1: "open", 2: "finished", 3: "cancelled", 4: "expired"}
DEPLOYMENT_FORMAT = 1
MAX_PARTICIPANTS = 255  # JobEscrow.MAX_PARTICIPANTS: leaves per round (128 signatures at most)
MAX_CLAIMS = 64  # JobEscrow.MAX_CLAIMS: rounds per claim_many transaction
PERMIT_TTL = 3600  # seconds a funding permit stays valid; it is used in the same transaction


class LedgerError(GPUFlexError):
    """Base of the chain client's errors."""


class ChainUnreachable(LedgerError):
    """The JSON-RPC endpoint does not answer."""


class DeploymentError(LedgerError):
    """A deployment file is missing, malformed, or for another chain than the one connected."""


class RoundTooLarge(LedgerError):
    """A round has more leaves than one JobEscrow round accepts (``MAX_PARTICIPANTS``)."""


class NoAccount(LedgerError):
    """A transaction was asked of a Ledger opened without an account (read-only)."""


class ContractReverted(LedgerError):
    """A contract call reverted; ``reason`` is the contract's revert string (may be empty)."""

    def __init__(self, function: str, reason: str):
        self.function, self.reason = function, reason
        super().__init__(f"{function} reverted: {reason or 'no reason given'}")


# ---------------------------------------------------------------- backends and deployment


def connect(url: str | None = None, *, timeout: float = 10.0) -> Web3:
    """``None``: a fresh embedded in-process chain (py-evm). Otherwise an HTTP JSON-RPC URL."""
    if url is None:
        from web3 import EthereumTesterProvider  # imports py-evm; only for the embedded chain

        return Web3(EthereumTesterProvider())
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout}))
    try:
        w3.eth.chain_id
    except Exception as e:  # requests' and web3's connection errors alike
        raise ChainUnreachable(f"no EVM JSON-RPC node answers at {url}: {e}") from e
    return w3


def is_embedded(w3: Web3) -> bool:
    return type(w3.provider).__name__ == "EthereumTesterProvider"


@dataclass(frozen=True)
class Deployment:
    """Where the contracts live: what peers read from the deployment file."""

    chain_id: int
    token: str
    escrow: str
    token_abi: list
    escrow_abi: list
    dev_chain: bool
    block: int = 0  # block the contracts were deployed in (where event scans may start)
    rpc_url: str | None = None  # where the chain answers, when the file was written by `gpuflex chain up`

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"format": DEPLOYMENT_FORMAT, **asdict(self)}, indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Deployment":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DeploymentError(f"no deployment file at {path}") from None
        except (OSError, ValueError) as e:
            raise DeploymentError(f"cannot read deployment file {path}: {e}") from None
        if not isinstance(data, dict) or data.pop("format", None) != DEPLOYMENT_FORMAT:
            raise DeploymentError(f"{path} is not a GPUFlex deployment file (format {DEPLOYMENT_FORMAT})")
        try:
            dep = cls(**data)
        except TypeError as e:
            raise DeploymentError(f"{path}: {e}") from None
        if not (is_address(dep.token) and is_address(dep.escrow)):
            raise DeploymentError(f"{path}: bad contract address")
        return dep


def deploy(w3: Web3, deployer, *, dev_chain: bool, initial_supply: int = 0) -> Deployment:
    """Compile and deploy GPUX and JobEscrow. ``deployer`` is a LocalAccount, or the address of
    an account the node holds unlocked (eth-tester's and anvil's prefunded accounts)."""
    gpux, escrow = compiled("GPUX"), compiled("JobEscrow")
    sender = _Sender(w3, deployer)
    token_receipt = sender.send(
        w3.eth.contract(abi=gpux.abi, bytecode=gpux.bytecode).constructor(dev_chain, initial_supply), "GPUX.deploy"
    )
    escrow_receipt = sender.send(
        w3.eth.contract(abi=escrow.abi, bytecode=escrow.bytecode).constructor(token_receipt.contractAddress),
        "JobEscrow.deploy",
    )
    return Deployment(
        chain_id=w3.eth.chain_id,
        token=token_receipt.contractAddress,
        escrow=escrow_receipt.contractAddress,
        token_abi=gpux.abi,
        escrow_abi=escrow.abi,
        dev_chain=dev_chain,
        block=token_receipt.blockNumber,
    )


def fund_gas(w3: Web3, address: str, wei: int = 10**18) -> None:
    """Send ``wei`` of the native coin to ``address`` from the node's first unlocked account
    (dev chains only: eth-tester and anvil have prefunded unlocked accounts)."""
    _Sender(w3, w3.eth.accounts[0]).send_value(to_checksum_address(address), wei)


def chain_time(w3: Web3) -> int:
    """Timestamp of the latest block: the clock deadlines are checked against."""
    return int(w3.eth.get_block("latest")["timestamp"])


def advance_time(w3: Web3, seconds: int) -> int:
    """Dev chains only: move the chain clock forward and mine a block; return the new time."""
    target = chain_time(w3) + int(seconds)
    if is_embedded(w3):
        w3.provider.ethereum_tester.time_travel(target + 1)  # py-evm mines it one second early
    else:  # anvil / hardhat
        w3.provider.make_request("evm_setNextBlockTimestamp", [target])
        w3.provider.make_request("evm_mine", [])
    return chain_time(w3)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class TxResult:
    tx_hash: str
    gas_used: int
    value: int | None = None  # what the call returned, read from its event (amount paid, refund, ...)


@dataclass(frozen=True)
class JobInfo:
    job_key: bytes
    consumer: str
    budget: int
    unallocated: int  # budget not yet allocated to a round (what a refund would return)
    price_per_unit: int
    deadline: int
    min_signers: int
    last_round: int  # latest round posted, 0 if none
    status: str  # none | open | finished | cancelled | expired

    @property
    def exists(self) -> bool:
        return self.status != "none"


@dataclass(frozen=True)
class RoundInfo:
    root: bytes
    total_units: int
    allocated: int
    paid: int

    @property
    def posted(self) -> bool:
        return self.root != b"\x00" * 32


# ---------------------------------------------------------------- the client


class Ledger:
    """The GPUX token and the job escrow of one deployment, as seen by one account.

    ``account`` signs every transaction; without one the Ledger is read-only. ``with_account``
    gives the same chain and deployment seen by another account.
    """

    def __init__(self, w3: Web3, deployment: Deployment, account=None):
        if w3.eth.chain_id != deployment.chain_id:
            raise DeploymentError(
                f"deployment is for chain {deployment.chain_id}, the node is chain {w3.eth.chain_id}"
            )
        self.w3, self.deployment, self.account = w3, deployment, account
        self.token = w3.eth.contract(address=to_checksum_address(deployment.token), abi=deployment.token_abi)
        self.escrow = w3.eth.contract(address=to_checksum_address(deployment.escrow), abi=deployment.escrow_abi)

    # -- construction

    @classmethod
    def embedded(cls, account=None, *, dev_chain: bool = True) -> "Ledger":
        """A fresh in-process chain with freshly deployed contracts (tests, single process)."""
        w3 = connect(None)
        return cls(w3, deploy(w3, w3.eth.accounts[0], dev_chain=dev_chain), account)

    @classmethod
    def from_file(cls, path: str | os.PathLike, url: str | None = None, account=None) -> "Ledger":
        """Open the deployment described in ``path`` on the node at ``url`` (default: the file's rpc_url)."""
        deployment = Deployment.load(Path(path).expanduser())
        url = url or deployment.rpc_url
        if url is None:
            raise DeploymentError(f"{path}: no rpc_url in the file (`gpuflex chain up` writes one); pass a URL")
        return cls(connect(url), deployment, account)

    @classmethod
    def for_wallet(cls, deployment: str | os.PathLike, keyfile: str | os.PathLike, password: str,
                   url: str | None = None) -> "Ledger":
        """The deployment on its node, transacting as the key file's account."""
        from ledger.wallet import load_keyfile

        return cls.from_file(deployment, url, load_keyfile(Path(keyfile).expanduser(), password))

    def with_account(self, account) -> "Ledger":
        return Ledger(self.w3, self.deployment, account)

    @property
    def address(self) -> str:
        return self._need_account().address

    @property
    def chain_id(self) -> int:
        return self.deployment.chain_id

    # -- token

    def balance(self, address: str | None = None) -> int:
        """GPUX balance (base units) of ``address``, by default this Ledger's account."""
        return self.token.functions.balanceOf(self._addr(address)).call()

    def faucet(self, amount: int) -> TxResult:
        """Dev chains only: mint ``amount`` GPUX to this account."""
        return self._transact(self.token.functions.faucet(amount), "GPUX.faucet")

    def transfer(self, to: str, amount: int) -> TxResult:
        return self._transact(self.token.functions.transfer(to_checksum_address(to), amount), "GPUX.transfer")

    def approve(self, spender: str, amount: int) -> TxResult:
        return self._transact(self.token.functions.approve(to_checksum_address(spender), amount), "GPUX.approve")

    # -- escrow: consumer

    def open_job(
        self,
        job_key: bytes,
        budget: int,
        price_per_unit: int,
        deadline: int,
        *,
        min_signers: int = 1,
        permit: bool = True,
    ) -> TxResult:
        """Escrow ``budget`` GPUX for ``job_key`` in one transaction (EIP-2612 permit), or with
        ``permit=False`` after a separate approve (sent here when the allowance is short).
        ``deadline`` is a chain timestamp (see ``chain_time``); ``price_per_unit`` is GPUX base
        units per work unit."""
        f = self.escrow.functions
        if permit:
            nonce = self.token.functions.nonces(self.address).call()
            permit_deadline = self.chain_time() + PERMIT_TTL
            v, r, s = sign_permit(
                self.account, self.chain_id, self.token.address, self.escrow.address, budget, nonce, permit_deadline
            )
            fn = f.open_job_with_permit(job_key, budget, price_per_unit, deadline, min_signers, permit_deadline, v, r, s)
            return self._transact(fn, "JobEscrow.open_job_with_permit")
        if self.token.functions.allowance(self.address, self.escrow.address).call() < budget:
            self.approve(self.escrow.address, budget)
        return self._transact(f.open_job(job_key, budget, price_per_unit, deadline, min_signers), "JobEscrow.open_job")

    def finish_job(self, job_key: bytes) -> TxResult:
        """Consumer: close the job; returns (in ``value``) the refund of the unallocated budget."""
        return self._transact(self.escrow.functions.finish_job(job_key), "JobEscrow.finish_job", "JobClosed", "refund")

    def cancel_job(self, job_key: bytes) -> TxResult:
        return self._transact(self.escrow.functions.cancel_job(job_key), "JobEscrow.cancel_job", "JobClosed", "refund")

    def refund_expired(self, job_key: bytes) -> TxResult:
        """Anyone, after the deadline: refund the unallocated budget to the job's consumer."""
        return self._transact(
            self.escrow.functions.refund_expired(job_key), "JobEscrow.refund_expired", "JobClosed", "refund"
        )

    # -- escrow: rounds and claims

    def sign_round(self, job_key: bytes, round_no: int, tree: ContributionTree) -> RoundAttestation:
        """This account (a leaf of ``tree``) endorses the round; pass the result to whoever posts."""
        return sign_round(self._need_account(), self.chain_id, self.escrow.address, job_key, round_no, tree)

    def quorum(self, job_key: bytes, participants: int) -> int:
        """Signatures needed to post a round of ``participants`` leaves for this job."""
        return self.escrow.functions.quorum(job_key, participants).call()

    def post_round(
        self,
        job_key: bytes,
        round_no: int,
        tree: ContributionTree,
        attestations: Sequence[RoundAttestation],
        *,
        root: bytes | None = None,
        participants: int | None = None,
        total_units: int | None = None,
    ) -> TxResult:
        """Post the round's root with the participants' attestations (any account may send it;
        they are sorted and de-duplicated here). ``value``: GPUX allocated to the round.
        ``root``/``participants``/``total_units`` override what ``tree`` says (tests only)."""
        if tree.participants > MAX_PARTICIPANTS:
            raise RoundTooLarge(f"a round holds at most {MAX_PARTICIPANTS} wallets, this one has {tree.participants}")
        atts = order_attestations(attestations)
        fn = self.escrow.functions.post_round(
            job_key,
            round_no,
            tree.root if root is None else root,
            tree.participants if participants is None else participants,
            tree.total_units if total_units is None else total_units,
            [a.as_contract_arg() for a in atts],
        )
        return self._transact(fn, "JobEscrow.post_round", "RoundPosted", "allocated")

    def claim(self, job_key: bytes, round_no: int, tree: ContributionTree | None = None, *,
              units: int | None = None, proof: Sequence[bytes] | None = None) -> TxResult:
        """Collect this account's pay for a round, from the round's tree (or explicit units and
        proof). ``value``: GPUX paid."""
        if tree is not None:
            units, proof = tree.units(self.address), tree.proof(self.address)
        if units is None or proof is None:
            raise ValueError("claim needs the round's tree, or units and proof")
        fn = self.escrow.functions.claim(job_key, round_no, units, list(proof))
        return self._transact(fn, "JobEscrow.claim", "Claimed", "amount")

    def claim_many(self, job_key: bytes, trees: dict[int, ContributionTree]) -> TxResult:
        """Collect this account's pay for several rounds ({round: tree}) in one transaction
        (rounds where this account is no leaf or already claimed are skipped). ``value``: total
        GPUX paid."""
        items = [
            (r, t.units(self.address), t.proof(self.address))
            for r, t in sorted(trees.items())
            if self.address in t and not self.has_claimed(job_key, r)
        ]
        if not items:
            return TxResult(tx_hash="", gas_used=0, value=0)
        results = [
            self._transact(
                self.escrow.functions.claim_many(job_key, items[i : i + MAX_CLAIMS]),
                "JobEscrow.claim_many", "Claimed", "amount", total=True,
            )
            for i in range(0, len(items), MAX_CLAIMS)
        ]
        return TxResult(
            tx_hash=results[-1].tx_hash, gas_used=sum(r.gas_used for r in results), value=sum(r.value for r in results)
        )

    def has_claimed(self, job_key: bytes, round_no: int, address: str | None = None) -> bool:
        return self.escrow.functions.claimed(job_key, round_no, self._addr(address)).call()

    # -- escrow: reads

    def job(self, job_key: bytes) -> JobInfo:
        j = self.escrow.functions.jobs(job_key).call()
        return JobInfo(job_key, j[0], *j[1:7], status=JOB_STATUS.get(j[7], str(j[7])))

    def round(self, job_key: bytes, round_no: int) -> RoundInfo:
        return RoundInfo(*self.escrow.functions.rounds(job_key, round_no).call())

    def chain_time(self) -> int:
        return chain_time(self.w3)

    # -- plumbing

    def _need_account(self):
        if self.account is None:
            raise NoAccount("this Ledger has no wallet; open it with an account to send transactions")
        return self.account

    def _addr(self, address: str | None) -> str:
        return self._need_account().address if address is None else to_checksum_address(address)

    def _transact(self, fn, name: str, event: str | None = None, field: str | None = None, total: bool = False):
        receipt = _Sender(self.w3, self._need_account()).send(fn, name)
        value = None
        if event is not None:
            logs = getattr(self.escrow.events, event)().process_receipt(receipt, errors=_DISCARD)
            values = [log["args"][field] for log in logs]
            value = sum(values) if total else (values[0] if values else None)
        return TxResult(tx_hash=Web3.to_hex(receipt.transactionHash), gas_used=receipt.gasUsed, value=value)


_NONCE_LOCKS: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


class _Sender:
    """Builds, signs (locally, or by the node for an unlocked address), sends and waits."""

    def __init__(self, w3: Web3, account, *, receipt_timeout: float = 120.0):
        self.w3, self.account, self.receipt_timeout = w3, account, receipt_timeout
        self.address = to_checksum_address(account if isinstance(account, str) else account.address)

    def send(self, fn, name: str):
        try:
            with _NONCE_LOCKS[self.address]:  # two threads sending for one account must not share a nonce
                tx = fn.build_transaction({"from": self.address, "nonce": self._nonce()})  # estimates gas: reverts here
                tx_hash = self._submit(tx)
            return self._wait(tx_hash, name, fn)
        except ContractReverted:
            raise
        except Exception as e:
            reason = revert_reason(e)
            if reason is None:
                raise
            raise ContractReverted(name, reason) from None

    def send_value(self, to: str, wei: int):
        with _NONCE_LOCKS[self.address]:
            tx = {"from": self.address, "to": to, "value": wei, "nonce": self._nonce(), "gas": 21000, **self._fees()}
            tx_hash = self._submit(tx)
        return self._wait(tx_hash, "transfer of native coin", None)

    def _nonce(self) -> int:
        return self.w3.eth.get_transaction_count(self.address, "pending")

    def _fees(self) -> dict:
        base = self.w3.eth.get_block("latest").get("baseFeePerGas")
        if base is None:
            return {"gasPrice": self.w3.eth.gas_price}
        tip = 10**9
        return {"maxFeePerGas": 2 * base + tip, "maxPriorityFeePerGas": tip}

    def _submit(self, tx: dict):
        if isinstance(self.account, str):
            return self.w3.eth.send_transaction(tx)
        return self.w3.eth.send_raw_transaction(self.account.sign_transaction(tx).raw_transaction)

    def _wait(self, tx_hash, name: str, fn):
        try:
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=self.receipt_timeout)
        except TimeExhausted as e:
            raise LedgerError(f"{name}: transaction {Web3.to_hex(tx_hash)} not mined in {self.receipt_timeout:.0f}s") from e
        if receipt.status != 1:
            # Mined but failed (state changed since the estimate): replay it to learn why.
            reason = ""
            if fn is not None:
                try:
                    fn.call({"from": self.address}, block_identifier=receipt.blockNumber - 1)
                except Exception as e:
                    reason = revert_reason(e) or ""
            raise ContractReverted(name, reason or "transaction failed")
        return receipt


def revert_reason(exc: BaseException) -> str | None:
    """The revert reason of an exception from any backend, or None if it is not a revert."""
    try:
        from eth_tester.exceptions import TransactionFailed
    except ImportError:  # pragma: no cover - eth-tester is only needed for the embedded chain
        TransactionFailed = ()
    if isinstance(exc, ContractLogicError):
        msg = exc.message if isinstance(getattr(exc, "message", None), str) else str(exc)
    elif TransactionFailed and isinstance(exc, TransactionFailed):
        arg = exc.args[0] if exc.args else ""
        msg = arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)
    elif isinstance(exc, (ValueError, Web3Exception)) and "revert" in str(exc).lower():
        arg = exc.args[0] if exc.args else str(exc)
        msg = arg.get("message", str(arg)) if isinstance(arg, dict) else str(arg)
    else:
        return None
    for prefix in ("execution reverted: ", "execution reverted", "VM Exception while processing transaction: revert "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg.strip()
