"""`gpuflex chain up` and `gpuflex wallet ...` as a user runs them, on a real anvil node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from ledger.devchain import anvil_missing

pytestmark = pytest.mark.timeout(180)

NO_ANVIL = anvil_missing()


def gpuflex(*args, env):
    return subprocess.run([sys.executable, "-m", "swarm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.skipif(NO_ANVIL is not None, reason=f"anvil is not installed: {NO_ANVIL}")
def test_chain_up_wallet_new_faucet_balance(tmp_path):
    env = {**os.environ, "GPUFLEX_WALLET_PASSWORD": "correct horse battery staple"}
    deployment, keyfile = tmp_path / "deployment.json", tmp_path / "wallet.json"
    chain = subprocess.Popen([sys.executable, "-m", "swarm.cli", "chain", "up", "--deployment", str(deployment)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [chain.stdout.readline(), chain.stdout.readline()]  # blocks until the chain is deployed
        assert lines[0].startswith("chain 31337 at http://127.0.0.1:") and "deployment written" in lines[1], lines
        anvil = [p for p in psutil.Process(chain.pid).children(recursive=True) if "anvil" in p.name()]
        assert len(anvil) == 1

        made = gpuflex("wallet", "new", "--keyfile", str(keyfile), env=env)
        address = made.stdout.split()[0]
        assert made.returncode == 0 and address.startswith("0x")
        assert oct(keyfile.stat().st_mode & 0o777) == "0o600"
        assert "correct horse" not in keyfile.read_text()
        again = gpuflex("wallet", "new", "--keyfile", str(keyfile), env=env)
        assert again.returncode == 1 and "already exists" in again.stderr  # a key file is never overwritten

        funded = gpuflex("wallet", "faucet", "120", "--keyfile", str(keyfile), "--deployment", str(deployment), env=env)
        assert funded.returncode == 0, funded.stderr
        balance = gpuflex("wallet", "balance", "--keyfile", str(keyfile), "--deployment", str(deployment), env=env)
        assert balance.stdout.strip() == f"{address}: 120.000000 GPUX"
        wrong = gpuflex("wallet", "faucet", "1", "--keyfile", str(keyfile), "--deployment", str(deployment),
                        env={**env, "GPUFLEX_WALLET_PASSWORD": "wrong"})
        assert wrong.returncode == 1 and wrong.stderr.startswith("error: wrong password")
    finally:
        chain.send_signal(signal.SIGTERM)
        chain.wait(timeout=30)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in anvil)  # anvil went with it
