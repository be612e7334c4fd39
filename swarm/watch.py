"""The live view of ``gpuflex job watch``: a pure function from a job status to a rich renderable."""

from __future__ import annotations

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 24) -> str:
    values = [v for v in values if v is not None][-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * (len(SPARK) - 1)))] for v in values)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def render(status: dict):
    head = Table.grid(padding=(0, 2))
    head.add_row(Text(f"job {status['job_id']} ({status['name']})", style="bold"), Text(status["state"], style="cyan"))
    bar = ProgressBar(total=status["rounds"], completed=status["rounds_done"], width=40)
    head.add_row(f"round {status['round']}/{status['rounds']}", bar)
    history = status.get("history", [])
    if status.get("train_loss") is not None:
        head.add_row("train loss", f"{status['train_loss']:.4f}  {sparkline([h['train_loss'] for h in history])}")
    for key in ("val_accuracy", "val_loss", "val_mse", "val_mae"):
        if status.get(key) is not None:
            head.add_row(key.replace("_", " "), f"{status[key]:.4f}  {sparkline([h.get(key) for h in history])}")
    head.add_row("ETA", _duration(status.get("eta_s")))
    rows = status.get("peer_rows", [])
    done = sum(1 for r in rows if r["done"])
    head.add_row("peers", f"{done}/{len(rows)} peers done round {status['round']} (min {status['min_peers']}, "
                 f"{status['live_peers']} live in the swarm)")

    peers = Table(show_edge=False, header_style="bold")
    for column in ("peer", "device", "ref samples/s", "shards", "this round", "last seen"):
        peers.add_column(column)
    for row in rows:
        peers.add_row(
            row["peer_id"][:16] + "…",
            f"{row['device'] or '?'} ({row['device_name'] or '?'})",
            f"{row['samples_per_sec']:,.0f}" if row["samples_per_sec"] is not None else "—",
            str(row["shards"]) if row["shards"] is not None else "—",
            "done" if row["done"] else "training",
            f"{row['last_seen_s']:.0f}s ago" if row["last_seen_s"] is not None else "gone",
        )
    return Group(head, peers)
