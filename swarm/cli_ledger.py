"""``gpuflex wallet ...`` and ``gpuflex chain ...``: key files and the local dev chain.

Passwords come from ``$GPUFLEX_WALLET_PASSWORD`` or a hidden prompt, never from a flag (flags
land in shell history and process lists) and are never printed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from dht.errors import GPUFlexError

wallet_app = typer.Typer(no_args_is_help=True, help="Key files (encrypted keystores) and GPUX balances.")
chain_app = typer.Typer(no_args_is_help=True, help="The local dev chain (anvil) with the contracts deployed.")

KeyfileOption = typer.Option(Path("~/.gpuflex/wallet.json"), "--keyfile", help="Encrypted keystore (eth-account).")
DeploymentOption = typer.Option(Path("~/.gpuflex/deployment.json"), "--deployment",
                                help="Deployment file written by `gpuflex chain up`.")


def _fail(error: GPUFlexError) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


def _password(confirm: bool = False) -> str:
    if os.environ.get("GPUFLEX_WALLET_PASSWORD"):
        return os.environ["GPUFLEX_WALLET_PASSWORD"]
    return typer.prompt("wallet password", hide_input=True, confirmation_prompt=confirm)


def open_ledger(deployment: Path, keyfile: Path | None, rpc: str | None = None):
    """The chain client: read-only without a key file, else as its account (password asked)."""
    from ledger.chain import Ledger

    if keyfile is None:
        return Ledger.from_file(deployment, rpc)
    return Ledger.for_wallet(deployment, keyfile, _password(), rpc)


def escrow_command(peer: str, keyfile: Path, deployment: Path, action) -> tuple[float, str]:
    """Run ``action(client, ledger) -> base units`` for a paid-job command; returns (GPUX, address)."""
    from ledger.chain import GPUX
    from swarm.client import Client

    try:
        ledger = open_ledger(deployment, keyfile, None)
        with Client(peer) as client:
            amount = action(client, ledger)
    except GPUFlexError as e:
        _fail(e)
    return amount / GPUX, ledger.address


@wallet_app.command("new")
def wallet_new(keyfile: Path = KeyfileOption) -> None:
    """Create a key file (never overwrites one); prints its address."""
    from ledger.wallet import create_keyfile

    try:
        address = create_keyfile(keyfile.expanduser(), _password(confirm=True))
    except GPUFlexError as e:
        _fail(e)
    typer.echo(f"{address}  ({keyfile})")


@wallet_app.command("balance")
def wallet_balance(
    keyfile: Path = KeyfileOption, deployment: Path = DeploymentOption, rpc: Optional[str] = typer.Option(None)
) -> None:
    """GPUX held by the key file's address (no password needed)."""
    from ledger.chain import GPUX
    from ledger.wallet import keyfile_address

    try:
        address = keyfile_address(keyfile.expanduser())
        balance = open_ledger(deployment, None, rpc).balance(address)
    except GPUFlexError as e:
        _fail(e)
    typer.echo(f"{address}: {balance / GPUX:,.6f} GPUX")


@wallet_app.command("faucet")
def wallet_faucet(
    amount: float = typer.Argument(..., min=0.0, help="GPUX to mint (dev chains only)."),
    keyfile: Path = KeyfileOption,
    deployment: Path = DeploymentOption,
    rpc: Optional[str] = typer.Option(None),
) -> None:
    """Dev chains only: gas for the address and freshly minted GPUX."""
    from ledger.chain import GPUX, fund_gas

    try:
        ledger = open_ledger(deployment, keyfile, rpc)
        fund_gas(ledger.w3, ledger.address)
        ledger.faucet(int(amount * GPUX))
        balance = ledger.balance()
    except GPUFlexError as e:
        _fail(e)
    typer.echo(f"{ledger.address}: {balance / GPUX:,.6f} GPUX")


@wallet_app.command("claim")
def wallet_claim(
    job_id: str = typer.Argument(..., help="The paid job to collect this wallet's pay from."),
    peer: str = typer.Option(..., "--peer", help="Multiaddr of any peer of the swarm."),
    keyfile: Path = KeyfileOption,
    deployment: Path = DeploymentOption,
) -> None:
    """Collect what this wallet earned in a job and has not claimed yet (peers claim at the end)."""
    paid, address = escrow_command(peer, keyfile, deployment, lambda client, ledger: client.claim(job_id, ledger))
    typer.echo(f"claimed {paid:,.6f} GPUX for {address}")


@chain_app.command("up")
def chain_up(
    deployment: Path = DeploymentOption,
    port: int = typer.Option(0, "--port", help="JSON-RPC port on 127.0.0.1 (0: any free port)."),
) -> None:
    """Start anvil on 127.0.0.1, deploy GPUX and JobEscrow, write the deployment file; run until stopped."""
    from ledger.chain import connect, deploy
    from ledger.devchain import Anvil

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with Anvil(port, log=deployment.expanduser().with_suffix(".anvil.log")) as node:
            w3 = connect(node.url)
            dep = deploy(w3, w3.eth.accounts[0], dev_chain=True)
            replace(dep, rpc_url=node.url).save(deployment.expanduser())
            typer.echo(f"chain {dep.chain_id} at {node.url}: GPUX {dep.token}, JobEscrow {dep.escrow}")
            typer.echo(f"deployment written to {deployment.expanduser()}")
            sys.stdout.flush()
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    except GPUFlexError as e:
        _fail(e)
