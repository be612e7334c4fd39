# pragma version ~=0.4.3
# pragma nonreentrancy off
# SPDX-License-Identifier: AGPL-3.0-only  (imports snekmate; see LICENSE beside this file)
"""
@title GPUX, the token GPUFlex jobs are paid in
@notice A plain ERC-20 (18 decimals) with EIP-2612 `permit`, built from snekmate's audited
        `erc20` module. The deployer is the owner and the only minter. `faucet` mints test
        tokens to the caller, and only on a contract deployed with `dev_chain = True` (the
        embedded chain and local dev chains); on any other deployment it always reverts.
"""

from snekmate.auth import ownable
from snekmate.tokens import erc20

initializes: ownable
initializes: erc20[ownable := ownable]

exports: erc20.__interface__

# @dev Deployed for a development chain: the faucet works.
dev_chain: public(immutable(bool))

# @dev The most one faucet call mints: 1,000,000 GPUX.
FAUCET_LIMIT: public(constant(uint256)) = 10**24


@deploy
def __init__(dev_chain_: bool, initial_supply: uint256):
    ownable.__init__()
    erc20.__init__("GPUX", "GPUX", 18, "GPUX", "1")
    dev_chain = dev_chain_
    if initial_supply > 0:
        erc20._mint(msg.sender, initial_supply)


@external
def faucet(amount: uint256):
    """
    @dev Mints `amount` GPUX to the caller. Development chains only.
    """
    assert dev_chain, "gpux: faucet is disabled on this chain"
    assert amount <= FAUCET_LIMIT, "gpux: faucet amount too large"
    erc20._mint(msg.sender, amount)
