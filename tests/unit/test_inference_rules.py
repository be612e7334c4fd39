"""The rules of an inference job (swarm.inference, the inference parts of swarm.spec and
swarm.shards), tested on hand-made records: who takes which shard, what is re-run, which
predictions count, who is caught, and the bytes of predictions.csv."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from swarm.inference import (
    OutputsMalformed,
    Prediction,
    Verdict,
    checks_to_make,
    decode_outputs,
    encode_outputs,
    next_shard,
    outputs_agree,
    predictions_csv,
    resolve,
    result_problem,
)
from swarm.shards import InputsMismatch, ShardIntegrityError, decode_inputs, shard_inputs, weights_manifest
from swarm.spec import JobSpec, JobSpecError

SHARDS = [hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]
ROWS = {s: 10 for s in SHARDS}


def pid(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------- who does what


def test_a_peer_takes_a_shard_nobody_has_predicted_or_holds():
    covered, claims = {SHARDS[0]}, {"peer-b": SHARDS[1]}
    for me in ("peer-a", "peer-c", "peer-d"):
        assert next_shard(me, SHARDS, covered, claims) in SHARDS[2:]
    assert next_shard("peer-a", SHARDS, set(SHARDS[:3]), {"peer-b": SHARDS[3]}) is None  # the rest is held


def test_peers_arriving_together_start_at_different_shards():
    starts = {next_shard(f"peer-{i}", SHARDS * 1, set(), {}) for i in range(12)}
    assert len(starts) >= 3


def test_checks_cover_every_other_predictor_at_least_once_and_skip_our_own_work():
    accepted = {SHARDS[0]: ("a", pid("0")), SHARDS[1]: ("a", pid("1")), SHARDS[2]: ("b", pid("2")),
                SHARDS[3]: ("me", pid("3"))}
    never = lambda *_: 0.99  # noqa: E731  (no draw under the share: only the designated checker's lowest)
    # the ring a < b < me: a's designated checker is b, b's is me, me's is a
    assert checks_to_make("me", accepted, 0.25, never, ["a", "b"]) == [("b", SHARDS[2])]
    assert checks_to_make("b", accepted, 0.25, never, ["a", "me"]) == [("a", min(SHARDS[0], SHARDS[1]))]
    always = lambda *_: 0.0  # noqa: E731
    assert len(checks_to_make("me", accepted, 0.25, always, ["a", "b"])) == 3
    assert checks_to_make("me", accepted, 0.25, always, ["a", "b"], done={("a", SHARDS[0]), ("a", SHARDS[1])}) \
        == [("b", SHARDS[2])]
    assert checks_to_make("me", accepted, 0.0, always, ["a", "b"]) == []


def test_the_checkers_share_the_fraction_so_more_peers_do_not_mean_more_reruns():
    import random

    shards = {hashlib.sha256(i.to_bytes(2, 'big')).hexdigest(): ("p", pid(str(i))) for i in range(400)}
    for n in (3, 9):
        checkers = [f"c{i}" for i in range(n)]
        total = 0
        for me in checkers:
            rng = random.Random(me)
            draws: dict = {}
            total += len(checks_to_make(me, shards, 0.25, lambda *key: draws.setdefault(key, rng.random()),
                                        checkers + ["p"]))
        assert 0.15 * 400 < total < 0.35 * 400, (n, total)  # about a quarter, with 3 checkers as with 9


# ------------------------------------------------------------------------------- which predictions count


def records(*entries) -> list[Prediction]:
    return [Prediction(author, SHARDS[i], pid(f"{author}{i}"), 10) for author, i in entries]


def test_every_shard_takes_its_lowest_id_predictor_and_a_missing_one_is_listed():
    view = resolve(SHARDS, records(("b", 0), ("a", 0), ("b", 1), ("c", 2)), [], ROWS)
    assert view.accepted[SHARDS[0]].author == "a" and view.accepted[SHARDS[1]].author == "b"
    assert view.missing == [SHARDS[3]] and not view.complete and not view.caught


def test_predictions_with_the_wrong_row_count_never_count():
    wrong = [Prediction("a", SHARDS[0], pid("x"), 9)]
    assert resolve(SHARDS[:1], wrong, [], ROWS).missing == [SHARDS[0]]


def test_one_rejection_is_a_dispute_two_catch_the_predictor_and_drop_all_its_shards():
    preds = records(("cheat", 0), ("cheat", 1), ("b", 2), ("c", 3))
    reject = lambda checker: Verdict(checker, "cheat", SHARDS[0], pid("cheat0"), ok=False)  # noqa: E731
    disputed = resolve(SHARDS, preds, [reject("b")], ROWS)
    assert disputed.disputed == {("cheat", SHARDS[0]): {"cheat", "b"}} and not disputed.caught
    caught = resolve(SHARDS, preds, [reject("b"), reject("c")], ROWS)
    assert caught.caught == {"cheat"} and caught.missing == SHARDS[:2]  # both its shards are dealt again
    assert not caught.disputed
    # ... and once an honest peer predicted them, the job is complete without the cheat
    redone = resolve(SHARDS, preds + records(("b", 0), ("c", 1)), [reject("b"), reject("c")], ROWS)
    assert redone.complete and {p.author for p in redone.accepted.values()} == {"b", "c"}


def test_a_checker_that_two_reruns_contradict_is_caught_itself():
    preds = records(("a", 0), ("b", 1))
    verdicts = [Verdict("liar", "a", SHARDS[0], pid("a0"), ok=False),
                Verdict("b", "a", SHARDS[0], pid("a0"), ok=True), Verdict("c", "a", SHARDS[0], pid("a0"), ok=True)]
    view = resolve(SHARDS[:2], preds, verdicts, ROWS)
    assert view.caught == {"liar"} and not view.disputed and view.complete


def test_a_peer_can_not_reject_or_vouch_for_its_own_predictions():
    preds = records(("a", 0))
    verdicts = [Verdict("a", "a", SHARDS[0], pid("a0"), ok=True), Verdict("b", "a", SHARDS[0], pid("a0"), ok=False),
                Verdict("c", "a", SHARDS[0], pid("a0"), ok=False)]
    assert resolve(SHARDS[:1], preds, verdicts, ROWS).caught == {"a"}


def test_each_row_is_paid_once_to_its_accepted_predictor():
    from dht.records import PredictionRecord
    from peer.inference_runner import paid_records
    from peer.payout import contribution_units, payable

    entries = [("a", 0), ("b", 0), ("a", 1), ("b", 2), ("b", 3)]
    view = resolve(SHARDS, records(*entries), [], ROWS)

    def units(wallets: dict) -> dict:
        signed = [PredictionRecord(peer_id=author, job_id="0" * 24, shard=SHARDS[i], predictions_id=pid(f"{author}{i}"),
                                   rows=10, wallet=wallets[author]) for author, i in entries]
        report = {"shards": [{"shard": s, "predictor": p.author, "predictions_id": p.predictions_id, "rows": p.rows}
                             for s, p in view.accepted.items()]}
        paid = paid_records(report, signed, "0" * 24)
        return contribution_units(payable(paid, {p.peer_id for p in paid}))

    assert units({"a": "0xA", "b": "0xB"}) == {"0xA": 20, "0xB": 20}
    assert units({"a": "0xA", "b": None}) == {"0xA": 20}  # no wallet, no pay


# ------------------------------------------------------------------------------- outputs and the file


def test_outputs_agree_within_float_noise_but_not_on_another_class():
    a = np.array([[0.7, 0.3], [0.2, 0.8]], dtype=np.float32)
    assert outputs_agree(a, a + 3e-6, "classification") == (True, "")
    ok, why = outputs_agree(a, a[:, ::-1].copy(), "classification")
    assert not ok and "2 of 2 rows get another class" in why
    ok, why = outputs_agree(np.array([[1.0]], np.float32), np.array([[1.01]], np.float32), "regression")
    assert not ok and "beyond tolerance" in why


def test_outputs_are_checked_against_their_id_and_shape():
    blob = encode_outputs(np.ones((3, 2), np.float32))
    good = hashlib.sha256(blob).hexdigest()
    assert decode_outputs(blob, good, 3, 2).shape == (3, 2)
    with pytest.raises(OutputsMalformed, match="content hash mismatch"):
        decode_outputs(blob + b"x", good, 3, 2)
    with pytest.raises(OutputsMalformed, match=r"shape \(4, 2\)"):
        decode_outputs(blob, good, 4, 2)


def test_predictions_csv_is_one_line_per_row_in_order_with_labels_and_probabilities():
    shards = [np.array([[0.9, 0.1]], np.float32), np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)]
    text = predictions_csv(shards, "classification", ["cat", "dog"], probabilities=True).decode()
    assert text == "row,prediction,p_cat,p_dog\n0,cat,0.9,0.1\n1,dog,0.25,0.75\n2,cat,0.5,0.5\n"
    assert predictions_csv(shards, "classification", ["cat", "dog"], probabilities=False).decode().splitlines()[1] \
        == "0,cat"
    assert predictions_csv([np.array([[151.25]], np.float32)], "regression", None, True) == \
        b"row,prediction\n0,151.25\n"


# ------------------------------------------------------------------------------- shards of the input


def test_inputs_are_cut_in_order_and_must_be_the_models_features():
    features = np.arange(12, dtype=np.float32).reshape(6, 2)
    model = weights_manifest("classification", [2], ["x", "y"], ["0", "1"])
    manifest, blobs = shard_inputs(features, ["x", "y"], model, shard_rows=4)
    assert [s.rows for s in manifest.shards] == [4, 2] and manifest.inference and manifest.predict_rows == 6
    first = decode_inputs(blobs[manifest.shards[0].id], manifest.shards[0].id, manifest)
    assert first.tolist() == features[:4].tolist()
    with pytest.raises(ShardIntegrityError, match="content hash mismatch"):
        decode_inputs(blobs[manifest.shards[1].id], manifest.shards[0].id)
    with pytest.raises(InputsMismatch, match="column 2 is 'z', the model was trained with 'y'"):
        shard_inputs(features, ["x", "z"], model, shard_rows=4)
    with pytest.raises(InputsMismatch, match=r"rows of shape \[3\]"):
        shard_inputs(np.zeros((2, 3), np.float32), ["x", "y", "z"], model, shard_rows=4)


# ------------------------------------------------------------------------------- the job file


def inference(**overrides) -> dict:
    job = {"name": "predict", "type": "inference", "model": {"from_job": "0" * 24},
           "data": {"path": "rows.csv", "format": "csv"}}
    job.update(overrides)
    return job


def test_an_inference_job_needs_no_training_block_and_no_label():
    spec = JobSpec.from_dict(inference())
    assert spec.training is None and spec.inference.batch_size == 256
    again = JobSpec.from_dict(spec.to_dict())
    assert again == spec and "training" not in spec.to_dict()


@pytest.mark.parametrize("overrides, message", [
    ({"training": {"rounds": 1, "local_steps": 1, "batch_size": 1, "lr": 0.1}},
     "training: not used by an inference job"),
    ({"model": {"from_job": "0" * 24, "hidden": [8]}}, "model.hidden: not used with 'from_job'"),
    ({"model": {"catalog": "mlp"}}, "model.init_from: an inference job needs trained weights"),
    ({"model": {"catalog": "mlp", "init_from": "w.safetensors"}}, "task: required with a weights file"),
    ({"model": {"catalog": "mlp", "init_from": "w.safetensors"}, "task": "classification"},
     "data.classes: required with a weights file"),
    ({"data": {"path": "rows.csv", "format": "csv", "sharding": "stratified"}},
     "data.sharding: not used by an inference job"),
    ({"data": {"federated": "clinic", "label_column": "y"}}, "data.federated: an inference job predicts a shared"),
    ({"aggregation": {"reducer": "trimmed_mean"}}, "aggregation: not used by an inference job"),
])
def test_a_wrong_inference_job_file_names_the_field(overrides, message):
    with pytest.raises(JobSpecError, match=message):
        JobSpec.from_dict(inference(**overrides))


def test_a_training_job_still_needs_its_training_block_and_may_not_name_from_job():
    job = {"name": "t", "task": "classification", "model": {"catalog": "mlp"},
           "data": {"path": "d.csv", "format": "csv", "label_column": "label"}}
    with pytest.raises(JobSpecError, match="training: required field is missing"):
        JobSpec.from_dict(job)
    training = {"rounds": 1, "local_steps": 1, "batch_size": 1, "lr": 0.1}
    with pytest.raises(JobSpecError, match="model.from_job: only for an inference job"):
        JobSpec.from_dict({**job, "training": training, "model": {"catalog": "mlp", "from_job": "0" * 24}})
    with pytest.raises(JobSpecError, match="data.label_column: required for format 'csv'"):
        JobSpec.from_dict({**job, "training": training, "data": {"path": "d.csv", "format": "csv"}})


def test_a_peer_naming_two_predictions_for_one_shard_is_caught():
    two = records(("a", 0)) + [Prediction("a", SHARDS[0], pid("other"), 10)] + records(("b", 1))
    view = resolve(SHARDS[:2], two, [], ROWS)
    assert view.caught == {"a"} and view.missing == [SHARDS[0]]


def test_a_liars_rejections_do_not_count_against_the_peers_it_rejected():
    # x is contradicted on a's shard by two re-runs; its rejection of p (with y's) then counts as one
    preds = records(("a", 0), ("p", 1))
    verdicts = [Verdict("x", "a", SHARDS[0], pid("a0"), ok=False), Verdict("b", "a", SHARDS[0], pid("a0"), ok=True),
                Verdict("c", "a", SHARDS[0], pid("a0"), ok=True),
                Verdict("x", "p", SHARDS[1], pid("p1"), ok=False), Verdict("y", "p", SHARDS[1], pid("p1"), ok=False),
                Verdict("z", "p", SHARDS[1], pid("p1"), ok=True)]
    view = resolve(SHARDS[:2], preds, verdicts, ROWS)
    assert view.caught == {"x"} and view.accepted[SHARDS[1]].author == "p"
    assert ("p", SHARDS[1]) in view.disputed  # y's rejection alone against z's confirmation: a third re-run settles it


def test_verdicts_on_predictions_nobody_published_never_count():
    verdicts = [Verdict(c, "a", SHARDS[0], pid("made up"), ok=False) for c in ("x", "y", "z")]
    assert not resolve(SHARDS[:1], records(("a", 0)), verdicts, ROWS).caught


def test_a_result_must_be_the_settled_predictions_each_confirmed_by_another_peer():
    preds = records(("a", 0), ("b", 1))
    view = resolve(SHARDS[:2], preds, [], ROWS)
    entries = [(SHARDS[0], "a", pid("a0")), (SHARDS[1], "b", pid("b1"))]
    confirm = [Verdict("b", "a", SHARDS[0], pid("a0"), ok=True), Verdict("a", "b", SHARDS[1], pid("b1"), ok=True)]
    assert result_problem(entries, SHARDS[:2], view, confirm, solo_ok=False) is None
    assert "no other peer re-ran and confirmed any of b" in result_problem(entries, SHARDS[:2], view, confirm[:1],
                                                                           solo_ok=False)
    forged = [(SHARDS[0], "m", pid("m0")), (SHARDS[1], "m", pid("m1"))]  # a peer's own made-up result
    assert "not the ones the signed records settle on" in result_problem(forged, SHARDS[:2], view, confirm, False)
    assert "not the job's, in order" in result_problem(entries[::-1], SHARDS[:2], view, confirm, False)
    alone = resolve(SHARDS[:1], records(("a", 0)), [], ROWS)
    assert result_problem(entries[:1], SHARDS[:1], alone, [], solo_ok=True) is None  # min_peers 1, one peer
    assert result_problem(entries[:1], SHARDS[:1], alone, [], solo_ok=False) is not None


def test_a_near_tie_within_tolerance_is_the_same_prediction():
    a = np.array([[0.50001, 0.49999]], dtype=np.float32)
    assert outputs_agree(a, a[:, ::-1].copy(), "classification") == (True, "")
    far = np.array([[0.6, 0.4]], dtype=np.float32)
    assert outputs_agree(far, far + 0.005, "classification", atol=1e-2)[0]  # cross-device tolerance
    assert not outputs_agree(far, far + 0.005, "classification")[0]
