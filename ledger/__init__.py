"""Money and contributions (GPUX token, job escrow, Merkle-batched payouts).

Not built yet: the on-chain ledger is issue 3. Nothing in the swarm depends on it today.
"""
