"""What the result folder holds besides the model: a Markdown report and PNG plots.

Made on the consumer's machine from the verified ``report.json`` (nothing here is trusted from
the swarm beyond that file), with matplotlib's Agg backend so no display is needed.
"""

from __future__ import annotations

from pathlib import Path


def write_report_files(report: dict, out_dir: Path, rating: dict | None = None) -> list[Path]:
    """Write report.md, curves.png (loss and validation per round) and contributions.png.

    ``rating``: the consumer's verified rating (``Client.rating``), shown with the participants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rounds = report["rounds"]
    xs = [r["round"] for r in rounds]
    metric = "val_accuracy" if report["task"] == "classification" else "val_mse"

    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(xs, [r["train_loss"] for r in rounds], "o-", color="tab:blue", label="train loss")
    left.plot(xs, [r.get("val_loss") for r in rounds], "s--", color="tab:orange", label="validation loss")
    left.set_xlabel("round")
    left.set_ylabel("loss")
    right = left.twinx()
    right.plot(xs, [r.get(metric) for r in rounds], "^-", color="tab:green", label=metric.replace("_", " "))
    right.set_ylabel(metric.replace("_", " "))
    lines = left.get_lines() + right.get_lines()
    left.legend(lines, [line.get_label() for line in lines], loc="center right")
    left.set_title(f"{report['name']}: loss and {metric.replace('_', ' ')} per round")
    fig.tight_layout()
    curves = out_dir / "curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    participants = report["participants"]
    names = sorted(participants)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(names)))
    ax.barh([p[:12] + "…" for p in names], [participants[p]["samples"] for p in names], color="tab:purple")
    ax.set_xlabel("training samples processed")
    ax.set_title("contribution per peer")
    fig.tight_layout()
    contributions = out_dir / "contributions.png"
    fig.savefig(contributions, dpi=110)
    plt.close(fig)

    markdown = out_dir / "report.md"
    markdown.write_text(_markdown(report, metric, rating))
    return [markdown, curves, contributions]


def _markdown(report: dict, metric: str, rating: dict | None = None) -> str:
    final = report.get("final", {})
    lines = [
        f"# {report['name']} — job {report['job_id']}",
        "",
        f"- task: {report['task']}, model: `{ {k: v for k, v in report['model'].items() if v not in (None, {})} }`",
        f"- dataset {report['dataset_id'][:16]}…: {report['dataset']['train_rows']} training rows, "
        f"{report['dataset']['val_rows']} validation rows, {report['dataset']['shards']} shards",
        f"- model sha256: `{report['model_id']}`",
        f"- wall time: {report['wall_time_s']:.1f} s",
        *[f"- final {k.replace('_', ' ')}: {v:.4f}" for k, v in final.items() if isinstance(v, float)],
        *([f"- privacy: {report['privacy']['guarantee']}"] if report.get("privacy") else []),
        "",
        "![loss and validation per round](curves.png)",
        "",
        "## Rounds",
        "",
        f"| round | peers | samples | train loss | {metric.replace('_', ' ')} | training s | waiting s | "
        "matchmaking s | all-reduce s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rounds"]:
        loss = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "—"
        value = f"{r[metric]:.4f}" if r.get(metric) is not None else "—"
        lines.append(f"| {r['round']} | {len(r['peers_done'])} | {r['samples']} | {loss} | {value} | "
                     f"{r['seconds_training']:.2f} | {r.get('seconds_waiting', 0.0):.2f} | "
                     f"{r.get('seconds_matchmaking', 0.0):.2f} | "
                     f"{r['seconds_merging'] - r.get('seconds_matchmaking', 0.0):.2f} |")
    lines += ["", "## Participants", "", "![contribution per peer](contributions.png)", "",
              "| peer | rounds | samples | shard-rounds |", "|---|---:|---:|---:|"]
    for peer, p in sorted(report["participants"].items()):
        lines.append(f"| `{peer}` | {p['rounds']} | {p['samples']} | {p['shard_rounds']} |")
    if rating:
        lines += ["", f"Rated {stars(rating['stars'])} ({rating['stars']}/5) by the consumer"
                  + (f": “{rating['comment']}”" if rating["comment"] else "") + ", for the work of the peers above."]
    return "\n".join(lines) + "\n"


def stars(count: int) -> str:
    return "★" * count + "☆" * (5 - count)
