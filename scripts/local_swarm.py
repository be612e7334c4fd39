"""Run a local swarm: N real peers (separate processes, 127.0.0.1) train a job end to end.

    python scripts/local_swarm.py --peers 3 --job examples/digits-mlp.yaml --out out/demo

Peer 0 starts first; the others bootstrap from its multiaddr. The job is submitted through peer 0
and the result fetched through the last peer, all with the `gpuflex` CLI, exactly as a user would.
``LocalSwarm`` is also the launcher the multi-process tests use; it always reaps its children.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO_PASSWORD = "gpuflex local demo"
MADDR_LINE = re.compile(r"^listening on (/ip4/127\.0\.0\.1/\S+)$")
METRICS_LINE = re.compile(r"^metrics on (http://\S+)$")


def gpuflex_command() -> list[str]:
    """The CLI of the interpreter running us (works in a venv without activating it)."""
    return [sys.executable, "-m", "swarm.cli"]


class LocalSwarm:
    """Starts peers as child processes and reaps them on exit, whatever happens."""

    def __init__(self, root: str | os.PathLike | None = None, *, env: dict | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="gpuflex-swarm-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.procs: list[subprocess.Popen] = []  # the current process of each peer
        self._launched: list[subprocess.Popen] = []  # every process ever started (all reaped)
        self._args: list[list[str]] = []
        self.maddrs: list[str] = []
        self.metrics_urls: list[str] = []
        self.chain = None
        self.wallets: list[Path] = []

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start_peer(self, *extra: str, timeout: float = 90.0, paid: bool = True,
                   command: list[str] | None = None) -> str:
        """Start one more peer (bootstrapped from peer 0) and return its multiaddr.

        Once ``start_chain`` ran, every peer gets its own wallet (``paid=False``: none). ``command``
        replaces ``gpuflex`` (tests start a faulty peer this way). Each peer leads its own process
        group, so ``kill_peer`` can take down its DHT, averager and p2pd with it, as a crashed
        machine would.
        """
        index = len(self.procs)
        args = [*(command or gpuflex_command()), "peer", "--listen", "/ip4/127.0.0.1/tcp/0",
                "--data-dir", str(self.root / f"peer{index}")]
        if self.chain is not None and paid and "--deployment" not in extra:
            self.wallets.append(self.new_wallet(f"peer{index}"))
            args += ["--wallet", str(self.wallets[-1]), "--deployment", str(self.deployment)]
        self._args.append([*args, *extra])
        proc, maddr, metrics_url = self._launch(index, self.maddrs[:1], timeout)
        self.procs.append(proc)
        self.maddrs.append(maddr)
        if metrics_url:
            self.metrics_urls.append(metrics_url)
        return maddr

    def restart_peer(self, index: int, *, timeout: float = 90.0) -> str:
        """Start peer ``index`` again from its data dir (same identity, blobs and journal).

        It joins through the first other peer that is running; with none, it starts the swarm anew.
        """
        if self.procs[index].poll() is None:
            raise RuntimeError(f"peer {index} is still running")
        live = [m for i, (p, m) in enumerate(zip(self.procs, self.maddrs)) if i != index and p.poll() is None]
        self.procs[index], self.maddrs[index], _ = self._launch(index, live[:1], timeout)
        return self.maddrs[index]

    def _launch(self, index: int, initial_peers: list[str], timeout: float):
        args = list(self._args[index])
        if initial_peers:
            args += ["--initial-peers", initial_peers[0]]
        log = open(self.root / f"peer{index}.log", "a")
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=self.env,
                                start_new_session=True)
        self._launched.append(proc)
        deadline, metrics_url = time.time() + timeout, None
        for line in proc.stdout:  # the peer prints its addresses once it is up
            if METRICS_LINE.match(line.strip()):
                metrics_url = METRICS_LINE.match(line.strip()).group(1)
            match = MADDR_LINE.match(line.strip())
            if match:
                return proc, match.group(1), metrics_url
            if time.time() > deadline:
                raise RuntimeError(f"peer {index} did not report an address within {timeout:.0f}s")
        raise RuntimeError(f"peer {index} exited before listening; see {self.root}/peer{index}.log")

    def start_chain(self, consumer_gpux: float = 200.0) -> dict:
        """anvil + contracts + a funded consumer wallet; peers started after this get wallets too.

        Returns {"deployment": path, "consumer": keyfile}. Key files are encrypted with
        DEMO_PASSWORD (in this process's and the peers' environment): a local demo, not custody.
        """
        from ledger.chain import GPUX, Ledger, connect, deploy
        from ledger.devchain import Anvil

        self.chain = Anvil(log=self.root / "anvil.log").start()
        w3 = connect(self.chain.url)
        deployment = self.root / "deployment.json"
        dataclasses.replace(deploy(w3, w3.eth.accounts[0], dev_chain=True), rpc_url=self.chain.url).save(deployment)
        self.env["GPUFLEX_WALLET_PASSWORD"] = DEMO_PASSWORD
        self.deployment = deployment
        consumer = self.new_wallet("consumer")
        ledger = Ledger.for_wallet(deployment, consumer, DEMO_PASSWORD)
        ledger.faucet(int(consumer_gpux * GPUX))
        self.ledger = Ledger.from_file(deployment)
        return {"deployment": deployment, "consumer": consumer}

    def new_wallet(self, name: str) -> Path:
        """A key file with gas on the dev chain (cheap KDF: these keys guard test money)."""
        from ledger.chain import connect, fund_gas
        from ledger.wallet import create_keyfile

        path = self.root / "wallets" / f"{name}.json"
        address = create_keyfile(path, DEMO_PASSWORD, kdf="pbkdf2", iterations=1000)
        fund_gas(connect(self.chain.url), address)
        return path

    def kill_peer(self, index: int, sig: int = signal.SIGKILL) -> None:
        """SIGKILL: the peer's whole process group dies at once (a crash). Other signals go to the
        peer alone, which then shuts its children down itself."""
        if sig == signal.SIGKILL:
            try:
                os.killpg(self.procs[index].pid, sig)
            except ProcessLookupError:
                pass
        else:
            self.procs[index].send_signal(sig)
        self.procs[index].wait(timeout=30)

    def cli(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*gpuflex_command(), *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"gpuflex {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
                               f"{self.log_tails()}")
        return done

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every peer's log: what a failing test prints, so CI shows the cause."""
        parts = []
        for index in range(len(self.procs)):
            path = self.root / f"peer{index}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"\n--- peer{index}.log (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "".join(parts)

    def status(self, job_id: str, via: int = 0) -> dict:
        return json.loads(self.cli("job", "status", job_id, "--peer", self.maddrs[via], "--json").stdout)

    def wait_for(self, condition, *, timeout: float, what: str, poll: float = 1.0):
        """Poll ``condition`` until truthy or fail after ``timeout`` with what we were waiting for."""
        deadline = time.time() + timeout
        while True:
            value = condition()
            if value:
                return value
            dead = [i for i, p in enumerate(self.procs) if p.poll() is not None and p.returncode not in (0, -9, -15)]
            if dead:
                raise RuntimeError(f"peer(s) {dead} crashed while waiting for {what}{self.log_tails()}")
            if time.time() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{self.log_tails()}")
            time.sleep(poll)  # polling an external condition, not synchronising on time

    def stop(self) -> None:
        """SIGTERM every peer, SIGKILL what is left after 15 s, then reap their whole process trees.

        A peer's DHT, averager and p2pd are its children: if the peer itself has to be killed they
        would be orphaned (and outlive the test), so they are collected first and killed last.
        """
        import psutil

        family = []
        for proc in self._launched:
            try:
                family += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for proc in self._launched:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        for child in family:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        for proc in self._launched:  # whatever is left in a peer's process group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        psutil.wait_procs(family, timeout=10)
        if self.chain is not None:
            self.chain.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--job", default="examples/digits-mlp.yaml")
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--budget", type=float, default=100.0,
                        help="GPUX escrowed for the job on a local anvil chain (0: an unpaid job, no chain)")
    parser.add_argument("--owners", type=int, default=0,
                        help="data owners for a federated job: the digits split among this many peers, each started "
                             "with --private-data digits=<its part> (the --peers start with none)")
    args = parser.parse_args()

    root = Path(args.out).resolve() / "swarm"
    shutil.rmtree(root, ignore_errors=True)
    with LocalSwarm(root) as swarm:
        money = None
        if args.budget > 0:
            from ledger.chain import GPUX
            from ledger.wallet import keyfile_address

            chain = swarm.start_chain(consumer_gpux=2 * args.budget)
            consumer = keyfile_address(chain["consumer"])
            money = {"consumer": consumer, "before": swarm.ledger.balance(consumer)}
            print(f"dev chain {swarm.chain.url} (anvil); consumer {consumer} holds "
                  f"{money['before'] / GPUX:,.2f} GPUX")
        if args.owners:
            from make_owner_splits import write_owner_splits  # scripts/ is on sys.path when run as a script

            parts = write_owner_splits(root / "owners", args.owners)
            print(f"starting {args.owners} data owners, each with its part of the digits (logs in {root})")
            for i, part in enumerate(parts):
                print(f"  peer {i}: {swarm.start_peer('--private-data', f'digits={part}')}  (owns {part.name})")
        if args.peers:
            print(f"starting {args.peers} peers (logs in {root})")
        for i in range(args.owners, args.owners + args.peers):
            print(f"  peer {i}: {swarm.start_peer()}")
        submit = ["job", "submit", args.job, "--peer", swarm.maddrs[0]]
        if money:
            submit += ["--budget", str(args.budget), "--wallet", str(chain["consumer"]),
                       "--deployment", str(chain["deployment"])]
        print(f"$ gpuflex job submit {args.job} --peer <peer 0>" + (f" --budget {args.budget} --wallet ..." if money else ""))
        job_id = swarm.cli(*submit).stdout.strip()
        print(f"  job {job_id}")
        last_round = [-1]

        def finished():
            status = swarm.status(job_id, via=len(swarm.maddrs) - 1)
            if status["rounds_done"] != last_round[0]:
                last_round[0] = status["rounds_done"]
                # classification shows its accuracy, regression its errors (in the target's units)
                extra = "".join(f", {name.replace('_', ' ')} {status[name]:.{digits}f}"
                                for name, digits in (("val_accuracy", 3), ("val_mse", 1), ("val_mae", 2))
                                if status.get(name) is not None)
                loss = status["train_loss"]
                print(
                    f"  {status['state']}: round {status['rounds_done']}/{status['rounds']}"
                    f"{f', train loss {loss:.4f}' if loss is not None else ''}{extra}, "
                    f"{len(status['peers_done'])}/{len(status['peers'])} peers done"
                )
            return status["state"] == "finished"

        swarm.wait_for(finished, timeout=args.timeout, what=f"job {job_id} to finish")
        out = Path(args.out).resolve() / "result"
        print(f"$ gpuflex job result {job_id} --peer <peer {len(swarm.maddrs) - 1}> -o {out}")
        print(swarm.cli("job", "result", job_id, "--peer", swarm.maddrs[-1], "-o", str(out)).stdout.rstrip())
        privacy = json.loads((out / "report.json").read_text()).get("privacy")
        if privacy:
            print(f"  privacy: {privacy['guarantee']}")
            for peer, eps in sorted(privacy["epsilon_spent_by_owner"].items()):
                print(f"    owner {peer[:16]}… spent epsilon {eps:.3f}")
        if money:
            print(f"$ gpuflex job refund {job_id} --peer <peer 1> --wallet ...")
            print("  " + swarm.cli("job", "refund", job_id, "--peer", swarm.maddrs[1], "--wallet", str(chain["consumer"]),
                                   "--deployment", str(chain["deployment"])).stdout.strip())
            show_money(swarm, money, job_id)
    return 0


def show_money(swarm: LocalSwarm, money: dict, job_id: str) -> None:
    """Where the budget went: each peer's claims, the consumer's refund, and that they add up."""
    from ledger.chain import GPUX
    from ledger.wallet import keyfile_address

    peers = [keyfile_address(w) for w in swarm.wallets]
    spent = money["before"] - swarm.ledger.balance(money["consumer"])

    # peers claim when they finish the job (a peer that did none of it has nothing to claim):
    # wait until the claims add up to what the consumer paid, or time out showing what landed
    def all_claimed():
        balances = [swarm.ledger.balance(p) for p in peers]
        return balances if sum(balances) >= spent else None

    earned = swarm.wait_for(all_claimed, timeout=120, what="the peers' claims", poll=0.5)
    print("money (GPUX):")
    for i, (peer, amount) in enumerate(zip(peers, earned)):
        print(f"  peer {i} {peer}  earned {amount / GPUX:12.6f}")
    print(f"  consumer {money['consumer']}  paid {spent / GPUX:12.6f} (budget less refund)")
    print(f"  balanced: {'yes' if spent == sum(earned) else 'NO'} (consumer paid = sum earned)")


if __name__ == "__main__":
    sys.exit(main())
