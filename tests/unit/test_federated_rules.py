"""Federated jobs without a network: the job file, private datasets, the consumer's checks, DP plans."""

from __future__ import annotations

import pytest
import torch

from aggregation.privacy import PrivacyBudgetError, check_budget, clip_update, gaussian_noise_like, noise_shares
from dht.records import PrivateDataRecord
from peer.local_training import Batches, train_local
from peer.private_data import PrivateDataError, load_private_dataset, owner_split, parse_private_data_option
from swarm.federated import FederatedJobRefused, federated_manifest
from swarm.spec import JobSpec, JobSpecError

COLUMNS = [("age", "number"), ("visits", "number"), ("readmitted", "text")]


def spec(**overrides) -> JobSpec:
    job = {
        "name": "readmissions",
        "task": "classification",
        "model": {"catalog": "mlp", "hidden": [16]},
        "data": {"federated": "readmissions", "label_column": "readmitted", "classes": ["no", "yes"]},
        "training": {"rounds": 5, "local_steps": 10, "batch_size": 8, "lr": 0.01},
        "swarm": {"min_peers": 2},
        "privacy": {"dp": {"level": "sample", "epsilon": 3.0}, "secure_aggregation": True},
    }
    for section, values in overrides.items():
        job[section] = {**job.get(section, {}), **values} if isinstance(values, dict) else values
    return JobSpec.from_dict(job, source="job.yaml")


def owner(peer: str, columns=COLUMNS, rows=400) -> PrivateDataRecord:
    return PrivateDataRecord(peer_id=peer, name="readmissions", columns=columns, rows=rows)


# -------------------------------------------------------------------- the job file


def test_a_federated_job_file_is_checked_at_the_edge():
    assert spec().verification.fraction == 0.0  # nobody else has the rows to re-run the work
    cases = [
        ({"verification": {"fraction": 0.5}}, "verification.fraction: must be 0 for a federated job"),
        ({"aggregation": {"reducer": "centered_clip"}}, "'centered_clip' needs to see each update"),
        ({"aggregation": {"compression": "int8"}}, "aggregation.compression: must be none under secure aggregation"),
        ({"aggregation": {"group_size": 4}}, "aggregation.group_size: secure aggregation's masks cancel only in"),
        ({"swarm": {"min_peers": 1}}, "swarm.min_peers: must be >= 2 under secure aggregation"),
        ({"data": {"classes": None}}, "data.classes: required for federated classification"),
        ({"data": {"path": "a.csv"}}, "data.path: not used with 'federated'"),
        ({"data": {"federated": "no spaces"}}, "data.federated"),
        ({"privacy": {"dp": {"level": "row", "epsilon": 1.0}}}, "privacy.dp.level"),
        ({"privacy": {"dp": {"level": "peer", "epsilon": -1}}}, "privacy.dp.epsilon"),
    ]
    for overrides, message in cases:
        with pytest.raises(JobSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
            spec(**overrides)
    with pytest.raises(JobSpecError, match="privacy: only for a federated job"):
        JobSpec.from_dict({**spec().to_dict(), "data": {"path": "a.csv", "format": "csv", "label_column": "y"}})
    assert JobSpec.from_dict(spec().to_dict()) == spec()  # what travels in the job record reads back the same


# -------------------------------------------------------------------- the owner's side


def test_a_private_dataset_is_read_once_and_describes_itself_without_rows(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("age,visits,readmitted\n71,3,yes\n45,1,no\n\n62,2.0,yes\n")
    dataset = load_private_dataset("readmissions", path)
    record = dataset.record("QmOwner")
    assert (record.name, record.columns, record.rows) == ("readmissions", COLUMNS, 3)
    assert set(record.model_dump()) == {"peer_id", "name", "columns", "rows"}
    features, targets = dataset.arrays("readmitted", ["no", "yes"])
    assert features.tolist() == [[71, 3], [45, 1], [62, 2]] and targets.tolist() == [1, 0, 1]
    with pytest.raises(PrivateDataError, match=r"labels the job does not list in data.classes \('yes'\)"):
        dataset.arrays("readmitted", ["no", "maybe"])
    with pytest.raises(PrivateDataError, match="feature columns must be numbers, these are text: readmitted"):
        dataset.arrays("age", ["0", "1"])


def test_bad_private_data_is_one_clear_error(tmp_path):
    (tmp_path / "ragged.csv").write_text("a,b\n1,2\n3\n")
    (tmp_path / "empty.csv").write_text("a,b\n")
    for name, path, message in [
        ("x", tmp_path / "missing.csv", "cannot read"),
        ("x", tmp_path / "ragged.csv", "row 3 has 1 values, the header 2"),
        ("x", tmp_path / "empty.csv", "has no rows"),
        ("bad name", tmp_path / "empty.csv", "a name is 1-64 letters"),
    ]:
        with pytest.raises(PrivateDataError, match=message):
            load_private_dataset(name, path)
    assert parse_private_data_option("readmissions=/srv/a.csv") == ("readmissions", "/srv/a.csv")
    with pytest.raises(PrivateDataError, match="expected NAME=FILE"):
        parse_private_data_option("/srv/a.csv")


def test_an_owner_splits_its_rows_the_same_way_every_time():
    train, held_out = owner_split(100, 0.2, seed=3)
    assert len(train) == 80 and len(held_out) == 20 and not set(train) & set(held_out)
    assert all((a == b).all() for a, b in zip((train, held_out), owner_split(100, 0.2, seed=3)))
    assert [len(part) for part in owner_split(2, 0.01, seed=0)] == [1, 1]


# -------------------------------------------------------------------- the consumer's checks


def test_the_manifest_comes_from_the_owners_that_fit():
    stray = [("age", "number"), ("visits", "number"), ("ward", "number"), ("readmitted", "text")]
    manifest = federated_manifest(spec(), [owner("A"), owner("B", rows=200), owner("C", columns=stray)])
    assert manifest.federated == "readmissions" and manifest.shards == []
    assert manifest.feature_names == ["age", "visits"] and manifest.classes == ["no", "yes"]
    assert manifest.train_rows + manifest.val_rows == 600  # C's columns differ from the others': left out


def test_a_job_the_owners_cannot_serve_is_refused_in_one_line():
    text_feature = [("age", "text"), ("visits", "number"), ("readmitted", "text")]
    cases = [
        ([], "no peer in the swarm holds a private dataset 'readmissions'"),
        ([owner("A")], r"1 owner\(s\) of 'readmissions' fit the job, it needs swarm.min_peers=2 \(no other owner"),
        ([owner("A"), owner("B", columns=text_feature)], r"feature columns must be numbers, these are text: age"),
    ]
    for records, message in cases:
        with pytest.raises(FederatedJobRefused, match=message):
            federated_manifest(spec(), records)
    with pytest.raises(PrivacyBudgetError, match="epsilon=0.001, delta=1e-05 cannot be met for 5 rounds"):
        federated_manifest(spec(privacy={"dp": {"level": "sample", "epsilon": 0.001}}), [owner("A"), owner("B")])
    with pytest.raises(PrivacyBudgetError, match="fewer than training.batch_size=8"):
        federated_manifest(spec(), [owner("A"), owner("B", rows=5)])


# -------------------------------------------------------------------- differential privacy


def test_the_noise_is_set_for_the_whole_job_and_spent_round_by_round():
    plan = check_budget(spec(), [400])[0]
    assert plan.level == "sample" and plan.sample_rate == pytest.approx(8 / 320)
    spent = [plan.epsilon_after(r) for r in range(6)]
    assert spent[0] == 0 and all(a < b for a, b in zip(spent, spent[1:]))
    assert 2.5 < spent[5] <= 3.0  # the whole budget, not more, after the job's rounds
    peer = check_budget(spec(privacy={"dp": {"level": "peer", "epsilon": 3.0}}), [400, 400])[0]
    assert peer.sample_rate == 1.0 and peer.epsilon_after(5) <= 3.0
    # more epsilon, less noise
    assert check_budget(spec(privacy={"dp": {"level": "sample", "epsilon": 8.0}}), [400])[0].noise_multiplier < \
        plan.noise_multiplier


def test_peer_level_noise_is_split_only_when_the_sum_is_secure():
    secure = spec(privacy={"dp": {"level": "peer", "epsilon": 3.0}, "secure_aggregation": True},
                  swarm={"min_peers": 3})
    assert noise_shares(secure, group_size=4) == 3  # the fewest summands a sum of 4 can have: min_peers / threshold
    open_sum = spec(privacy={"dp": {"level": "peer", "epsilon": 3.0}, "secure_aggregation": False})
    assert noise_shares(open_sum, group_size=4) == 1  # each update is seen: each carries all the noise
    clipped, norm = clip_update([torch.full((3,), 2.0), torch.full((1,), 2.0)], max_norm=1.0)
    assert norm == pytest.approx(4.0)
    assert torch.linalg.vector_norm(torch.cat(clipped)).item() == pytest.approx(1.0)
    a, b = gaussian_noise_like([torch.zeros(20000)], 0.5), gaussian_noise_like([torch.zeros(20000)], 0.5)
    assert a[0].std().item() == pytest.approx(0.5, rel=0.05) and not torch.equal(a[0], b[0])  # fresh every time


def test_dp_sgd_clips_each_example_and_leaves_a_plain_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    data = Batches(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, samples = train_local(model, optimizer, data, steps=5, batch_size=16, generator=torch.Generator().manual_seed(1),
                                loss=torch.nn.functional.cross_entropy, dp=(1.0, 0.5, torch.Generator().manual_seed(2)))
    assert samples == 80 and loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())  # Opacus's hooks are gone
    # per-example clipping bounds one step's move: lr * (clip + noise) per batch, without noise
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 2))
    start = [p.detach().clone() for p in model2.parameters()]
    big = Batches(torch.randn(16, 4) * 1000, torch.randint(0, 2, (16,)))
    train_local(model2, torch.optim.SGD(model2.parameters(), lr=1.0), big, steps=1, batch_size=16,
                generator=torch.Generator().manual_seed(1), loss=torch.nn.functional.cross_entropy,
                dp=(0.0, 0.5, torch.Generator().manual_seed(2)))
    moved = torch.linalg.vector_norm(torch.cat([(p - s).reshape(-1) for p, s in zip(model2.parameters(), start)]))
    assert moved.item() <= 0.5 + 1e-5  # the mean of clipped gradients is within the clip


def test_fedprox_pulls_local_training_towards_the_rounds_model():
    """The same steps on the same skewed rows, with and without the proximal term: with it the
    model ends nearer where the round started (plain and under DP-SGD alike)."""
    def drift(mu, dp=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        start = [p.detach().clone() for p in model.parameters()]
        g = torch.Generator().manual_seed(5)
        data = Batches(torch.randn(128, 4, generator=g), torch.zeros(128, dtype=torch.long))  # one label only
        train_local(model, torch.optim.SGD(model.parameters(), lr=0.5), data, steps=40, batch_size=16,
                    generator=torch.Generator().manual_seed(1), loss=torch.nn.functional.cross_entropy,
                    proximal_mu=mu, dp=dp)
        return torch.linalg.vector_norm(torch.cat([(p - s).reshape(-1) for p, s in zip(model.parameters(), start)]))

    assert drift(1.0) < 0.7 * drift(0.0)
    assert drift(1.0, dp=(0.0, 1.0, torch.Generator())) < 0.7 * drift(0.0, dp=(0.0, 1.0, torch.Generator()))


# -------------------------------------------------------------------- fair credit


def test_leave_one_out_takes_each_member_out_of_the_weighted_mean():
    from aggregation.credit import credit_gains, credited_units, leave_one_out_updates

    weighted = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([0.0, 1.0]), "c": torch.tensor([1.0, 1.0])}
    weights = {"a": 1.0, "b": 0.5, "c": 0.5}
    full, without = leave_one_out_updates(weighted, weights)
    assert full.tolist() == [1.5, 1.0]
    assert without["a"].tolist() == [1.0, 2.0] and without["b"].tolist() == [2.0, 2 / 3]
    # scored by the others: a helped (its removal costs loss), b did nothing, c hurt; what a member
    # says of itself does not count (c claims its removal would cost a lot)
    scores = [("a", 10, 5.0, {"a": 9.0, "b": 5.0, "c": 4.0}), ("b", 30, 15.0, {"a": 17.0, "b": 15.0, "c": 14.0}),
              ("c", 10, 5.0, {"a": 7.0, "b": 5.0, "c": 50.0})]
    gains = credit_gains(["a", "b", "c"], scores)
    assert gains == pytest.approx({"a": 0.1, "b": 0.0, "c": -0.05})
    assert credited_units({"a": 640, "b": 640, "c": 640}, gains) == {"a": 1920, "b": 0, "c": 0}
    # work counts too: twice the samples at the same gain, twice the units; the total stays
    assert credited_units({"a": 1280, "b": 640}, {"a": 0.1, "b": 0.1}) == {"a": 1280, "b": 640}
    assert credited_units({"a": 1280, "b": 640}, {"a": 0.05, "b": 0.1}) == {"a": 960, "b": 960}
    no_evidence = credit_gains(["a", "b"], [("a", 10, 5.0, {"a": 4.0, "b": 5.0})])
    assert credited_units({"a": 640, "b": 320}, no_evidence) == {"a": 640, "b": 320}


def test_more_useful_data_earns_more_and_random_or_duplicated_data_no_more_than_clean(digits_csv):
    """Four owners train rounds of the digits MLP from the same model, each its steps for its rows
    (schedule.owner_local_steps): one with 200 clean rows, one with twice as many, one with 200 rows
    of random labels, one with 100 clean rows written twice. Every round, the merge without each
    member is scored on held-out rows; what each earns is its samples times its share."""
    import numpy as np

    from aggregation.credit import credit_gains, credited_units, leave_one_out_updates
    from peer.local_training import evaluate, loss_fn, make_optimizer, round_generator
    from peer.schedule import owner_local_steps
    from swarm.catalog import build_model
    from swarm.datasets import load_dataset
    from swarm.spec import DataSpec, ModelSpec
    from swarm.shards import DatasetManifest

    data = load_dataset(DataSpec(path=str(digits_csv), format="csv", label_column="label"), "classification")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.targets))
    x, y = data.features[order], data.targets[order]
    held_out = Batches(torch.from_numpy(x[1400:]), torch.from_numpy(y[1400:]))
    owners = {
        "clean": (x[:200], y[:200]),
        "twice": (x[200:600], y[200:600]),
        "random": (x[600:800], rng.integers(0, 10, 200)),
        "copied": (np.concatenate([x[800:900]] * 2), np.concatenate([y[800:900]] * 2)),
    }
    steps = {m: owner_local_steps(20, len(fy), [len(v[1]) for v in owners.values()]) for m, (_, fy) in owners.items()}
    assert steps == {"clean": 16, "twice": 32, "random": 16, "copied": 16}
    manifest = DatasetManifest(task="classification", feature_shape=[64], feature_names=[f"p{i}" for i in range(64)],
                               num_outputs=10, classes=[str(i) for i in range(10)], feature_mean=[0.0] * 64,
                               feature_std=[1.0] * 64, shards=[], train_rows=1400, val_rows=397, federated="d")
    model = build_model(ModelSpec(catalog="mlp", hidden=[64]), manifest, seed=0)
    loss = loss_fn("classification", None, None)
    earned = {m: 0 for m in owners}
    for r in range(1, 4):
        base = [p.detach().clone() for p in model.parameters()]
        weighted, weights, samples = {}, {}, {}
        for name, (fx, fy) in owners.items():
            local = build_model(ModelSpec(catalog="mlp", hidden=[64]), manifest, seed=0)
            local.load_state_dict(model.state_dict())
            _, samples[name] = train_local(
                local, make_optimizer("adam", local.parameters(), lr=0.003, weight_decay=0, momentum=0),
                Batches(torch.from_numpy(fx), torch.from_numpy(fy)), steps=steps[name], batch_size=32,
                generator=round_generator(0, r, [name]), loss=loss)
            weights[name] = samples[name] / (20 * 32)  # as the runner weighs: in rounds' worth of work
            weighted[name] = weights[name] * torch.cat(
                [(p - b).detach().reshape(-1) for p, b in zip(local.parameters(), base)])
        full, without = leave_one_out_updates(weighted, weights)

        def score(delta):
            offset = 0
            with torch.no_grad():
                for p, b in zip(model.parameters(), base):
                    p.copy_(b + delta[offset: offset + p.numel()].reshape(p.shape).float())
                    offset += p.numel()
            return evaluate(model, held_out, task="classification", loss=loss)["val_loss_sum"]

        loo = {m: score(d) for m, d in without.items()}
        merged = score(full)  # the model moves on to the round's merge
        units = credited_units(samples, credit_gains(sorted(owners), [("referee", len(held_out), merged, loo)]))
        for m, u in units.items():
            earned[m] += u
    assert earned["twice"] > 1.2 * earned["clean"]
    assert earned["copied"] <= earned["clean"]
    assert earned["random"] < 0.2 * earned["clean"]  # an update that hurts earns (next to) nothing


def test_an_owners_steps_follow_its_rows_within_twice_either_way():
    from peer.schedule import owner_local_steps

    owners = [100, 200, 300, 1000]  # mean 400
    assert [owner_local_steps(20, rows, owners) for rows in owners] == [10, 10, 15, 40]
    assert owner_local_steps(20, 400, owners) == 20
    assert owner_local_steps(20, 400, []) == 20  # no counts recorded: everyone alike
    # the manifest fixes the counts: the DP plan is set for exactly these steps
    plans = check_budget(spec(), [400, 1600], [400, 1600])
    assert [p.steps_per_round for p in plans] == [5, 16] and plans[0].sample_rate > plans[1].sample_rate


def test_pooled_validation_is_counted_once_not_once_per_member():
    from dht.records import ProgressRecord
    from swarm.report import val_metrics

    def merged(peer, pooled, rows, correct, loss):
        return ProgressRecord(peer_id=peer, job_id="0" * 24, round=1, phase="merged", time=0.0, val_pooled=pooled,
                              val_rows=rows, val_correct=correct, val_loss_sum=loss)

    pooled = [merged(p, True, 360, 324, 72.0) for p in ("a", "b", "c")]  # every member holds the group's sums
    assert val_metrics("classification", pooled) == {"val_rows": 360, "val_loss": 0.2, "val_accuracy": 0.9}
    own = [merged("a", False, 100, 90, 20.0), merged("b", False, 260, 234, 52.0)]  # open: each its own part
    assert val_metrics("classification", own) == {"val_rows": 360, "val_loss": 0.2, "val_accuracy": 0.9}
