# pragma version ~=0.4.3
# pragma nonreentrancy off
# SPDX-License-Identifier: AGPL-3.0-only  (imports snekmate; see LICENSE beside this file)
"""
@title GPUFlex job escrow: Merkle-batched rounds, claims and refunds
@notice
    A consumer escrows a GPUX budget for a job (`open_job`, or `open_job_with_permit` so that
    funding needs no separate approve transaction). After every training round ONE Merkle root
    over the round's (wallet, work units) leaves is posted (`post_round`), endorsed by EIP-712
    signatures of a strict majority of that round's participants. Each contributor then pulls
    its own payout with a Merkle proof (`claim`). The consumer gets the unspent budget back when
    it finishes or cancels the job; after the deadline anyone may trigger that refund.

    Participants of a round = the leaves of the round's tree. The signed `RoundRoot` struct
    binds (chain id, this contract, job key, round, root, number of leaves, total units); every
    signature must come from a distinct wallet that proves, with a Merkle proof, that it is a
    leaf of the very root it signs. A round needs `participants // 2 + 1` such signatures and at
    least the job's `min_signers` (a floor the consumer sets). The posting gas therefore grows
    with the quorum signatures only, never with the number of leaves.

    Why that is safe, and what it assumes: a signature is bound by EIP-712 to this chain, this
    escrow, one job, one round and the exact (root, participants, total units), so it cannot be
    replayed elsewhere or re-used with other numbers; a signer must be a leaf of the root it signs
    and signers must be strictly ascending (no one counts twice); rounds only move forward and
    stop at finish, cancel or the deadline. The contract cannot see the swarm, so `participants`
    is what the signers declare: honest peers sign only a struct whose root and leaf count they
    rebuilt themselves from the round's receipt. A coalition that controls a majority of the
    leaves it declares can therefore post a round without the others -- which is why the consumer
    sets `min_signers` (no round with fewer distinct signing wallets is ever accepted) and why a
    round can never move more than price * total_units, nor more than the unallocated escrow.

    Leaves are OpenZeppelin "standard" leaves: keccak256(keccak256(abi_encode(wallet, units))),
    in a sorted-pair keccak256 tree (snekmate's `merkle_proof_verification`). The double hash
    keeps a 64-byte inner node from ever passing for a leaf.

    Money: a round is allocated min(price_per_unit * total_units, what is still unallocated)
    when it is posted, so an over-budget round is capped, not reverted; each leaf is then paid
    its pro-rata share allocated * units / total_units (exactly price * units when the round
    was not capped), once per (job, round, wallet).
"""

from ethereum.ercs import IERC20
from snekmate.tokens.interfaces import IERC20Permit
from snekmate.utils import ecdsa
from snekmate.utils import merkle_proof_verification
from snekmate.utils import eip712_domain_separator

initializes: eip712_domain_separator

exports: eip712_domain_separator.eip712Domain


MAX_SIGNERS: constant(uint256) = 128
MAX_PARTICIPANTS: public(constant(uint256)) = 2 * MAX_SIGNERS - 1
MAX_PROOF_DEPTH: constant(uint256) = 8  # enough for MAX_PARTICIPANTS (255) leaves
MAX_CLAIMS: constant(uint256) = 64  # rounds per claim_many

STATUS_NONE: constant(uint8) = 0
STATUS_OPEN: constant(uint8) = 1
STATUS_FINISHED: constant(uint8) = 2
STATUS_CANCELLED: constant(uint8) = 3
STATUS_EXPIRED: constant(uint8) = 4

ROUND_TYPEHASH: public(constant(bytes32)) = keccak256(
    "RoundRoot(bytes32 jobKey,uint256 round,bytes32 root,uint256 participants,uint256 totalUnits)"
)


struct Job:
    consumer: address
    budget: uint256
    unallocated: uint256  # not yet allocated to any round; this is what a refund returns
    price_per_unit: uint256
    deadline: uint256  # unix seconds; no round may be posted after it
    min_signers: uint256
    last_round: uint256  # the latest round posted; 0 while none was
    status: uint8


struct Round:
    root: bytes32
    total_units: uint256
    allocated: uint256
    paid: uint256


# @dev One participant's endorsement of a round: its own leaf (units + proof) and its
# EIP-712 signature over the round's `RoundRoot` struct.
struct Attestation:
    units: uint256
    proof: DynArray[bytes32, MAX_PROOF_DEPTH]
    v: uint8
    r: bytes32
    s: bytes32


struct ClaimItem:
    round: uint256
    units: uint256
    proof: DynArray[bytes32, MAX_PROOF_DEPTH]


event JobOpened:
    job_key: indexed(bytes32)
    consumer: indexed(address)
    budget: uint256
    price_per_unit: uint256
    deadline: uint256


event RoundPosted:
    job_key: indexed(bytes32)
    round: indexed(uint256)
    root: bytes32
    participants: uint256
    total_units: uint256
    allocated: uint256


event Claimed:
    job_key: indexed(bytes32)
    round: indexed(uint256)
    wallet: indexed(address)
    units: uint256
    amount: uint256


event JobClosed:
    job_key: indexed(bytes32)
    status: uint8
    refund: uint256


token: public(immutable(address))
jobs: public(HashMap[bytes32, Job])
rounds: public(HashMap[bytes32, HashMap[uint256, Round]])
claimed: public(HashMap[bytes32, HashMap[uint256, HashMap[address, bool]]])


@deploy
def __init__(token_: address):
    eip712_domain_separator.__init__("GPUFlex JobEscrow", "1")
    token = token_


# ---------------------------------------------------------------- funding

@external
def open_job(job_key: bytes32, budget: uint256, price_per_unit: uint256, deadline: uint256, min_signers: uint256):
    """
    @dev Escrows `budget` GPUX from the caller, who must have approved this contract.
    """
    self._open(job_key, budget, price_per_unit, deadline, min_signers)
    self._pull(budget)


@external
def open_job_with_permit(
    job_key: bytes32,
    budget: uint256,
    price_per_unit: uint256,
    deadline: uint256,
    min_signers: uint256,
    permit_deadline: uint256,
    v: uint8,
    r: bytes32,
    s: bytes32,
):
    """
    @dev Same as `open_job`, approving with the caller's EIP-2612 permit in the same transaction.
         The permit is skipped when the allowance already suffices, so a front-run permit
         cannot block the job.
    """
    self._open(job_key, budget, price_per_unit, deadline, min_signers)
    if staticcall IERC20(token).allowance(msg.sender, self) < budget:
        extcall IERC20Permit(token).permit(msg.sender, self, budget, permit_deadline, v, r, s)
    self._pull(budget)


@internal
def _open(job_key: bytes32, budget: uint256, price_per_unit: uint256, deadline: uint256, min_signers: uint256):
    assert job_key != empty(bytes32), "escrow: empty job key"
    assert self.jobs[job_key].status == STATUS_NONE, "escrow: job key already used"
    assert budget > 0, "escrow: budget is zero"
    assert price_per_unit > 0, "escrow: price is zero"
    assert deadline > block.timestamp, "escrow: deadline is in the past"
    assert min_signers > 0 and min_signers <= MAX_SIGNERS, "escrow: bad min_signers"
    self.jobs[job_key] = Job(
        consumer=msg.sender,
        budget=budget,
        unallocated=budget,
        price_per_unit=price_per_unit,
        deadline=deadline,
        min_signers=min_signers,
        last_round=0,
        status=STATUS_OPEN,
    )
    log JobOpened(job_key=job_key, consumer=msg.sender, budget=budget, price_per_unit=price_per_unit, deadline=deadline)


@internal
def _pull(budget: uint256):
    assert extcall IERC20(token).transferFrom(msg.sender, self, budget), "escrow: transfer failed"


# ---------------------------------------------------------------- rounds

@external
def post_round(
    job_key: bytes32,
    round: uint256,
    root: bytes32,
    participants: uint256,
    total_units: uint256,
    attestations: DynArray[Attestation, MAX_SIGNERS],
) -> uint256:
    """
    @dev Records one round's Merkle root. Anyone may submit; the attestations are the authority.
         Attestations must be ordered by strictly ascending signer address (one per signer).
    @return uint256 The GPUX allocated to the round (capped by the unallocated budget).
    """
    job: Job = self.jobs[job_key]
    assert job.status == STATUS_OPEN, "escrow: job is not open"
    assert block.timestamp <= job.deadline, "escrow: job deadline has passed"
    assert round > job.last_round, "escrow: round already posted or out of order"
    assert root != empty(bytes32), "escrow: empty root"
    assert participants > 0 and participants <= MAX_PARTICIPANTS, "escrow: bad participant count"
    assert total_units > 0, "escrow: no work units"
    assert len(attestations) >= self._quorum(participants, job.min_signers), "escrow: quorum not reached"

    digest: bytes32 = eip712_domain_separator._hash_typed_data_v4(
        keccak256(abi_encode(ROUND_TYPEHASH, job_key, round, root, participants, total_units))
    )
    previous: address = empty(address)
    for a: Attestation in attestations:
        signer: address = ecdsa._recover_vrs(digest, convert(a.v, uint256), convert(a.r, uint256), convert(a.s, uint256))
        assert signer != empty(address), "escrow: invalid signature"
        assert convert(signer, uint160) > convert(previous, uint160), "escrow: signers not strictly ascending"
        assert merkle_proof_verification._verify(a.proof, root, self._leaf(signer, a.units)), "escrow: signer is not a participant of the round"
        previous = signer

    allocated: uint256 = min(job.price_per_unit * total_units, job.unallocated)
    self.jobs[job_key].unallocated = job.unallocated - allocated
    self.jobs[job_key].last_round = round
    self.rounds[job_key][round] = Round(
        root=root, total_units=total_units, allocated=allocated, paid=0
    )
    log RoundPosted(
        job_key=job_key, round=round, root=root, participants=participants, total_units=total_units, allocated=allocated
    )
    return allocated


@external
def claim(job_key: bytes32, round: uint256, units: uint256, proof: DynArray[bytes32, MAX_PROOF_DEPTH]) -> uint256:
    """
    @dev Pays the caller its share of a posted round, once. Works after the job closed too:
         what was allocated to a round belongs to its contributors.
    @return uint256 The GPUX paid.
    """
    amount: uint256 = self._settle(job_key, round, units, proof)
    self._pay(amount)
    return amount


@external
def claim_many(job_key: bytes32, claims: DynArray[ClaimItem, MAX_CLAIMS]) -> uint256:
    """
    @dev `claim` for several rounds of one job, with a single token transfer.
    @return uint256 The GPUX paid in total.
    """
    total: uint256 = 0
    for c: ClaimItem in claims:
        total += self._settle(job_key, c.round, c.units, c.proof)
    self._pay(total)
    return total


@internal
def _settle(job_key: bytes32, round: uint256, units: uint256, proof: DynArray[bytes32, MAX_PROOF_DEPTH]) -> uint256:
    rnd: Round = self.rounds[job_key][round]
    assert rnd.root != empty(bytes32), "escrow: no such round"
    assert not self.claimed[job_key][round][msg.sender], "escrow: already claimed"
    assert merkle_proof_verification._verify(proof, rnd.root, self._leaf(msg.sender, units)), "escrow: invalid Merkle proof"
    self.claimed[job_key][round][msg.sender] = True

    amount: uint256 = rnd.allocated * units // rnd.total_units
    amount = min(amount, rnd.allocated - rnd.paid)
    self.rounds[job_key][round].paid = rnd.paid + amount
    log Claimed(job_key=job_key, round=round, wallet=msg.sender, units=units, amount=amount)
    return amount


@internal
def _pay(amount: uint256):
    if amount > 0:
        assert extcall IERC20(token).transfer(msg.sender, amount), "escrow: transfer failed"


# ---------------------------------------------------------------- refunds

@external
def finish_job(job_key: bytes32) -> uint256:
    """
    @dev The consumer closes a finished job; the unallocated budget goes back to it.
    """
    return self._close_by_consumer(job_key, STATUS_FINISHED)


@external
def cancel_job(job_key: bytes32) -> uint256:
    """
    @dev The consumer cancels a job; the unallocated budget goes back to it.
    """
    return self._close_by_consumer(job_key, STATUS_CANCELLED)


@external
def refund_expired(job_key: bytes32) -> uint256:
    """
    @dev Anyone may close a job after its deadline; the unallocated budget goes to the
         consumer (the whole budget when no round was ever posted).
    """
    job: Job = self.jobs[job_key]
    assert job.status == STATUS_OPEN, "escrow: job is not open"
    assert block.timestamp > job.deadline, "escrow: deadline not reached"
    return self._close(job_key, job, STATUS_EXPIRED)


@internal
def _close_by_consumer(job_key: bytes32, status: uint8) -> uint256:
    job: Job = self.jobs[job_key]
    assert job.status == STATUS_OPEN, "escrow: job is not open"
    assert msg.sender == job.consumer, "escrow: only the consumer"
    return self._close(job_key, job, status)


@internal
def _close(job_key: bytes32, job: Job, status: uint8) -> uint256:
    refund: uint256 = job.unallocated
    self.jobs[job_key].status = status
    self.jobs[job_key].unallocated = 0
    log JobClosed(job_key=job_key, status=status, refund=refund)
    if refund > 0:
        assert extcall IERC20(token).transfer(job.consumer, refund), "escrow: transfer failed"
    return refund


# ---------------------------------------------------------------- views

@external
@view
def quorum(job_key: bytes32, participants: uint256) -> uint256:
    """
    @dev Signatures a round with `participants` leaves needs for this job.
    """
    return self._quorum(participants, self.jobs[job_key].min_signers)


@external
@view
def round_digest(job_key: bytes32, round: uint256, root: bytes32, participants: uint256, total_units: uint256) -> bytes32:
    """
    @dev The EIP-712 digest participants sign for a round (for off-chain cross-checks).
    """
    return eip712_domain_separator._hash_typed_data_v4(
        keccak256(abi_encode(ROUND_TYPEHASH, job_key, round, root, participants, total_units))
    )


@external
@pure
def leaf_hash(wallet: address, units: uint256) -> bytes32:
    return self._leaf(wallet, units)


@external
@pure
def verify_proof(root: bytes32, leaf: bytes32, proof: DynArray[bytes32, MAX_PROOF_DEPTH]) -> bool:
    return merkle_proof_verification._verify(proof, root, leaf)


@internal
@pure
def _quorum(participants: uint256, min_signers: uint256) -> uint256:
    return max(participants // 2 + 1, min_signers)


@internal
@pure
def _leaf(wallet: address, units: uint256) -> bytes32:
    return keccak256(keccak256(abi_encode(wallet, units)))
