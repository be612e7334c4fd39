"""``gpuflex``: the one command. ``gpuflex peer`` runs a contributor's peer; ``gpuflex job ...`` is
the consumer's side. Every ``GPUFlexError`` becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

# hivemind reads its log level once, at import: keep consumer commands quiet (the peer raises it)
os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")

from dht.errors import GPUFlexError  # noqa: E402
from swarm.cli_ledger import chain_app, escrow_command, open_ledger, wallet_app  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="GPUFlex: peer-to-peer swarm training.")
job_app = typer.Typer(no_args_is_help=True, help="Submit, follow and collect training jobs.")
app.add_typer(job_app, name="job")
app.add_typer(wallet_app, name="wallet")
app.add_typer(chain_app, name="chain")

PeerOption = typer.Option(..., "--peer", help="Multiaddr of any peer of the swarm (as `gpuflex peer` prints it).")


def _fail(error: GPUFlexError) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'2GiB', '500MB', '1.5gb' or plain bytes -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise ValueError(f"'{text}' is not a size (bytes, or a number with kB, MB, GB, KiB, MiB, GiB...)")
    size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"'{text}' must be more than 0 bytes")
    return size


@app.command()
def peer(
    listen: List[str] = typer.Option(["/ip4/0.0.0.0/tcp/0"], "--listen", help="Multiaddr(s) to listen on."),
    initial_peers: List[str] = typer.Option([], "--initial-peers", help="Multiaddr(s) of peers to join through."),
    data_dir: Path = typer.Option(Path("~/.gpuflex/peer"), "--data-dir", help="Identity key, blobs, state."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, mps or cpu (default: best available)."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="Serve Prometheus metrics here (0: any)."),
    price: float = typer.Option(1.0, "--price", min=0.0, help="GPUX asked per GPU-hour of this device."),
    wallet: Optional[Path] = typer.Option(None, "--wallet", help="Key file paid jobs pay into ($GPUFLEX_WALLET_PASSWORD)."),
    deployment: Optional[Path] = typer.Option(None, "--deployment", help="Chain deployment file (gpuflex chain up)."),
    max_memory: Optional[str] = typer.Option(
        None, "--max-memory", help="Memory a job may use here, e.g. 2GiB or 500MB (default: what is free)."),
    private_data: List[str] = typer.Option(
        [], "--private-data", help="NAME=FILE.csv: a dataset only this peer holds, for federated jobs (repeatable)."),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Run a peer: join the swarm, advertise this box, and train the jobs it picks."""
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from peer.runtime import Peer, PeerConfig

    try:
        memory = parse_size(max_memory) if max_memory is not None else None
    except ValueError as e:
        _fail(GPUFlexError(f"--max-memory: {e}"))
    from peer.private_data import parse_private_data_option

    try:
        owned = dict(parse_private_data_option(option) for option in private_data)
    except GPUFlexError as e:
        _fail(e)
    node = Peer(PeerConfig(
        data_dir=data_dir.expanduser(), listen=listen, initial_peers=initial_peers, device=device,
        metrics_port=metrics_port, price_per_gpu_hour=price, wallet=wallet, deployment=deployment,
        max_memory=memory, private_data={name: Path(path) for name, path in owned.items()},
    ))
    # SIGTERM and Ctrl-C stop the peer between steps instead of killing it mid-write
    signal.signal(signal.SIGTERM, lambda *_: node.stopping.set())
    try:
        node.start()
        typer.echo(f"peer {node.records.peer_id} on {node.device} ({node.reference_samples_per_sec:,.0f} ref samples/s)")
        for dataset in node.private_data.values():
            typer.echo(f"private dataset {dataset.name}: {dataset.rows} rows, {len(dataset.header)} columns "
                       f"(only its name, columns and row count are published)")
        if node.metrics_url:
            typer.echo(f"metrics on {node.metrics_url}")
        for maddr in node.maddrs:
            typer.echo(f"listening on {maddr}")
        sys.stdout.flush()
        node.run_forever()
    except GPUFlexError as e:
        _fail(e)
    except KeyboardInterrupt:
        pass
    finally:
        node.shutdown()


@job_app.command("submit")
def job_submit(
    job_file: Path = typer.Argument(..., help="The job's YAML file."),
    peer: str = PeerOption,
    from_job: Optional[str] = typer.Option(
        None, "--from", help="Start from this finished job's model (an inference job: predict with it)."),
    budget: Optional[float] = typer.Option(None, "--budget", min=0.0, help="GPUX to escrow for the job."),
    wallet: Optional[Path] = typer.Option(None, "--wallet", help="The consumer's key file (pays the budget)."),
    deployment: Path = typer.Option(Path("~/.gpuflex/deployment.json"), "--deployment"),
    deadline_hours: float = typer.Option(24.0, "--deadline-hours", help="After this, an unfinished job refunds."),
    stop_when: Optional[str] = typer.Option(
        None, "--stop-when", help="Stop early once a round meets this, e.g. 'val_accuracy>=0.95' (overrides the file)."),
    consumer_key: Optional[Path] = typer.Option(
        None, "--consumer-key", help="Your signing key, made on first use (default ~/.gpuflex/consumer.key)."),
) -> None:
    """Validate the job file, shard the dataset, escrow the budget, hand it to a peer; prints the job id."""
    from swarm.spec import JobSpec, JobSpecError, load_job_file

    try:
        spec = load_job_file(job_file)  # fail on bad input before touching the network
        if stop_when is not None:
            if spec.type == "inference":
                raise JobSpecError(f"{job_file}: --stop-when: an inference job trains no rounds to stop")
            fields = spec.to_dict()
            fields["training"]["stop_when"] = stop_when
            spec = JobSpec.from_dict(fields, source="--stop-when")
        from swarm.client import Client
        from swarm.datasets import load_dataset

        # bad data fails here, before any peer is dialled (a federated job's data is its owners')
        # (an inference job's rows are read by the client: they have no labels to check)
        dataset = load_dataset(spec.data, spec.task) if spec.data.federated is None and spec.type != "inference" \
            else None

        ledger = None
        if budget is not None:  # a wrong password, an empty wallet, a budget too small: before dialling
            from swarm.client import check_funding

            ledger = open_ledger(deployment, wallet or Path("~/.gpuflex/wallet.json"), None)
            check_funding(spec, budget, ledger)
        with Client(peer, consumer_key=consumer_key) as client:
            job = client.submit(spec, from_job=from_job, budget=budget, ledger=ledger,
                                deadline_hours=deadline_hours, dataset=dataset)
    except GPUFlexError as e:
        _fail(e)
    typer.echo(job.job_id)


@job_app.command("quote")
def job_quote(
    job_file: Path = typer.Argument(..., help="The job's YAML file."),
    peer: str = PeerOption,
    as_json: bool = typer.Option(False, "--json", help="Print the quote and the offers as JSON."),
) -> None:
    """Estimated FLOPs, GPU-hours and price range (GPUX) on the live peers' speeds and prices."""
    from dataclasses import asdict

    from swarm.spec import load_job_file

    try:
        spec = load_job_file(job_file)
        from swarm.client import Client

        with Client(peer) as client:
            quote, offers = client.quote(spec)
    except GPUFlexError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({"quote": asdict(quote), "offers": [asdict(o) for o in offers]}, sort_keys=True))
        return
    low, high = quote.peers
    typer.echo(f"job {spec.name}: {quote.train_flops_per_sample:,.0f} training FLOPs per sample, "
               f"{quote.flops_per_peer:.3g} FLOPs per peer over {spec.training.rounds} rounds")
    typer.echo(f"  {low}-{high} peers of {len(offers)} live: {quote.total_flops[0]:.3g}-{quote.total_flops[1]:.3g} FLOPs")
    typer.echo(f"  GPU-hours {quote.gpu_hours[0]:.4g}-{quote.gpu_hours[1]:.4g}, "
               f"compute time {quote.wall_hours[0] * 3600:.1f}-{quote.wall_hours[1] * 3600:.1f} s (communication extra)")
    typer.echo(f"  price {quote.price[0]:.4g}-{quote.price[1]:.4g} GPUX")
    if quote.memory_per_peer is not None:
        typer.echo(f"  memory {quote.memory_per_peer / 2**20:,.1f} MiB per peer (weights, gradients, optimizer, "
                   f"activations of a batch)")


@job_app.command("status")
def job_status(
    job_id: str,
    peer: str = PeerOption,
    as_json: bool = typer.Option(False, "--json", help="Print the status as one JSON object."),
) -> None:
    """State, round, loss, validation metrics and peers of a job."""
    from swarm.client import Client

    try:
        with Client(peer) as client:
            status = client.status(job_id)
    except GPUFlexError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(status, sort_keys=True))
        return
    if status.get("type") == "sweep":
        typer.echo(_sweep_lines(status))
        return
    if status.get("type") == "inference":
        typer.echo(_inference_lines(status))
        return
    typer.echo(f"job {status['job_id']} ({status['name']}): {status['state']}")
    typer.echo(f"  round {status['round']}/{status['rounds']} ({status['rounds_done']} done)")
    if status["train_loss"] is not None:
        typer.echo(f"  train loss {status['train_loss']:.4f}")
    for key in sorted(k for k in status if k.startswith("val_")):
        typer.echo(f"  {key.replace('_', ' ')} {status[key]:.4f}")
    typer.echo(f"  peers {len(status['peers_done'])}/{len(status['peers'])} done this round (min {status['min_peers']})")
    if status.get("rating"):
        from swarm.report_files import stars

        rating = status["rating"]
        said = f": \"{rating['comment']}\"" if rating["comment"] else ""
        typer.echo(f"  rated {stars(rating['stars'])} {rating['stars']}/5 by the consumer{said}")
        typer.echo(f"    for the work of {', '.join(p[:12] for p in sorted(status['peers_done']))}")


def _inference_lines(status: dict) -> str:
    """An inference job's status: rows predicted, checks, and each peer's share."""
    lines = [f"inference {status['job_id']} ({status['name']}): {status['state']}, "
             f"{status['rows_done']:,}/{status['rows']:,} rows ({status['shards_done']}/{status['shards']} shards)"
             + (f", model of job {status['from_job']}" if status["from_job"] else "")]
    lines.append(f"  checks {status['checks']} ({status['rejected_checks']} rejected), caught "
                 f"{len(status['caught'])}, disputed {status['disputed']}")
    for peer_id, entry in sorted(status["peers"].items()):
        working = "  predicting" if peer_id in status["working"] and status["state"] == "running" else ""
        lines.append(f"  peer {peer_id[:12]}  {entry['rows']:>7,} rows  {entry['shards']:>4} shards{working}")
    return "\n".join(lines)


def _sweep_lines(status: dict) -> str:
    """A sweep's status: one line for the sweep, one per trial (its parameters, state, value)."""
    metric = status["metric"]
    lines = [f"sweep {status['job_id']} ({status['name']}): {status['state']}, "
             f"{len(status['trials'])}/{status['trials_total']} trials started, {status['parallel']} at a time, "
             f"{status['direction']} {metric}"]
    for row in status["trials"]:
        params = ", ".join(f"{k.removeprefix('param_')}={v}" for k, v in row.items() if k.startswith("param_"))
        value = f"{row[metric]:.4f}" if row[metric] is not None else "-"
        lines.append(f"  trial {row['trial']:>3}  {row['state']:<8}  {metric} {value:<7}  rounds {row['rounds']:<3} "
                     f"job {row['job_id']}  {params}{'  <- best' if row['best'] else ''}")
    return "\n".join(lines)


@job_app.command("rate")
def job_rate(
    job_id: str,
    stars: int = typer.Argument(..., help="1 to 5."),
    comment: str = typer.Option("", "--comment", help="A line on how it went."),
    peer: str = PeerOption,
    consumer_key: Optional[Path] = typer.Option(
        None, "--consumer-key", help="The key the job was submitted with (default ~/.gpuflex/consumer.key)."),
) -> None:
    """Rate a job you submitted; the rating is kept with the job, next to the peers that did it."""
    from swarm.client import Client

    try:
        with Client(peer, consumer_key=consumer_key) as client:
            client.rate(job_id, stars, comment)
    except GPUFlexError as e:
        _fail(e)
    typer.echo(f"rated job {job_id} {stars}/5")


@job_app.command("watch")
def job_watch(
    job_id: str,
    peer: str = PeerOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON status line per update instead."),
    every: float = typer.Option(1.5, "--every", help="Seconds between updates."),
) -> None:
    """Follow a job live until it ends: round, loss, validation, ETA and every peer."""
    import time

    from swarm.client import ENDED, Client

    try:
        with Client(peer) as client:
            if as_json:
                while True:
                    status = client.status(job_id)
                    typer.echo(json.dumps(status, sort_keys=True))
                    if status["state"] in ENDED:
                        return
                    time.sleep(every)
            from rich.console import Console
            from rich.live import Live

            from swarm.watch import render

            status = client.status(job_id)
            if status.get("type") in ("sweep", "inference"):  # reprinted as it changes
                shown = None
                lines_of = _sweep_lines if status["type"] == "sweep" else _inference_lines
                while True:
                    lines = lines_of(status)
                    if lines != shown:
                        typer.echo(lines)
                        shown = lines
                    if status["state"] in ENDED:
                        return
                    time.sleep(every)
                    status = client.status(job_id)
            with Live(render(status), console=Console(), refresh_per_second=4) as live:
                while status["state"] not in ENDED:
                    time.sleep(every)
                    status = client.status(job_id)
                    live.update(render(status))
    except GPUFlexError as e:
        _fail(e)
    except KeyboardInterrupt:
        pass


@job_app.command("result")
def job_result(
    job_id: str,
    peer: str = PeerOption,
    out: Path = typer.Option(Path("out"), "-o", "--out", help="Folder for model.safetensors and report.json."),
) -> None:
    """Download the final model and report, verified against the swarm's signed records."""
    from swarm.client import Client

    try:
        with Client(peer) as client:
            files = client.result(job_id, out)
    except GPUFlexError as e:
        _fail(e)
    report = json.loads(files.report.read_text())
    if report.get("type") == "inference":
        typer.echo(f"predictions  {files.model}  (sha256 {files.model_id[:16]}…, verified: {report['rows']:,} rows "
                   f"from {len(report['peers'])} peers, {len(report['checks'])} checks)")
        typer.echo(f"report       {files.report}")
        if report["disputed"]:  # a rejection no third peer was there to settle: the predictor's stands
            typer.echo(f"warning: {len(report['disputed'])} shard(s) stayed disputed (one re-run disagreed, no third "
                       "peer settled it): see report.json", err=True)
        return
    typer.echo(f"model   {files.model}  (sha256 {files.model_id[:16]}…, verified)")
    typer.echo(f"report  {files.report}")
    if files.tracking_run:
        typer.echo(f"mlflow  run {files.tracking_run}")
    if files.tracking_error:
        typer.echo(f"warning: the result is fine, but logging it to MLflow failed: {files.tracking_error}", err=True)
    for extra in files.extras:
        typer.echo(f"        {extra}")
    if report.get("type") == "sweep":
        best = report["best"]
        shown = ", ".join(f"{k}={v}" for k, v in sorted(best["params"].items()))
        typer.echo(f"  best trial {best['trial']} (job {best['job_id']}): {report['search']['metric']} "
                   f"{best['value']:.4f} with {shown}")
    for key, value in sorted(report.get("final", {}).items()):
        typer.echo(f"  {key} {value:.4f}" if isinstance(value, float) else f"  {key} {value}")


@job_app.command("audit")
def job_audit(
    job_id: str,
    peer: str = PeerOption,
    deployment: Optional[Path] = typer.Option(
        None, "--deployment", help="Chain deployment file: also check each round's contribution root on chain."),
    skip_models: bool = typer.Option(False, "--skip-models", help="Do not download and re-hash every round's model."),
) -> None:
    """Walk the job's signed round chain and print its timeline; exit 1 on any break."""
    from swarm.client import Client

    try:
        ledger = None
        if deployment is not None:
            from ledger.chain import Ledger

            ledger = Ledger.from_file(deployment.expanduser())
        with Client(peer) as client:
            audit = client.audit(job_id, ledger=ledger, check_models=not skip_models)
    except GPUFlexError as e:
        _fail(e)
    typer.echo(f"{'round':>5}  {'peers':>5}  {'shards':>6}  {'samples':>7}  {'loss':>7}  {'val_acc':>7}  "
               f"{'model':<12}  {'digest':<12}  check")
    for r in audit.rounds:
        loss = f"{r.train_loss:.4f}" if r.train_loss is not None else "-"
        acc = f"{r.val_accuracy:.4f}" if r.val_accuracy is not None else "-"
        typer.echo(f"{r.round:>5}  {len(r.peers):>5}  {r.shards:>6}  {r.samples:>7}  {loss:>7}  {acc:>7}  "
                   f"{(r.model_id or '-')[:12]:<12}  {(r.digest or '-')[:12]:<12}  "
                   f"{'ok' if not r.breaks else 'BROKEN: ' + '; '.join(r.breaks)}")
    for problem in audit.problems:
        typer.echo(f"BROKEN: {problem}")
    if audit.rejected_records:
        typer.echo(f"note: {audit.rejected_records} forged or malformed records were ignored")
    if not audit.ok:
        typer.echo(f"error: job {job_id}: the history does not check out", err=True)
        raise typer.Exit(1)
    state = "finished" if audit.finished else "in progress"
    typer.echo(f"job {job_id}: {len(audit.rounds)} rounds, chain intact, {state}")


@job_app.command("refund")
def job_refund(
    job_id: str,
    peer: str = PeerOption,
    wallet: Path = typer.Option(Path("~/.gpuflex/wallet.json"), "--wallet", help="The consumer's key file."),
    deployment: Path = typer.Option(Path("~/.gpuflex/deployment.json"), "--deployment"),
) -> None:
    """Consumer: close a finished paid job (or one past its deadline) and get the unspent budget back."""
    refunded, address = escrow_command(peer, wallet, deployment, lambda client, ledger: client.refund(job_id, ledger))
    typer.echo(f"refunded {refunded:,.6f} GPUX to {address}")


@job_app.command("cancel")
def job_cancel(
    job_id: str,
    peer: str = PeerOption,
    wallet: Path = typer.Option(Path("~/.gpuflex/wallet.json"), "--wallet", help="The consumer's key file (paid jobs)."),
    deployment: Path = typer.Option(Path("~/.gpuflex/deployment.json"), "--deployment"),
    consumer_key: Optional[Path] = typer.Option(
        None, "--consumer-key", help="The key the job was submitted with (default ~/.gpuflex/consumer.key)."),
) -> None:
    """Consumer: cancel a job. Its peers stop at the next round boundary and the result is the last
    merged model; a paid job's unspent budget comes back now."""
    from ledger.chain import GPUX
    from swarm.client import Client

    try:
        with Client(peer, consumer_key=consumer_key) as client:
            paid = client.job(job_id).escrow is not None
            ledger = open_ledger(deployment, wallet, None) if paid else None
            refunded = client.cancel(job_id, ledger)
    except GPUFlexError as e:
        _fail(e)
    if paid:
        typer.echo(f"cancelled; refunded {refunded / GPUX:,.6f} GPUX to {ledger.address}")
    else:
        typer.echo(f"cancelled job {job_id}: its peers stop at the next round boundary")


@job_app.command("list")
def job_list(peer: str = PeerOption) -> None:
    """Jobs the swarm knows."""
    from swarm.client import Client

    try:
        with Client(peer) as client:
            for job in client.jobs():
                typer.echo(f"{job.job_id}  {job.spec['name']}  rounds {job.spec['training']['rounds']}")
    except GPUFlexError as e:
        _fail(e)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
