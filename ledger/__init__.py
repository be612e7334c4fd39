"""Money and contributions: the GPUX token, job escrow with Merkle-batched rounds, payouts.

Where things live:

- ``ledger/contracts/GPUX.vy``, ``JobEscrow.vy`` -- the Vyper contracts (AGPL-3.0, they import
  snekmate; see ``ledger/contracts/LICENSE``); ``ledger.compile`` compiles them in process.
- ``ledger.chain`` -- ``Ledger`` (the client: token, escrow, rounds, claims, refunds),
  ``Deployment`` (the deployment file), ``connect``/``deploy`` (backends), the errors.
- ``ledger.merkle`` -- ``ContributionTree``: a round's (wallet, units) leaves, root and proofs.
- ``ledger.signing`` -- EIP-712 round attestations and permits (``job_key`` too).
- ``ledger.wallet`` -- encrypted key files (``create_keyfile``, ``load_keyfile``).

The three names below are imported lazily, so ``import ledger`` stays cheap.
"""

__all__ = ["Ledger", "Deployment", "ContributionTree"]


def __getattr__(name):
    if name in ("Ledger", "Deployment"):
        from ledger import chain

        return getattr(chain, name)
    if name == "ContributionTree":
        from ledger.merkle import ContributionTree

        return ContributionTree
    raise AttributeError(f"module 'ledger' has no attribute {name!r}")
