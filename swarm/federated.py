"""A federated job's checks on the consumer's side, from what owners advertise (no I/O here).

Before anything is published or paid, ``federated_manifest`` reads the owners' ``PrivateDataRecord``
s for the job's dataset name and refuses, in one line, a job no swarm could train as asked: no
owner, owners whose columns do not fit the job (label missing, text features, columns that differ
between owners), fewer fitting owners than ``swarm.min_peers``, or a privacy budget the job's
rounds cannot be run within (``aggregation.privacy``). Otherwise it returns the manifest peers
build the model from: feature names from the owners' columns, the job's classes, no shards.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from dht.errors import GPUFlexError
from dht.records import PrivateDataRecord
from peer.private_data import schema_problem
from swarm.shards import DatasetManifest
from swarm.spec import JobSpec


class FederatedJobRefused(GPUFlexError):
    """The federated job cannot run as asked on the owners the swarm has; nothing was published."""


def fitting_owners(spec: JobSpec, records: Sequence[PrivateDataRecord]) -> tuple[list[str], list[PrivateDataRecord], dict[str, str]]:
    """(the job's feature names, the owners whose dataset fits them, {peer: why not} for the rest).

    The feature columns are those most owners have (each owner's columns minus the label): one
    owner with a stray column is left out, it does not change the job for the others."""
    label, problems = spec.data.label_column, {}

    def sort_out(candidates, features):
        fit = []
        for record in candidates:
            why = schema_problem(record.columns, label, feature_names=features)
            if why:
                problems[record.peer_id] = why
            else:
                fit.append(record)
        return fit

    usable = sort_out(records, None)  # a label, number features: could serve some job
    if not usable:
        return [], [], problems
    layouts = Counter(tuple(c for c, _ in r.columns if c != label) for r in usable)
    features = list(max(layouts.items(), key=lambda kv: (kv[1], kv[0]))[0])
    return features, sort_out(usable, features), problems


def federated_manifest(spec: JobSpec, records: Sequence[PrivateDataRecord]) -> DatasetManifest:
    """The job's manifest, or ``FederatedJobRefused`` saying what keeps it from running."""
    name, min_peers = spec.data.federated, spec.swarm.min_peers
    if not records:
        raise FederatedJobRefused(f"data.federated: no peer in the swarm holds a private dataset {name!r}")
    features, owners, problems = fitting_owners(spec, records)
    if len(owners) < min_peers:
        why = "; ".join(f"{peer[:12]}: {p}" for peer, p in sorted(problems.items())) or "no other owner is online"
        raise FederatedJobRefused(f"data.federated: {len(owners)} owner(s) of {name!r} fit the job, it needs "
                                  f"swarm.min_peers={min_peers} ({why})")
    from aggregation.privacy import check_budget  # the accountant: torch-heavy, imported when needed

    check_budget(spec, [r.rows for r in owners], [r.rows for r in owners])
    rows = sum(r.rows for r in owners)
    val_rows = max(1, round(rows * spec.data.validation_fraction))
    classes = spec.data.class_names()
    return DatasetManifest(
        task=spec.task, feature_shape=[len(features)], feature_names=features, num_outputs=len(classes),
        classes=classes, feature_mean=[0.0] * len(features), feature_std=[1.0] * len(features), shards=[],
        train_rows=max(1, rows - val_rows), val_rows=val_rows, federated=name,
        owner_rows=sorted(r.rows for r in owners),
    )
