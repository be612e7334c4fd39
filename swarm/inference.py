"""Batch inference: the rules of a ``type: inference`` job, as pure functions (no network, no torch).

The job's rows are cut into shards in input order (``swarm.shards.shard_inputs``). Each peer
takes the next shard nobody holds (:func:`next_shard`), predicts it and publishes the outputs as
a content-addressed blob (:func:`encode_outputs`) named in a signed ``PredictionRecord``. A
faster peer simply takes more shards; a dead peer's lease lapses and its shard is taken again.

Checking. Once every shard has predictions, every peer re-predicts a random sample of the
others' shards (:func:`checks_to_make`, drawn with its own randomness, after the work was
committed, so nobody can know in advance which of its shards will be re-run) and publishes a
verdict. A rejected shard is re-run by a third peer; a peer that two or more re-runs reject
(and more reject than accept) is caught, and so is a checker that two or more re-runs
contradict. A caught peer's predictions are all dropped and their shards dealt again
(:func:`resolve`). With no third peer to settle a dispute, the shard stays the predictor's and
the report says it was disputed.

The result: predictions.csv, the accepted outputs of every shard in input order
(:func:`predictions_csv`); anyone holding the signed records and the blobs can rebuild it and
check its hash.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from safetensors.numpy import load as _load
from safetensors.numpy import save as _save

from dht.errors import GPUFlexError

__all__ = ["Resolution", "checks_to_make", "next_shard", "predictions_csv", "resolve", "result_problem"]

# Two honest peers predicting the same rows on different hardware (or thread counts) sum in
# different orders: their outputs are close, not always equal. Probabilities and regression
# values within these bounds agree; a class label must be the same.
OUTPUT_ATOL = 1e-4
OUTPUT_RTOL = 1e-4
CAUGHT_AT = 2  # re-runs that must reject a peer's shard (and outnumber those that accept it)


class OutputsMalformed(GPUFlexError):
    """A predictions blob that does not hash to its id or is not a shard's outputs."""


def encode_outputs(outputs: np.ndarray) -> bytes:
    """A shard's outputs, ``(rows, k)`` float32: class probabilities, or the regression value."""
    return _save({"outputs": np.ascontiguousarray(outputs, dtype=np.float32)})


def decode_outputs(blob: bytes, expected_id: str, rows: int, width: int) -> np.ndarray:
    """Outputs fetched from a peer: checked against their id and the shard's shape first."""
    if hashlib.sha256(blob).hexdigest() != expected_id:
        raise OutputsMalformed(f"predictions {expected_id[:12]}: content hash mismatch (tampered or corrupt)")
    try:
        arrays = _load(bytes(blob))
    except Exception as e:  # safetensors raises its own error types on bad input
        raise OutputsMalformed(f"predictions {expected_id[:12]}: not a safetensors blob ({e})") from None
    out = arrays.get("outputs")
    if set(arrays) != {"outputs"} or out.dtype != np.float32 or out.shape != (rows, width) \
            or not np.isfinite(out).all():
        raise OutputsMalformed(f"predictions {expected_id[:12]}: expected finite float32 outputs of shape "
                               f"({rows}, {width}), got {sorted(arrays)}")
    return out


def outputs_agree(a: np.ndarray, b: np.ndarray, task: str, atol: float = OUTPUT_ATOL) -> tuple[bool, str]:
    """Whether two peers' outputs for one shard are the same prediction (and, if not, where not).
    Within tolerance they agree, even where a near-tie tips a row's class the other way; ``atol``
    is looser when the two ran on different device kinds."""
    if a.shape != b.shape:
        return False, f"shape {a.shape} vs {b.shape}"
    far = ~np.isclose(a, b, rtol=OUTPUT_RTOL, atol=atol)
    if far.any() and task == "classification":
        labels = np.flatnonzero(a.argmax(-1) != b.argmax(-1))
        if len(labels):
            return False, f"{len(labels)} of {len(a)} rows get another class (first: row {int(labels[0])})"
    if far.any():
        row = int(np.flatnonzero(far.any(-1))[0])
        return False, f"{int(far.any(-1).sum())} rows differ beyond tolerance (first: row {row}, " \
                      f"max difference {float(np.abs(a - b).max()):.3g})"
    return True, ""


# --------------------------------------------------------------------------- who does what


def next_shard(me: str, shard_ids: list[str], covered: set[str], claims: dict[str, str]) -> str | None:
    """The shard this peer should predict next: one nobody has predicted or holds a lease on.

    Peers start at different places of the list (an offset from their id), so that peers
    arriving together rarely reach for the same shard; ``claims``: other peer -> its shard.
    """
    held = set(claims.values())
    free = [s for s in shard_ids if s not in covered and s not in held]
    if not free:
        return None
    offset = int(hashlib.sha256(me.encode()).hexdigest(), 16) % len(free)
    return free[offset]


def checks_to_make(me: str, accepted: dict[str, tuple[str, str]], fraction: float, draw, checkers: Iterable[str],
                   done: set[tuple[str, str]] = frozenset()) -> list[tuple[str, str]]:
    """(predictor, shard) pairs this peer re-runs, so that about ``fraction`` of every predictor's
    shards are re-run once in all, however many peers check.

    ``checkers``: the live peers on the job. A predictor's shards are split among the others:
    this peer takes those with ``draw(predictor, shard, predictions_id) < fraction / (checkers
    but the predictor)``, and the one checker the ring after the predictor names also takes its
    lowest draw, so every predictor is checked at least once. ``draw`` is the checker's own
    uniform randomness, drawn after the work was committed (the same on every call for the same
    predictions), so no predictor can know which of its shards will be re-run. ``accepted``:
    shard -> (predictor, predictions id); ``done``: pairs already re-run."""
    if fraction <= 0:
        return []
    ring = sorted(set(checkers) | {me})
    by_peer: dict[str, list[tuple[float, str]]] = {}
    for shard, (peer, predictions_id) in sorted(accepted.items()):
        if peer != me:
            by_peer.setdefault(peer, []).append((draw(peer, shard, predictions_id), shard))
    picks = []
    for peer, draws in sorted(by_peer.items()):
        others = [c for c in ring if c != peer]
        share = fraction / len(others)
        chosen = [shard for value, shard in draws if value < share]
        designated = next((c for c in others if c > peer), others[0])  # the ring's next after the predictor
        if me == designated and not chosen:
            chosen = [min(draws)[1]]
        picks += [(peer, shard) for shard in chosen]
    return [p for p in picks if p not in done]


@dataclass(frozen=True)
class Prediction:
    """What ``resolve`` reads of one signed PredictionRecord."""

    author: str
    shard: str
    predictions_id: str
    rows: int
    device: str | None = None  # the device kind it was predicted on: a re-run elsewhere allows more noise


@dataclass(frozen=True)
class Verdict:
    """A checker's finding on (predictor, shard, predictions id): its re-run agreed or not."""

    checker: str
    target: str
    shard: str
    predictions_id: str
    ok: bool


@dataclass
class Resolution:
    accepted: dict[str, Prediction] = field(default_factory=dict)  # shard -> the predictions that count
    caught: set[str] = field(default_factory=set)  # peers whose predictions (or verdicts) re-runs contradict
    # (predictor, shard) a checker rejected and no majority has settled yet: a third peer re-runs it
    disputed: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # -> peers already involved
    missing: list[str] = field(default_factory=list)  # shards with no accepted predictions (input order)

    @property
    def complete(self) -> bool:
        return not self.missing


def resolve(shard_ids: list[str], predictions: Iterable[Prediction], verdicts: Iterable[Verdict],
            rows: dict[str, int]) -> Resolution:
    """Which predictions count for each shard, who is caught, and what is still disputed.

    The same answer on every peer that read the same records. A shard's accepted predictions
    are those of its lowest-id predictor that is not caught (ties: the lower predictions id);
    records with the wrong row count never count, nor verdicts on predictions nobody published.
    A peer that names two different predictions for one shard is caught (it would show two
    readers two results), and so is a predictor two re-runs reject (more than accept it) or a
    checker two re-runs contradict; a caught checker's verdicts do not count against anyone.
    """
    predictions = [p for p in predictions if p.rows == rows.get(p.shard)]
    published = {(p.author, p.shard, p.predictions_id) for p in predictions}
    verdicts = [v for v in verdicts if v.checker != v.target and (v.target, v.shard, v.predictions_id) in published]
    named: dict[tuple[str, str], set[str]] = {}
    for p in predictions:
        named.setdefault((p.author, p.shard), set()).add(p.predictions_id)
    equivocated = {author for (author, _), ids in named.items() if len(ids) > 1}
    def tally_of(excluded: set[str]) -> dict[tuple[str, str, str], tuple[set[str], set[str]]]:
        tally: dict[tuple[str, str, str], tuple[set[str], set[str]]] = {}
        for v in verdicts:
            if v.checker not in excluded:
                ok, bad = tally.setdefault((v.target, v.shard, v.predictions_id), (set(), set()))
                (ok if v.ok else bad).add(v.checker)
        return tally

    # a checker is a liar where two or more re-runs (and more than side with it) contradict it;
    # then the predictors are judged on the others' verdicts alone
    liars = set().union(*(bad for ok, bad in tally_of(equivocated).values() if len(ok) >= CAUGHT_AT
                          and len(ok) > len(bad))) if verdicts else set()
    tally = tally_of(liars | equivocated)
    rejected = {target for (target, _, _), (ok, bad) in tally.items() if len(bad) >= CAUGHT_AT and len(bad) > len(ok)}
    caught = rejected | liars | equivocated
    out = Resolution(caught=caught)
    by_shard: dict[str, list[Prediction]] = {}
    for p in predictions:
        if p.author not in caught:
            by_shard.setdefault(p.shard, []).append(p)
    for shard in shard_ids:
        candidates = sorted(by_shard.get(shard, []), key=lambda p: (p.author, p.predictions_id))
        if candidates:
            out.accepted[shard] = candidates[0]
        else:
            out.missing.append(shard)
    for (target, shard, pid), (ok, bad) in tally.items():
        chosen = out.accepted.get(shard)
        if bad and chosen is not None and (chosen.author, chosen.predictions_id) == (target, pid) \
                and not (len(ok) >= CAUGHT_AT and len(ok) > len(bad)):
            out.disputed[(target, shard)] = {target} | ok | bad
    return out


def accepted_digest(resolution: Resolution) -> str:
    """One hash of every shard's accepted predictions: a peer's "done checking" names the set it
    checked, so the result waits for checks of predictions that changed since."""
    text = ",".join(f"{s}:{p.author}:{p.predictions_id}" for s, p in sorted(resolution.accepted.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def confirmed_predictors(view: Resolution, verdicts: Iterable[Verdict]) -> set[str]:
    """The predictors another peer's re-run (not a caught peer's) found right on predictions the
    view accepts: what a result needs of every peer whose rows it carries."""
    return {v.target for v in verdicts if v.ok and v.checker != v.target and v.checker not in view.caught
            and (chosen := view.accepted.get(v.shard)) is not None
            and (chosen.author, chosen.predictions_id) == (v.target, v.predictions_id)}


def result_problem(entries: list[tuple[str, str, str]], shard_ids: list[str], view: Resolution,
                   verdicts: Iterable[Verdict], solo_ok: bool) -> str | None:
    """Why a result's shard list (shard, predictor, predictions id) must not be taken, or None.

    It must name every shard of the job, in order, each with predictions the view accepts, and
    every predictor in it must have been re-run at least once by another peer and found right
    (``solo_ok``: a job of one peer, ``min_peers: 1``, that nobody else could check). So a result
    made up by a peer that did the work of nobody, or that skipped the checks, is refused."""
    if [shard for shard, _, _ in entries] != shard_ids:
        return "its shards are not the job's, in order"
    for shard, predictor, predictions_id in entries:
        chosen = view.accepted.get(shard)
        if chosen is None or (chosen.author, chosen.predictions_id) != (predictor, predictions_id):
            return f"shard {shard[:12]}: its predictions are not the ones the signed records settle on"
    predictors = {predictor for _, predictor, _ in entries}
    unchecked = sorted(predictors - confirmed_predictors(view, verdicts))
    if unchecked and not (solo_ok and len(predictors) == 1):
        return f"no other peer re-ran and confirmed any of {unchecked[0][:12]}'s predictions"
    return None


# --------------------------------------------------------------------------- the result file


def predictions_csv(outputs: list[np.ndarray], task: str, classes: list[str] | None, probabilities: bool) -> bytes:
    """predictions.csv: one line per input row, in input order (``outputs``: each shard's, in
    manifest order). Classification: the label, and each class's probability if asked for;
    regression: the predicted value. Numbers are written with repr-exact float formatting, so
    the same outputs are always the same bytes."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if task == "classification":
        assert classes is not None
        writer.writerow(["row", "prediction"] + ([f"p_{c}" for c in classes] if probabilities else []))
    else:
        writer.writerow(["row", "prediction"])
    row = 0
    for shard in outputs:
        for values in shard:
            if task == "classification":
                line = [row, classes[int(values.argmax())]]
                line += [f"{float(v):.6g}" for v in values] if probabilities else []
            else:
                line = [row, f"{float(values[0]):.9g}"]
            writer.writerow(line)
            row += 1
    return buffer.getvalue().encode()
