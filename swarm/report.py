"""Turning the swarm's progress records into what a consumer reads: job status and the report.

Pure functions over records: the peers that write the final report and the CLI that shows a
job's status compute the same numbers from the same records.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

from dht.records import JobRecord, ProgressRecord, ResultRecord
from peer.provenance import agreed_model, result_problem
from peer.schedule import handover, majority_model


def val_metrics(task: str, records: Iterable[ProgressRecord]) -> dict:
    """Validation metrics of a round, from the partial sums each peer computed on its share."""
    merged = [p for p in records if p.phase == "merged"]
    pooled = [p for p in merged if p.val_pooled]
    if pooled:  # a secure federated round: every member holds the group's sums; take them once
        def sums(p):
            return p.val_rows, p.val_loss_sum, p.val_correct

        common = Counter(map(sums, pooled)).most_common(1)[0][0]
        merged = [next(p for p in pooled if sums(p) == common)]
    rows = sum(p.val_rows for p in merged)
    if rows == 0:
        return {}
    metrics = {"val_rows": rows, "val_loss": sum(p.val_loss_sum for p in merged) / rows}
    if task == "classification":
        metrics["val_accuracy"] = sum(p.val_correct for p in merged) / rows
    else:
        metrics["val_mse"] = sum(p.val_sq_error_sum for p in merged) / rows
        metrics["val_mae"] = sum(p.val_abs_error_sum for p in merged) / rows
    return metrics


def round_summary(round_no: int, progress: list[ProgressRecord], task: str) -> dict:
    merged = {p.peer_id: p.model_id for p in progress if p.phase == "merged" and p.model_id}
    agreed = majority_model(merged)
    # once the round is merged, only work that made it into the agreed model counts (a peer that
    # trained and then crashed mid-merge contributed nothing); while it runs, all training shows
    worked = [p for p in progress if p.phase == "merged" and p.model_id == agreed] if agreed else [
        p for p in progress if p.phase in ("trained", "merged")]
    samples = sum(p.samples for p in worked)
    losses = [(p.train_loss, p.samples) for p in worked if p.train_loss is not None and p.samples]
    return {
        "round": round_no,
        "peers_joined": sorted(p.peer_id for p in progress),
        "peers_done": sorted(merged),
        "samples": samples,
        "train_loss": sum(loss * n for loss, n in losses) / sum(n for _, n in losses) if losses else None,
        "model_id": agreed,
        "shards": {p.peer_id: len(p.shards) for p in worked},
        "lr": next((p.lr for p in worked if p.lr is not None), None),
        "samples_by_peer": {p.peer_id: p.samples for p in worked},
        "seconds_training": max((p.seconds_training for p in progress), default=0.0),
        "seconds_merging": max((p.seconds_merging for p in progress), default=0.0),
        "seconds_matchmaking": max((p.seconds_matchmaking for p in progress), default=0.0),
        "seconds_waiting": max((p.seconds_waiting for p in progress), default=0.0),
        "finished_at": max((p.time for p in progress if p.phase == "merged"), default=None),
        # work stealing: a straggler cut at the deadline (its steps done, and handed to whom),
        # and the steps each taker trained on its shards
        **({"cut": cut} if (cut := {p.peer_id: {"steps_done": p.steps_done, "handed": {
            taker: count for taker, (_, count) in handover(p.steps_done, p.steps_handed, p.handed_to).items()}}
            for p in worked if p.steps_done is not None}) else {}),
        **({"taken_over": taken} if (taken := {p.peer_id: {s: count for s, (_, count) in p.took_from.items()}
                                               for p in worked if p.took_from}) else {}),
        # federated DP: the privacy each owner had spent by the end of this round
        **({"epsilon_by_peer": eps} if (eps := {p.peer_id: p.epsilon_spent for p in worked
                                                if p.epsilon_spent is not None}) else {}),
        **val_metrics(task, progress),
    }


def privacy_summary(spec: dict, rounds: list[dict]) -> dict | None:
    """What a federated job's privacy actually was: the guarantee asked, what each owner spent."""
    privacy = spec.get("privacy")
    if not privacy:
        return None
    spent: dict[str, float] = {}
    for summary in rounds:
        for peer, eps in summary.get("epsilon_by_peer", {}).items():
            spent[peer] = max(spent.get(peer, 0.0), eps)
    dp = privacy.get("dp")
    if dp:
        unit = "one record of an owner's data" if dp["level"] == "sample" else "one owner's whole dataset"
        guarantee = (f"({max(spent.values(), default=0.0):.4g}, {dp['delta']:g})-differential privacy for {unit} "
                     f"(asked: epsilon {dp['epsilon']:g})")
    else:
        guarantee = "no differential privacy: updates are not noised"
    return {
        "dp": dp,
        "secure_aggregation": bool(privacy.get("secure_aggregation")),
        "epsilon_spent_by_owner": spent,
        "epsilon_spent": max(spent.values(), default=0.0) if dp else None,
        "guarantee": guarantee + ("; each round's updates were summed under secure aggregation (no peer saw one "
                                  "owner's update)" if privacy.get("secure_aggregation") else
                                  "; the updates were averaged in the open"),
    }


def build_report(job: JobRecord, manifest, rounds: list[dict], *, model_id: str, finished_at: float,
                 faults: dict[str, list[int]] | None = None, cancelled: bool = False) -> dict:
    participants: dict[str, dict] = {}
    for summary in rounds:
        for peer, samples in summary["samples_by_peer"].items():
            entry = participants.setdefault(peer, {"rounds": 0, "samples": 0, "shard_rounds": 0})
            entry["rounds"] += 1
            entry["samples"] += samples
            entry["shard_rounds"] += summary["shards"].get(peer, 0)
    final = next((r for r in reversed(rounds) if "val_rows" in r), {})
    return {
        "job_id": job.job_id,
        "name": job.spec["name"],
        "task": job.spec["task"],
        "model": job.spec["model"],
        "training": job.spec["training"],
        "dataset_id": job.dataset_id,
        "dataset": {"train_rows": manifest.train_rows, "val_rows": manifest.val_rows, "shards": len(manifest.shards)},
        "model_id": model_id,
        "final": {k: v for k, v in final.items() if k.startswith("val_")},
        "rounds": rounds,
        # a job that met its stop_when before its last round: the model is that round's
        "stopped_early": ({"after_round": len(rounds), "condition": job.spec["training"].get("stop_when")}
                          if len(rounds) < job.spec["training"]["rounds"] and not cancelled else None),
        # the consumer cancelled: the model is the last round merged before the peers saw it
        "cancelled": {"after_round": len(rounds)} if cancelled else None,
        "participants": participants,
        "privacy": privacy_summary(job.spec, rounds),  # federated jobs: the guarantee spent
        "faults": faults or {},  # peer -> rounds whose contribution failed re-execution (paid nothing)
        "submitted_at": job.submitted_at,
        "finished_at": finished_at,
        "wall_time_s": finished_at - job.submitted_at,
    }


def genuine_results(job: JobRecord, results: Iterable[ResultRecord],
                    progress_of: Callable[[int], list[ProgressRecord]], cancel_signed: bool) -> list[ResultRecord]:
    """A training job's result records that check out against the round each names
    (``peer.provenance.result_problem``), lowest author first. Anyone can sign a result record:
    a forged one must end the job for no peer, and show no consumer a finished job.
    ``progress_of(n)``: round n's progress records; ``cancel_signed``: its consumer signed a cancel."""
    from swarm.spec import stop_condition_met

    training, genuine = job.spec["training"], []
    for result in sorted(results, key=lambda r: r.peer_id):
        final_round = progress_of(result.rounds_completed)
        model_id = agreed_model(final_round)  # the metric the group stopped on: its merged records only
        group = [p for p in final_round if p.phase == "merged" and p.model_id == model_id]
        stop_met = stop_condition_met(training.get("stop_when"),
                                      round_summary(result.rounds_completed, group, job.spec["task"]))
        if result_problem(result, final_round, rounds=training["rounds"], stop_met=stop_met,
                          cancel_signed=cancel_signed) is None:
            genuine.append(result)
    return genuine


def job_status(job: JobRecord, rounds: list[dict], results: list[ResultRecord], live_peers: int,
               cancelled: bool = False) -> dict:
    """What ``gpuflex job status`` shows: state, round r/R, loss, validation metrics, peers.

    ``cancelled``: its consumer signed a cancel. The job is "cancelling" until its peers publish
    the last merged model as the result (or at once "cancelled", if no round ever merged).
    """
    total = job.spec["training"]["rounds"]
    agreed = Counter(r.model_id for r in results).most_common(1)
    started = [r for r in rounds if r["peers_joined"]]
    current = started[-1] if started else None
    done = [r for r in rounds if r["peers_done"]]
    if cancelled:
        state = "cancelled" if agreed or not done else "cancelling"
    elif agreed:
        state = "finished"
    elif current is None:
        state = "waiting for peers"
    else:
        state = "running"
    last = done[-1] if done else {}
    finished_times = [r["finished_at"] for r in done if r["finished_at"]]
    eta = None
    if state == "running" and len(finished_times) >= 2:  # measured rounds, not a guess
        per_round = (finished_times[-1] - finished_times[0]) / (len(finished_times) - 1)
        eta = per_round * (total - len(done))
    history = [
        {"round": r["round"], "train_loss": r["train_loss"], **{k: v for k, v in r.items() if k.startswith("val_")}}
        for r in done
    ]
    return {
        "job_id": job.job_id,
        "name": job.spec["name"],
        "state": state,
        "round": current["round"] if current else 0,
        "rounds": total,
        "rounds_done": len(done),
        "train_loss": last.get("train_loss"),
        **{k: v for k, v in last.items() if k.startswith("val_") and k != "val_rows"},
        "peers": current["peers_joined"] if current else [],
        "peers_done": current["peers_done"] if current else [],
        "min_peers": job.spec["swarm"]["min_peers"],
        "live_peers": live_peers,
        "model_id": agreed[0][0] if agreed else None,
        "eta_s": eta,
        "history": history,
    }
