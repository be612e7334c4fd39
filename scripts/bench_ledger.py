"""Gas of GPUFlex's on-chain settlement, on the embedded chain (py-evm, eth-tester's fork).

Posting one round's Merkle root with the quorum signatures it needs (a strict majority of the
round's contributors), against the naive ways to settle the same round: one ``record(wallet,
units)`` transaction per contributor, or one GPUX transfer per contributor. Also the gas of
one claim and of one plain ERC-20 transfer.

    python scripts/bench_ledger.py --contributors 1 4 16 64

Prints a table and writes it, with this command, to docs/benchmarks.md ("## Ledger gas").
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchdoc import write_section  # scripts/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The naive baseline: one storage write per contributor, one transaction each.
NAIVE_RECORD = """
# pragma version ~=0.4.3
units_of: public(HashMap[bytes32, HashMap[uint256, HashMap[address, uint256]]])

@external
def record(job_key: bytes32, round: uint256, wallet: address, units: uint256):
    self.units_of[job_key][round][wallet] += units
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contributors", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--write", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip writing")
    args = parser.parse_args()

    import vyper
    from eth_account import Account
    from eth_utils import keccak

    from ledger.chain import GPUX, Ledger, _Sender, fund_gas
    from ledger.merkle import ContributionTree
    from ledger.signing import job_key

    ledger = Ledger.embedded()
    w3 = ledger.w3
    node = w3.eth.accounts[0]
    consumer = ledger.with_account(Account.from_key(keccak(text="bench-consumer")))
    fund_gas(w3, consumer.address, 10**21)
    consumer.faucet(10**6 * GPUX)
    naive_out = vyper.compile_code(NAIVE_RECORD, output_formats=["abi", "bytecode"])
    naive = w3.eth.contract(
        address=_Sender(w3, node).send(
            w3.eth.contract(abi=naive_out["abi"], bytecode=naive_out["bytecode"]).constructor(), "deploy"
        ).contractAddress,
        abi=naive_out["abi"],
    )
    relayer = consumer  # any account may post a round

    # one plain ERC-20 transfer: to a fresh holder (new balance slot) and to an existing one
    fresh = [Account.from_key(keccak(text=f"bench-fresh-{i}")).address for i in range(2)]
    transfer_new = consumer.transfer(fresh[0], GPUX).gas_used
    transfer_existing = consumer.transfer(fresh[0], GPUX).gas_used

    rows = []
    for n in args.contributors:
        peers = [Account.from_key(keccak(text=f"bench-peer-{n}-{i}")) for i in range(n)]
        for p in peers:
            fund_gas(w3, p.address, 10**18)
        tree = ContributionTree({p.address: 10 + i for i, p in enumerate(peers)})
        key = job_key(f"bench-{n}")
        consumer.open_job(key, 10**5 * GPUX, GPUX // 100, consumer.chain_time() + 10**6)
        quorum = ledger.quorum(key, n)

        def post(round_no):
            atts = [ledger.with_account(p).sign_round(key, round_no, tree) for p in peers[:quorum]]
            return relayer.post_round(key, round_no, tree, atts).gas_used

        post_first = post(1)  # includes the job's first-round bookkeeping
        post_next = post(2)  # steady state
        claims_first = [ledger.with_account(p).claim(key, 1, tree).gas_used for p in peers]  # new GPUX holders
        claims_next = [ledger.with_account(p).claim(key, 2, tree).gas_used for p in peers]  # existing holders
        naive_records = sum(
            _Sender(w3, node).send(naive.functions.record(key, 1, p.address, tree.units(p.address)), "record").gasUsed
            for p in peers
        )
        naive_transfers = sum(
            consumer.transfer(Account.from_key(keccak(text=f"bench-pay-{n}-{i}")).address, GPUX).gas_used
            for i in range(n)
        )
        rows.append((n, quorum, post_first, post_next, statistics.mean(claims_first), statistics.mean(claims_next),
                     naive_records, naive_transfers))

    # claim_many: one contributor collects 8 rounds of a 4-contributor job in one transaction
    peers = [Account.from_key(keccak(text=f"bench-many-{i}")) for i in range(4)]
    for p in peers:
        fund_gas(w3, p.address, 10**18)
    key = job_key("bench-many")
    consumer.open_job(key, 10**5 * GPUX, GPUX // 100, consumer.chain_time() + 10**6)
    trees = {r: ContributionTree({p.address: 10 + r + i for i, p in enumerate(peers)}) for r in range(1, 9)}
    for r, t in trees.items():
        relayer.post_round(key, r, t, [ledger.with_account(p).sign_round(key, r, t) for p in peers[:3]])
    ledger.with_account(peers[1]).claim(key, 1, trees[1])  # so the measured claimant already holds GPUX
    many = ledger.with_account(peers[1]).claim_many(key, {r: t for r, t in trees.items() if r > 1}).gas_used
    many_rounds = len(trees) - 1

    fork = type(w3.provider.ethereum_tester.backend.chain.get_vm()).__name__.removesuffix("VM")
    table = [
        "| contributors per round | quorum signatures | post_round, 1 tx (first round / later rounds) "
        "| claim, per contributor (first payout / later) | naive: N `record(wallet, units)` txs "
        "| naive: N GPUX transfers |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, q, pf, pn, cf, cn, nr, nt in rows:
        table.append(f"| {n} | {q} | {pf:,} / {pn:,} | {cf:,.0f} / {cn:,.0f} | {nr:,} | {nt:,} |")
    notes = [
        "",
        f"One plain GPUX (ERC-20) transfer: {transfer_new:,} gas to a new holder, "
        f"{transfer_existing:,} gas to an existing one. "
        f"`claim_many` of {many_rounds} rounds in one transaction: {many:,} gas, "
        f"{many / many_rounds:,.0f} per round.",
        "",
        f"Gas used as reported by the embedded chain (py-evm {fork} rules, eth-tester), every number "
        "including the 21,000 base cost of its transaction(s). post_round carries one signature and one "
        "Merkle proof per quorum signer and does one ecrecover per signer; it is independent of the "
        "number of leaves otherwise, so its cost grows with the quorum (n // 2 + 1), not with n. "
        "Claims are paid by each contributor, in its own transaction, whenever it wants; the naive "
        "columns are what one poster would pay to settle the round without Merkle batching. "
        "For the poster, batching pays from about 4 contributors on; counting every claim too, a "
        "round costs more gas in total than paying each contributor directly, so peers should "
        "collect a whole job's rounds with one `claim_many` rather than claim round by round.",
    ]
    print("\n".join(table + notes))
    if args.write:
        command = "python scripts/bench_ledger.py --contributors " + " ".join(map(str, args.contributors))
        write_section(Path(args.write), "Ledger gas", command, table + notes)
        print(f"\nwritten to {args.write}")


if __name__ == "__main__":
    main()
