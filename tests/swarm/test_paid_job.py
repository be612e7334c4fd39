"""A paid job on a real chain (anvil): escrow on submit, per-round payouts, claims, refund."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from ledger.chain import connect, deploy
from ledger.devchain import anvil_missing

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

NO_ANVIL = anvil_missing()


@pytest.mark.skipif(NO_ANVIL is not None, reason=f"anvil is not installed: {NO_ANVIL}")
def test_money_moves_from_consumer_to_the_peers_that_worked(local_swarm, digits_job, tmp_path):
    from ledger.chain import GPUX
    from ledger.wallet import keyfile_address

    chain = local_swarm.start_chain(consumer_gpux=200)
    ledger = local_swarm.ledger
    consumer = keyfile_address(chain["consumer"])
    for _ in range(3):
        local_swarm.start_peer("--metrics-port", "0")
    # a fourth peer whose chain config names other contracts: it can not verify the escrow, so it
    # must not work on the job (and must not be paid)
    w3 = connect(local_swarm.chain.url)
    elsewhere = tmp_path / "other-deployment.json"
    dataclasses.replace(deploy(w3, w3.eth.accounts[0], dev_chain=True), rpc_url=local_swarm.chain.url).save(elsewhere)
    idle_wallet = local_swarm.new_wallet("idle")
    local_swarm.start_peer("--wallet", str(idle_wallet), "--deployment", str(elsewhere))

    job_file = digits_job(training={"rounds": 4}, swarm={"min_peers": 3, "max_peers": 4})
    before = ledger.balance(consumer)
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0], "--budget", "100",
                             "--wallet", str(chain["consumer"]), "--deployment", str(chain["deployment"])).stdout.strip()
    assert ledger.balance(consumer) == before - 100 * GPUX  # escrowed before the job was announced
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["state"] == "finished", timeout=240, what="the paid job")
    local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[1], "-o", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # every round's contribution root on chain is the tree of the round's agreed, chained work
    # (the last round's root may still be on its way to the chain: wait for it, not for a time)
    def audit_with_chain():
        done = local_swarm.cli("job", "audit", job_id, "--peer", local_swarm.maddrs[2], "--skip-models",
                               "--deployment", str(chain["deployment"]), check=False)
        return done.stdout if done.returncode == 0 else None

    audited = local_swarm.wait_for(audit_with_chain, timeout=60, what="an intact audit with chain roots", poll=2.0)
    assert "4 rounds, chain intact, finished" in audited and "BROKEN" not in audited
    refund = local_swarm.cli("job", "refund", job_id, "--peer", local_swarm.maddrs[2], "--wallet",
                             str(chain["consumer"]), "--deployment", str(chain["deployment"]))
    assert refund.stdout.startswith("refunded ")

    price = 100 * GPUX // (4 * 20 * 32 * 4)  # budget / (rounds x local_steps x batch x max_peers)
    earned = {}
    for wallet in local_swarm.wallets:
        earned[keyfile_address(wallet)] = local_swarm.wait_for(
            lambda w=wallet: ledger.balance(keyfile_address(w)) or None, timeout=60, what="claims", poll=0.5)
    samples = {p: v["samples"] for p, v in report["participants"].items()}
    assert len(samples) == 3 and sorted(samples.values()) == [4 * 20 * 32] * 3
    assert sorted(earned.values()) == [price * 4 * 20 * 32] * 3  # each paid for exactly its units
    assert ledger.balance(keyfile_address(idle_wallet)) == 0  # did no work, got nothing
    spent = before - ledger.balance(consumer)
    assert spent == sum(earned.values())  # what the consumer lost is exactly what the peers gained
    assert "skipping job" in (local_swarm.root / "peer3.log").read_text()
    # and each peer's Prometheus endpoint counts what it claimed
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    for url, wallet in zip(local_swarm.metrics_urls, local_swarm.wallets):
        with urllib.request.urlopen(url, timeout=10) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        claimed = [s.value for s in families["gpuflex_gpux_earned"].samples
                   if s.name == "gpuflex_gpux_earned_total" and s.labels == {"job": job_id}]
        assert claimed == [pytest.approx(earned[keyfile_address(wallet)] / GPUX)]
    # `wallet claim` rebuilds each round's tree from the signed records; they match the roots on chain
    from swarm.client import Client

    with Client(local_swarm.maddrs[0]) as client:
        trees = client.posted_trees(job_id, ledger)
    assert sorted(trees) == [1, 2, 3, 4]
    assert all(sorted(t.units(w) for w in earned) == [20 * 32] * 3 for t in trees.values())
    # and nothing is left to collect twice
    for wallet in (local_swarm.wallets[0], idle_wallet):
        again = local_swarm.cli("wallet", "claim", job_id, "--peer", local_swarm.maddrs[0], "--keyfile", str(wallet),
                                "--deployment", str(chain["deployment"]))
        assert again.stdout.startswith("claimed 0.000000 GPUX")
    assert ledger.balance(consumer) == before - spent and sum(map(ledger.balance, earned)) == spent

    # a paid job that never gets its peers refunds in full once its deadline has passed
    from ledger.chain import advance_time

    stuck = digits_job(swarm={"min_peers": 9, "max_peers": 9})
    budget_before = ledger.balance(consumer)
    stuck_id = local_swarm.cli("job", "submit", stuck, "--peer", local_swarm.maddrs[0], "--budget", "10",
                               "--deadline-hours", "1", "--wallet", str(chain["consumer"]),
                               "--deployment", str(chain["deployment"])).stdout.strip()
    early = local_swarm.cli("job", "refund", stuck_id, "--peer", local_swarm.maddrs[0], "--wallet",
                            str(chain["consumer"]), "--deployment", str(chain["deployment"]), check=False)
    assert early.returncode == 1 and "has not finished" in early.stderr  # not before the deadline
    advance_time(w3, 2 * 3600)
    late = local_swarm.cli("job", "refund", stuck_id, "--peer", local_swarm.maddrs[0], "--wallet",
                           str(chain["consumer"]), "--deployment", str(chain["deployment"]))
    assert late.stdout.startswith("refunded 10.000000 GPUX")
    assert ledger.balance(consumer) == budget_before


@pytest.mark.skipif(NO_ANVIL is not None, reason=f"anvil is not installed: {NO_ANVIL}")
def test_a_cancelled_job_stops_and_refunds_what_was_not_earned(local_swarm, digits_job):
    from ledger.chain import GPUX
    from ledger.wallet import keyfile_address

    chain = local_swarm.start_chain(consumer_gpux=100)
    ledger, consumer = local_swarm.ledger, keyfile_address(chain["consumer"])
    for _ in range(2):
        local_swarm.start_peer()
    before = ledger.balance(consumer)
    wallet = ["--wallet", str(chain["consumer"]), "--deployment", str(chain["deployment"])]
    job_id = local_swarm.cli("job", "submit", digits_job(training={"rounds": 200}), "--peer", local_swarm.maddrs[0],
                             "--budget", "50", *wallet).stdout.strip()
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["rounds_done"] >= 2, timeout=120, what="two rounds")
    cancelled = local_swarm.cli("job", "cancel", job_id, "--peer", local_swarm.maddrs[1], *wallet)
    assert cancelled.stdout.startswith("cancelled; refunded ")
    # both peers notice at their next round boundary (the consumer's signed cancel in the DHT, or
    # the escrow closed on chain, whichever they see first) and stop working on it
    for i in range(2):
        local_swarm.wait_for(lambda i=i: re.search(r"escrow cancelled|cancelled by its consumer",
                                                   (local_swarm.root / f"peer{i}.log").read_text()),
                             timeout=60, what=f"peer {i} to stop")
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["state"] == "cancelled", timeout=60,
                         what="the last merged model as the result")
    rounds_then = local_swarm.status(job_id)["rounds_done"]
    assert rounds_then < 200
    # what was posted before the cancel stays payable, and the peers collected it as they stopped
    earned = sum(ledger.balance(keyfile_address(w)) for w in local_swarm.wallets)
    assert earned > 0
    assert before - ledger.balance(consumer) == earned  # the refund is everything not earned
    assert local_swarm.status(job_id)["rounds_done"] == rounds_then  # and nobody kept training
    # the result is the last round paid for, verified against the history
    out = local_swarm.root / "cancelled-result"
    fetched = local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[0], "-o", str(out)).stdout
    assert "verified" in fetched
    report = json.loads((out / "report.json").read_text())
    assert report["cancelled"]["after_round"] <= rounds_then and report["model_id"] == report["rounds"][-1]["model_id"]


CHEATS = {  # fault -> (honest peers, job overrides, what the honest peers' logs say)
    "CLAIM_UNDONE_WORK": (2, {"verification": {"fraction": 1.0, "max_faults": 2}}, "away from the re-run"),
    # no re-execution at all: the claim alone shows the samples (and shards) were another peer's
    "CLAIM_OTHERS_UNITS": (2, {"verification": {"fraction": 0.0, "max_faults": 2}}, "a round holds at most"),
    # one of four sends a sign-flipped 10x update: CenteredClip keeps it from wrecking the model,
    # re-execution keeps it from being paid
    "POISON_UPDATE": (3, {"verification": {"fraction": 1.0, "max_faults": 2},
                          "aggregation": {"reducer": "centered_clip"}}, "away from the re-run"),
}


@pytest.mark.skipif(NO_ANVIL is not None, reason=f"anvil is not installed: {NO_ANVIL}")
@pytest.mark.parametrize("fault", list(CHEATS))
def test_a_cheating_peer_is_rejected_banned_and_not_paid(local_swarm, digits_job, tmp_path, fault):
    import sys
    from pathlib import Path

    from ledger.chain import GPUX
    from ledger.wallet import keyfile_address

    honest_peers, overrides, evidence = CHEATS[fault]
    chain = local_swarm.start_chain(consumer_gpux=200)
    ledger = local_swarm.ledger
    consumer = keyfile_address(chain["consumer"])
    for _ in range(honest_peers):
        local_swarm.start_peer()
    cheat = [sys.executable, str(Path(__file__).with_name("faulty_peer.py")), fault, "1"]
    local_swarm.start_peer(command=cheat)
    peers = honest_peers + 1
    job_file = digits_job(training={"rounds": 5}, swarm={"min_peers": peers - 1, "max_peers": peers}, **overrides)
    before = ledger.balance(consumer)
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0], "--budget", "100",
                             "--wallet", str(chain["consumer"]), "--deployment", str(chain["deployment"])).stdout.strip()
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["state"] == "finished", timeout=300, what="the job")
    local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[0], "-o", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    local_swarm.cli("job", "refund", job_id, "--peer", local_swarm.maddrs[0], "--wallet", str(chain["consumer"]),
                    "--deployment", str(chain["deployment"]))
    for wallet in local_swarm.wallets:  # the cheat tries to collect too
        local_swarm.cli("wallet", "claim", job_id, "--peer", local_swarm.maddrs[0], "--keyfile", str(wallet),
                        "--deployment", str(chain["deployment"]))

    cheat_log = (local_swarm.root / f"peer{honest_peers}.log").read_text()
    assert "banned from the job" in cheat_log
    honest_logs = "".join((local_swarm.root / f"peer{i}.log").read_text() for i in range(honest_peers))
    assert "rejected" in honest_logs and evidence in honest_logs
    assert len(report["rounds"][-1]["peers_done"]) == honest_peers  # banned: dealt nothing in the last rounds
    honest_ids = set(report["rounds"][-1]["peers_done"])
    assert len(report["faults"]) == 1 and len(next(iter(report["faults"].values()))) == 2
    assert not honest_ids & set(report["faults"])  # nobody honest was rejected (the thief's victim neither)
    honest_samples = sorted(v["samples"] for p, v in report["participants"].items() if p in honest_ids)
    price = 100 * GPUX // (5 * 20 * 32 * peers)
    honest, cheat_wallet = local_swarm.wallets[:honest_peers], local_swarm.wallets[honest_peers]
    assert ledger.balance(keyfile_address(cheat_wallet)) == 0  # rejected every round it worked: paid nothing
    assert sorted(ledger.balance(keyfile_address(w)) for w in honest) == [price * n for n in honest_samples]
    assert before - ledger.balance(consumer) == price * sum(honest_samples)  # the rest came back
    # the cheat's two rounds are in the model (the lazy's short updates, the thief's real ones, the
    # poisoner's clipped ones): the job still trains
    assert report["final"]["val_accuracy"] >= 0.85


@pytest.mark.skipif(NO_ANVIL is not None, reason=f"anvil is not installed: {NO_ANVIL}")
def test_a_peer_leaving_right_after_a_merge_signs_its_round_so_a_pair_is_paid(local_swarm, digits_job, tmp_path):
    """A round of two posts only with both members' signatures. One is shut down the moment its
    round-2 merge is out: it signs the round as it goes, and both are paid for every round."""
    import sys
    from pathlib import Path

    from ledger.chain import GPUX
    from ledger.wallet import keyfile_address
    from swarm.client import Client

    chain = local_swarm.start_chain(consumer_gpux=100)
    ledger = local_swarm.ledger
    local_swarm.start_peer()
    local_swarm.start_peer(command=[sys.executable, str(Path(__file__).with_name("faulty_peer.py")),
                                    "SIGTERM_AFTER_MERGE", "2"])
    job_file = digits_job(training={"rounds": 4}, swarm={"min_peers": 1, "max_peers": 2},
                          verification={"fraction": 0.0})  # nobody is drawn to re-run: the leaver may sign
    job_id = local_swarm.cli("job", "submit", job_file, "--peer", local_swarm.maddrs[0], "--budget", "20",
                             "--wallet", str(chain["consumer"]), "--deployment", str(chain["deployment"])).stdout.strip()
    assert local_swarm.procs[1].wait(timeout=240) == 0  # it left cleanly after its round 2
    report = finish_and_fetch_paid(local_swarm, job_id, tmp_path / "out")
    assert [len(r["peers_done"]) for r in report["rounds"]][1:] == [2, 1, 1]  # it left after round 2

    with Client(local_swarm.maddrs[0]) as client:
        trees = local_swarm.wait_for(lambda: (t := client.posted_trees(job_id, ledger)) and len(t) == 4 and t,
                                     timeout=60, what="every round posted", poll=1.0)
    assert sorted(trees) == [1, 2, 3, 4]  # round 2 too: the stayer posted it with the leaver's signature
    stayer, leaver = (keyfile_address(w) for w in local_swarm.wallets)
    assert trees[2].units(leaver) == trees[2].units(stayer) == 20 * 32
    # the leaver collects its rounds later, with its key file, from any peer
    claimed = local_swarm.cli("wallet", "claim", job_id, "--peer", local_swarm.maddrs[0], "--keyfile",
                              str(local_swarm.wallets[1]), "--deployment", str(chain["deployment"])).stdout
    price = 20 * GPUX // (4 * 20 * 32 * 2)  # budget / (rounds x local_steps x batch x max_peers)
    assert ledger.balance(leaver) == price * sum(t.units(leaver) for t in trees.values() if leaver in t), claimed
    assert local_swarm.wait_for(lambda: ledger.balance(stayer) or None, timeout=60, what="the stayer's claim") \
        == price * 4 * 20 * 32
    assert "signed round 2's pay before leaving" in (local_swarm.root / "peer1.log").read_text()


def finish_and_fetch_paid(local_swarm, job_id, out) -> dict:
    local_swarm.wait_for(lambda: local_swarm.status(job_id)["state"] == "finished", timeout=240, what="the job")
    local_swarm.cli("job", "result", job_id, "--peer", local_swarm.maddrs[0], "-o", str(out))
    return json.loads((out / "report.json").read_text())
