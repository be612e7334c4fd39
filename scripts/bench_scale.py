"""How the swarm scales with its size: 8, 16, 32, 64 real peers on this one machine.

    python scripts/bench_scale.py --peers 8 16 32 64

For each size, a fresh swarm of N lightweight peers (separate processes, CPU, 127.0.0.1, each
bootstrapped from peer 0, each serving its Prometheus metrics) is started one by one. Before each
start the script checks the machine's available memory: when it would not hold another peer
(its measured size, with a margin), the run stops there and the table says so.

Measured, per size:

- idle: each peer's resident memory (USS, its whole process tree: peer, DHT process, p2pd) and
  CPU over a 10 s window with no job, and its DHT lookups per second then
  (``gpuflex_dht_reads_total``);
- submit -> seen: from the first peer's sight of the job (its ``gpuflex_jobs_seen`` counting it)
  until each other peer's counts it (median, p95, last), polled at 20 Hz; an idle peer reads the
  job records once a second (``JOB_POLL_S``), which bounds this from below;
  the submit command's own time (sharding, sending the shards) is a column of its own;
- submit -> all leased: from the same moment until every peer holds a shard lease of round 1
  (``gpuflex_leases_held``): the job's roster settled, every peer dealt in;
- round time of one job with all N peers as participants (``min_peers = max_peers = N``: tiny
  MLP on the digits, 3 rounds of 5 steps, 32-row shards, re-execution off); up to 16 peers (the
  default ``aggregation.group_size``) the job's merge is one all-reduce group of N; and its final
  validation accuracy;
- DHT lookups per second per peer while the job runs;
- with ``--group-sizes 4 ...``: the same job again in the same swarm, right after, with
  ``aggregation.group_size`` set to each, so the round averages in stages of small groups
  (``aggregation.groups``): its round time as a ratio to the one-group round, its smallest round
  group and its accuracy.

Prints a table and writes it, with this command, to docs/benchmarks.md ("## Scale").
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchdoc import write_section  # scripts/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IDLE_WINDOW_S = 10.0
MARGIN_BYTES = 1 << 30  # what the machine keeps free beyond the peers' own memory


def scrape(url: str) -> dict[str, float]:
    """A peer's metrics, the unlabelled samples by name."""
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        match = re.match(r"^(gpuflex_[a-z_]+) ([0-9.e+-]+)$", line)
        if match:
            out[match.group(1)] = float(match.group(2))
    return out


def tree_usage(pid: int) -> tuple[int, int, float]:
    """(USS bytes, RSS bytes, CPU seconds) of a process and its children."""
    import psutil

    uss = rss = 0
    cpu = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                uss, rss = uss + info.uss, rss + info.rss
                times = proc.cpu_times()
                cpu += times.user + times.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return uss, rss, cpu


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_size(n: int, job_file: Path, work: Path, start_timeout: float, job_timeout: float,
             run_job: bool = True, per_peer_hint: int = 0, group_sizes: tuple[int, ...] = ()) -> dict:
    import psutil

    from local_swarm import LocalSwarm

    row: dict = {"peers": n}
    available = psutil.virtual_memory().available
    if per_peer_hint and n * per_peer_hint > available - MARGIN_BYTES:  # known not to fit: say so, start none
        row["stopped"] = (f"not started: {n} x {per_peer_hint / 2**20:.0f} MiB (the last size's peer) = "
                          f"{n * per_peer_hint / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available; fits at "
                          f"<= {(available - MARGIN_BYTES) / n / 2**20:.0f} MiB per peer")
        return row
    with LocalSwarm(work / f"swarm-{n}") as swarm:
        per_peer = 0
        started_at = time.time()
        for i in range(n):
            available = psutil.virtual_memory().available
            if per_peer and available < per_peer * 1.5 + MARGIN_BYTES:
                row["stopped"] = (f"stopped at {i} of {n} peers: {available / 2**30:.1f} GiB available, "
                                  f"{per_peer / 2**20:.0f} MiB per peer")
                return row
            swarm.start_peer("--metrics-port", "0", "--log-level", "WARNING", timeout=start_timeout)
            if i == 0:  # one peer's size (with its DHT process and p2pd) sets the memory check
                per_peer = tree_usage(swarm.procs[0].pid)[0]
        row["start_s"] = time.time() - started_at
        urls = swarm.metrics_urls
        swarm.wait_for(lambda: all(scrape(u).get("gpuflex_peers_known", 0) >= n for u in urls), timeout=120,
                       what=f"all {n} peers to see each other")

        # idle: memory, CPU and DHT lookups with no job
        before = [tree_usage(p.pid) for p in swarm.procs]
        reads_before = [scrape(u).get("gpuflex_dht_reads_total", 0.0) for u in urls]
        t0 = time.time()
        time.sleep(IDLE_WINDOW_S)  # a measuring window, not a synchronisation
        window = time.time() - t0
        after = [tree_usage(p.pid) for p in swarm.procs]
        reads_after = [scrape(u).get("gpuflex_dht_reads_total", 0.0) for u in urls]
        row["uss_mib"] = statistics.median(a[0] for a in after) / 2**20
        row["rss_mib"] = statistics.median(a[1] for a in after) / 2**20
        row["idle_cpu_pct"] = statistics.median((a[2] - b[2]) / window * 100 for a, b in zip(after, before))
        row["idle_reads_per_s"] = statistics.median((a - b) / window for a, b in zip(reads_after, reads_before))

        # one job with every peer in it
        reads_before = [scrape(u).get("gpuflex_dht_reads_total", 0.0) for u in urls]
        seen: dict[int, float] = {}  # peer -> when its jobs_seen first counted the job
        leased: dict[int, float] = {}  # peer -> when it first held a shard lease
        stop = threading.Event()

        def poll():
            while not stop.is_set() and len(leased) < n:
                for i, url in enumerate(urls):
                    if i in leased:
                        continue
                    m = scrape(url)
                    if i not in seen and m.get("gpuflex_jobs_seen", 0) >= 1:
                        seen[i] = time.time()
                    if m.get("gpuflex_leases_held", 0) >= 1:
                        leased[i] = time.time()
                        seen.setdefault(i, leased[i])
                stop.wait(0.05)  # polling the peers' metrics

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        submit_started = time.time()
        job_id = swarm.cli("job", "submit", str(job_file), "--peer", swarm.maddrs[0], timeout=300).stdout.strip()
        row["submit_s"] = time.time() - submit_started
        swarm.wait_for(lambda: len(leased) == n, timeout=job_timeout, what=f"all {n} peers to hold a lease",
                       poll=0.2)
        stop.set()
        poller.join()
        # from the first peer's sight of the job record: how long it takes to reach every other
        # peer through the DHT (an idle peer reads the jobs once a second, which bounds it below)
        first = min(seen, key=seen.get)
        published = seen[first]
        spread = [t - published for i, t in seen.items() if i != first]
        if spread:
            row["seen_median_s"], row["seen_p95_s"] = statistics.median(spread), pct(spread, 0.95)
            row["seen_last_s"] = max(spread)
        row["all_leased_s"] = max(leased.values()) - published
        if not run_job:
            row["job"] = "(not timed)"
            return row
        row.update(finish_job(swarm, job_id, n, submit_started, job_timeout, work / f"result-{n}"))
        if "round_s" not in row:
            return row
        job_seconds = row["job_s"]
        reads_after = [scrape(u).get("gpuflex_dht_reads_total", 0.0) for u in urls]
        row["job_reads_per_s"] = statistics.median((a - b) / job_seconds for a, b in zip(reads_after, reads_before))

        # the same job again in the same swarm, averaged in stages of small groups (Moshpit):
        # the ratio to the one-group round above is what staging costs or saves on this box
        import yaml

        for size in (g for g in group_sizes if g < n):
            staged = yaml.safe_load(job_file.read_text())
            staged["name"] = f"{staged['name']}-groups-of-{size}"
            staged["aggregation"] = {"group_size": size}
            staged_file = work / f"scale-{n}-groups-of-{size}.yaml"
            staged_file.write_text(yaml.safe_dump(staged))
            started = time.time()
            staged_id = swarm.cli("job", "submit", str(staged_file), "--peer", swarm.maddrs[0], timeout=300).stdout.strip()
            result = finish_job(swarm, staged_id, n, started, job_timeout, work / f"result-{n}-groups-of-{size}")
            row.setdefault("staged", []).append({"group_size": size, **result})
            print(f"    groups of {size}: {result}", flush=True)
    return row


def finish_job(swarm, job_id: str, n: int, started: float, job_timeout: float, out: Path) -> dict:
    """Wait for the job, fetch and verify its result: its median round time, smallest round group
    and final accuracy (or, under ``job``, why there are none)."""
    def finished() -> bool:
        try:
            return swarm.status(job_id)["state"] == "finished"
        except (subprocess.TimeoutExpired, RuntimeError):  # a status call on a saturated box: ask again
            return False

    try:
        swarm.wait_for(finished, timeout=job_timeout, what=f"the {n}-peer job to finish", poll=2.0)
    except TimeoutError:
        return {"job": f"did not finish within {job_timeout:.0f}s"}
    job_seconds = time.time() - started
    fetched = swarm.cli("job", "result", job_id, "--peer", swarm.maddrs[0], "-o", str(out), timeout=300,
                        check=False)
    if fetched.returncode != 0:  # measured all the same: what the result check refused is a finding
        return {"job": f"finished in {job_seconds:.0f}s, result refused: {fetched.stderr.strip()[:160]}"}
    report = json.loads((out / "report.json").read_text())
    rounds = report["rounds"]
    ends = [r["finished_at"] for r in rounds]
    return {"round_s": statistics.median(b - a for a, b in zip(ends, ends[1:])) if len(ends) > 1 else None,
            "group": min(len(r["peers_done"]) for r in rounds), "accuracy": report["final"].get("val_accuracy"),
            "job_s": job_seconds}


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument("--job-timeout", type=float, default=600.0)
    parser.add_argument("--job-max-peers", type=int, default=16,
                        help="above this size, measure the job's spread and leases but do not time its rounds")
    parser.add_argument("--group-sizes", type=int, nargs="*", default=[],
                        help="run the job again in the same swarm with aggregation.group_size set to each")
    parser.add_argument("--write", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip writing")
    args = parser.parse_args()

    import yaml

    from make_digits_csv import write_digits_csv

    work = Path(tempfile.mkdtemp(prefix="gpuflex-bench-scale-"))
    write_digits_csv(work / "digits.csv")
    rows = []
    for n in args.peers:
        job = {
            "name": f"scale-{n}", "task": "classification", "model": {"catalog": "mlp", "hidden": [32]},
            "data": {"path": str(work / "digits.csv"), "format": "csv", "label_column": "label", "shard_rows": 32},
            "training": {"rounds": 3, "local_steps": 5, "batch_size": 32, "lr": 0.003},
            "swarm": {"min_peers": n, "max_peers": n}, "verification": {"fraction": 0.0},
        }
        job_file = work / f"scale-{n}.yaml"
        job_file.write_text(yaml.safe_dump(job))
        print(f"--- {n} peers", flush=True)
        hint = int(rows[-1]["uss_mib"] * 2**20) if rows and "uss_mib" in rows[-1] else 0
        row = run_size(n, job_file, work, args.start_timeout, args.job_timeout, run_job=n <= args.job_max_peers,
                       per_peer_hint=hint, group_sizes=tuple(args.group_sizes))
        print(row, flush=True)
        rows.append(row)
        write_table(rows, args.write)  # after every size: a run stopped later keeps what it measured
        if "stopped" in row:
            break


def write_table(rows: list[dict], write: str) -> None:
    import psutil

    header = ("| peers | start all (s) | submit command (s) | memory per peer, USS / RSS (MiB) | idle CPU per peer (% of a core) | "
              "DHT lookups/s per peer, idle / in the job | submit -> seen, median / p95 / last (s) | "
              "submit -> all leased (s) | round time, one group of N (s) | val accuracy |")
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "stopped" in r and "uss_mib" not in r:
            lines.append(f"| {r['peers']} | {r['stopped']} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['peers']} | {fmt(r.get('start_s'), '.0f')} | {fmt(r.get('submit_s'))} | {fmt(r.get('uss_mib'), '.0f')} / "
            f"{fmt(r.get('rss_mib'), '.0f')} | {fmt(r.get('idle_cpu_pct'))} | {fmt(r.get('idle_reads_per_s'))} / "
            f"{fmt(r.get('job_reads_per_s'))} | {fmt(r.get('seen_median_s'), '.2f')} / {fmt(r.get('seen_p95_s'), '.2f')} / "
            f"{fmt(r.get('seen_last_s'), '.2f')} | {fmt(r.get('all_leased_s'))} | {fmt(r.get('round_s'))} "
            f"{r.get('job', '')} | {fmt(r.get('accuracy'), '.3f')} |".replace(" |  | ", " | - | "))
    memory = psutil.virtual_memory().total / 2**30
    lines += ["", f"{psutil.cpu_count()} CPU cores, {memory:.0f} GiB memory, one machine, 127.0.0.1; every peer a "
                  f"real `gpuflex peer` (its own DHT process and p2pd). The job: digits MLP (hidden 32), 3 rounds of 5 "
                  f"steps, 32-row shards, re-execution off, min_peers = max_peers = N."]
    staged = [(r, s) for r in rows for s in r.get("staged", [])]
    if staged:
        lines += ["", "The same job again in the same swarm, right after, averaged in stages of small groups "
                      "(`aggregation.group_size`):", "",
                  "| peers | groups | round time (s) | x one group's round | smallest round group | val accuracy | job (s) |",
                  "|---:|---|---:|---:|---:|---:|---:|",
                  *(f"| {r['peers']} | one of {r['peers']} | {fmt(r.get('round_s'))} | 1.00 | {r.get('group', '-')} | "
                    f"{fmt(r.get('accuracy'), '.3f')} | {fmt(r.get('job_s'), '.0f')} |" for r in rows if r.get("staged"))]
        for r, s in staged:
            ratio = s["round_s"] / r["round_s"] if s.get("round_s") and r.get("round_s") else None
            lines.append(f"| {r['peers']} | of at most {s['group_size']} | {fmt(s.get('round_s'))} {s.get('job', '')} | "
                         f"{fmt(ratio, '.2f')} | {s.get('group', '-')} | {fmt(s.get('accuracy'), '.3f')} | "
                         f"{fmt(s.get('job_s'), '.0f')} |")
    print("\n".join(lines))
    if write:
        command = "python scripts/bench_scale.py " + " ".join(sys.argv[1:])
        write_section(Path(write), "Scale", command, lines)


if __name__ == "__main__":
    main()
