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

        # a paid submit that can not be paid is one clear line before any peer is dialled (the
        # peer address below answers nothing), and nothing is escrowed
        job = tmp_path / "job.yaml"
        (tmp_path / "d.csv").write_text("a,b,y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)))
        job.write_text("name: x\ntask: classification\nmodel: {catalog: mlp}\n"
                       "data: {path: d.csv, format: csv, label_column: y}\n"
                       "training: {rounds: 2, local_steps: 2, batch_size: 4, lr: 0.1}\n")
        dead = "/ip4/127.0.0.1/tcp/1/p2p/QmRNKNQtt7qGS2bMCjJZrGd8Ut2xtGGat4GQYaEWVeJkp5"
        paid = ["job", "submit", str(job), "--peer", dead, "--wallet", str(keyfile), "--deployment", str(deployment)]
        cases = {
            "wrong password": (["--budget", "10"], {"GPUFLEX_WALLET_PASSWORD": "wrong"}, "wrong password"),
            "unfunded": (["--budget", "500"], {}, "holds 120.000000 GPUX, less than the --budget of 500"),
            "budget too small": (["--budget", "1e-17"], {}, "too small for 128 samples"),
        }
        for case, (extra, env_change, fragment) in cases.items():
            done = gpuflex(*paid, *extra, env={**env, **env_change})
            assert done.returncode == 1 and done.stderr.count("\n") == 1, (case, done.stderr)
            assert fragment in done.stderr and "Traceback" not in done.stderr, (case, done.stderr)
        after = gpuflex("wallet", "balance", "--keyfile", str(keyfile), "--deployment", str(deployment), env=env)
        assert after.stdout.strip() == f"{address}: 120.000000 GPUX"  # nothing escrowed
        # and a funded submit gets as far as the peer, which does not answer: one line too
        done = gpuflex(*paid, "--budget", "10", env=env)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "could not" in done.stderr
    finally:
        chain.send_signal(signal.SIGTERM)
        chain.wait(timeout=30)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in anvil)  # anvil went with it
